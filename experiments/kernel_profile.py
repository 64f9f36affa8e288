"""Per-kernel device time of a jitted step, read from a `jax.profiler` trace.

  python -m experiments.fast_bench profile decode 128 128 32     # keys (K), P, M
  python -m experiments.fast_bench profile prefill 128

`profile(fn, q, args, iterations)` runs `iterations` calls of fn(q, *args) unrolled in one
jitted program (each call's outputs feed the next call's q, as in `fast_bench.time_loop`),
traces one run and sums the duration of every event on the accelerator's rows of the
trace, by kernel name. It answers "where do the microseconds of a step go" (kernel time,
count of small kernels) — the wall-clock speed of a step is `fast_bench.time_loop`'s.
On a CPU the trace holds no per-kernel device events, and `profile` says so.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp


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


def chained_loop(fn, iterations: int, unroll: bool = False):
  """jit(loop)(q, *args): `iterations` calls of fn(q, *args) in one program; each call's
  outputs (every numeric leaf, integer block lists too) feed the next call's q, so no
  call can be hoisted or dead-code eliminated. unroll=True: straight-line code."""

  @jax.jit
  def loop(q, *args):
    def body(_, q):
      res = fn(q, *args)
      dep = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree_util.tree_leaves(res)
                if jnp.issubdtype(x.dtype, jnp.number))
      dep = jnp.where(jnp.isfinite(dep), dep, 0.0)
      return q.at[:, :1].add((1e-3 * dep).astype(q.dtype))
    return jax.lax.fori_loop(0, iterations, body, q, unroll=bool(unroll))

  return loop


def profile(fn, q, args, iterations: int = 10, device: str = "GPU",
            log_dir: str | None = None) -> dict:
  """`kernel_times` of one traced run of `iterations` unrolled calls, per call."""
  if iterations < 1:
    raise ValueError(f"iterations={iterations}: expected >= 1.")
  loop = chained_loop(fn, iterations, unroll=True)
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
