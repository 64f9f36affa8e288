"""Dev CLI (not a job): per-kernel device time of one fast-path step, from a
`jax.profiler` trace, and the table of a fast_bench run's results.jsonl.

  python -m experiments.bench.profile decode 128 128 32     # keys (K), P, M
  python -m experiments.bench.profile decode 128 64 64 centre superblock split
  python -m experiments.bench.profile prefill 128 [P M]
  python -m experiments.bench.profile table DIR/results.jsonl   # a (cut-short) run

Jobs (the benchmarks themselves) run through `python -m experiments.run --config=...`;
this tool only inspects. Shapes, seed and inputs are fast_bench's (the config
`fast_bench.py:cases=quick`, loaded through `experiments.cli.load_config`).

`profile(fn, q, args, iterations)` runs `iterations` calls of fn(q, *args) unrolled in one
jitted program (`timing.chained_loop`: each call's outputs feed the next call's q, as in
`timing.time_loop`), traces one run and sums the duration of every event on the
accelerator's rows of the trace, by kernel name. It answers "where do the microseconds of
a step go" (kernel time, count of small kernels) — the wall-clock speed of a step is
`timing.time_loop`'s. On a CPU the trace holds no per-kernel device events, and `profile`
says so.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

import condensate_jax as cj
from experiments.bench import synthetic, tables, timing

USAGE = ("usage: python -m experiments.bench.profile decode KEYS_K P M "
         "[bound|centre [METHOD [split|fused]]]  |  prefill KEYS_K [P M]  |  "
         "table RESULTS.jsonl")


def kernel_times(trace_json: dict, device: str = "GPU") -> dict:
  """Aggregates a Chrome-trace dict: complete ("X") events of processes whose name
  contains `device`. Returns {"span_us", "busy_us", "kernels": [(name, us, count)]}
  (sorted by time, descending); span = first start to last end."""
  events = trace_json.get("traceEvents", [])
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  total = collections.defaultdict(float)
  count = collections.Counter()
  start, end = float("inf"), float("-inf")
  for e in events:
    if e.get("ph") != "X" or device.lower() not in names.get(e.get("pid"), "").lower():
      continue
    total[e["name"]] += e["dur"]
    count[e["name"]] += 1
    start, end = min(start, e["ts"]), max(end, e["ts"] + e["dur"])
  kernels = sorted(((n, t, count[n]) for n, t in total.items()), key=lambda x: -x[1])
  # the same kernel kind under per-instance names (sort_20_1, input_reduce_fusion_39)
  kind_t, kind_c = collections.defaultdict(float), collections.Counter()
  for n, t, c in kernels:
    kind = re.sub(r"(_\d+)+$", "", n)
    kind_t[kind] += t
    kind_c[kind] += c
  kinds = sorted(((n, t, kind_c[n]) for n, t in kind_t.items()), key=lambda x: -x[1])
  return dict(span_us=(end - start) if kernels else 0.0, busy_us=sum(total.values()),
              kernels=kernels, kinds=kinds)


def profile(fn, q, args, iterations: int = 10, device: str = "GPU",
            log_dir: str | None = None) -> dict:
  """`kernel_times` of one traced run of `iterations` unrolled calls, per call."""
  if iterations < 1:
    raise ValueError(f"iterations={iterations}: expected >= 1.")
  loop = timing.chained_loop(fn, iterations, unroll=True)
  jax.block_until_ready(loop(q, *args))                      # compile outside the trace
  log_dir = log_dir or tempfile.mkdtemp(prefix="condensate_profile_")
  with jax.profiler.trace(log_dir):
    jax.block_until_ready(loop(q, *args))
  files = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"no *.trace.json.gz under {log_dir}: the profiler wrote no trace.")
  with gzip.open(files[-1]) as f:
    res = kernel_times(json.load(f), device)
  res["span_us"] /= iterations
  res["busy_us"] /= iterations
  for key in ("kernels", "kinds"):
    res[key] = [(n, t / iterations, c / iterations) for n, t, c in res[key]]
  res["iterations"] = iterations
  return res


def format_profile(title: str, res: dict, top: int = 25, by: str = "kinds") -> str:
  """Markdown table of `profile`'s result, by kernel kind ("kinds") or name ("kernels")."""
  if not res["kernels"]:
    return (f"{title}: the trace holds no device kernel events (a CPU backend records "
            "none); run on a GPU.")
  lines = [f"{title}: {res['span_us']:.1f} us per call from first kernel start to last "
           f"end; kernels busy {res['busy_us']:.1f} us; "
           f"{sum(c for _, _, c in res['kernels']):.0f} kernel launches per call",
           "| us / call | launches / call | kernel |", "| ---: | ---: | --- |"]
  for name, t, c in res[by][:top]:
    lines.append(f"| {t:.2f} | {c:.1f} | `{name[:100]}` |")
  return "\n".join(lines)


def profile_step(arg) -> str:
  """`decode KEYS_K P M [bound|centre [METHOD [split|fused]]]` or `prefill KEYS_K [P M]`:
  `format_profile` of one step at the benchmark's shapes and inputs; METHOD: a
  `fast.decode_select` method (default rank, kernel fused: `fast.decode_step`'s
  defaults)."""
  # imported here, not at the top: they load the Pallas kernels (kernel_times and
  # format_profile need none)
  from condensate_jax import fast  # pylint: disable=import-outside-toplevel
  from experiments import cli  # pylint: disable=import-outside-toplevel
  from experiments.bench import fast_bench  # pylint: disable=import-outside-toplevel
  if not arg or arg[0] not in ("decode", "prefill") or len(arg) < 2:
    raise ValueError(f"arguments {list(arg)}: {USAGE}")
  cfg = cli.load_config("fast_bench.py:cases=quick")
  op, s_len = arg[0], int(arg[1]) * 1024
  p, m = (int(arg[2]), int(arg[3])) if len(arg) >= 4 else (64, 16)
  spec = fast_bench.block_spec(cfg, p, m)
  scale = cfg.head_dim**-0.5
  if op == "decode":
    rank = arg[4] if len(arg) > 4 else "bound"
    method = arg[5] if len(arg) > 5 else "rank"
    kern = arg[6] if len(arg) > 6 else "fused"
    q, k, v = synthetic.make_inputs("topic", cfg.seed, 1, 1, s_len, cfg.q_heads,
                                    cfg.kv_heads, cfg.head_dim, dict(cfg.data))
    lengths = jnp.full((1,), s_len, jnp.int32)
    summ = cj.build_summaries(k, p, lengths)
    fn = lambda q, k, v, a, c, l: fast.decode_step(q, k, v, a, c, l, spec=spec, scale=scale,
                                                   rank=rank, method=method, kernel=kern)
    res = profile(fn, q, (k, v, summ.kmin, summ.kmax, lengths), 10)
    title = (f"decode B=1 {arg[1]}K keys P={p} M={m} rank={rank} method={method} "
             f"kernel={kern}")
  else:
    h = cfg.prefill_heads
    q, k, v = synthetic.make_inputs("topic", cfg.seed, 1, s_len, s_len, h, h, cfg.head_dim,
                                    dict(cfg.data))
    fn = lambda q, k, v: fast.prefill_step(q, k, v, spec=spec, scale=scale)
    res = profile(fn, q, (k, v), 3)
    title = f"prefill {arg[1]}K tokens P={p} M={m}"
  return format_profile(title, res)


def main(argv=None) -> int:
  """`decode ...` / `prefill ...` (see `profile_step`) or `table RESULTS.jsonl`."""
  arg = list(sys.argv[1:] if argv is None else argv)
  if arg and arg[0] == "table" and len(arg) == 2:
    print(tables.fast_table_of(arg[1]))
    return 0
  try:
    print(profile_step(arg))
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
