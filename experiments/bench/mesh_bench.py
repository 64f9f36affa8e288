"""Sharded decode over 1..n devices (issues #17, #18): latency and the largest context.

Per (devices n, keys S, batch B): one decode query per row over S keys sharded along the
sequence on a mesh of the first n devices (`cj.distributed`, axis "seq"), timed by
`timing.time_loop` (the same method as every benchmark here), for dense
(`distributed.dense_attention`) and condensate exact top-k (`distributed.condensate_attention`,
the spec of the config). Beside each time: the row's max |out - out on one device| on the
same inputs, where both fit (`check_max_keys`), and the bytes each collective moves per
call (from the shapes: the gathered top-k candidates and the merge), so the first
multi-GPU run can check them against a profile. Rows that do not fit (out of memory) are
recorded as such: the largest context per device count is the table's last fitting row.

Inputs: Gaussian q, k, v (decode latency does not depend on the values for these
paths: dense reads everything, exact top-k scores everything).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import condensate_jax as cj
from experiments import manifest as manifest_lib
from experiments.bench import tables, timing
from experiments.results import ResultsStore


def device_counts(config) -> list[int]:
  """config.devices, or 1, 2, 4, ... up to the devices present."""
  have = len(jax.devices())
  if config.devices:
    return [n for n in config.devices if n <= have]
  out, n = [], 1
  while n <= have:
    out.append(n)
    n *= 2
  return out


def collective_bytes(config, s: int, b: int, n: int) -> dict[str, int]:
  """Bytes per call and device of the sequence-sharded collectives, stated from the
  shapes: the gathered top-k candidates of `distributed.condensate_attention` (scores
  float32 + a validity byte, every shard's) and the merge both calls share (float32 pmax
  m, psum l and o; int32 psum of the bad keys each K/V head reads). Checked against the
  compiled program (`compiled_collectives`)."""
  hq, hkv, d = config.q_heads, config.kv_heads, config.head_dim
  kk = min(config.attention.top_k, s // n)
  gather = n * kk * b * hq * 5 if n > 1 else 0
  merge = (b * hq * 4 * 2 + b * hq * d * 4 + b * hkv * 4) if n > 1 else 0
  return {"gather_bytes": gather, "merge_bytes": merge}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(all-gather|all-reduce|reduce-scatter|"
                         r"(?:ragged-)?all-to-all|collective-permute|collective-broadcast)"
                         r"(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


def compiled_collectives(hlo_text: str) -> dict[str, int]:
  """Bytes per device of the collectives in a compiled program's HLO text: each
  all-gather's and all-reduce's result (an async all-gather-start's tuple holds operands,
  then results: the results counted), every other collective under "other". A static
  count: a collective inside a while loop's body counts once, not once per iteration
  (the bench's "exact" and dense calls have none). ValueError on an element type it has
  no size for."""
  out = {"gather": 0, "reduce": 0, "other": 0}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    unknown = sorted({dt for dt, _ in shapes if dt not in _DTYPE_BYTES})
    if unknown:
      raise ValueError(f"compiled_collectives: element types {unknown} in {m.group(1)!r} "
                       f"have no size here (known: {sorted(_DTYPE_BYTES)}).")
    sizes = [_DTYPE_BYTES[dt] * int(np.prod([int(x) for x in dims.split(",") if x]))
             for dt, dims in shapes]
    if m.group(2) == "all-gather" and m.group(3):
      sizes = sizes[len(sizes) // 2:]
    kind = {"all-gather": "gather", "all-reduce": "reduce"}.get(m.group(2), "other")
    out[kind] += sum(sizes)
  return out


def _inputs(config, s, b, seed):
  keys = jax.random.split(jax.random.key(seed), 3)
  dt = jnp.dtype(config.dtype)
  q = jax.random.normal(keys[0], (b, 1, config.q_heads, config.head_dim), dt)
  k = jax.random.normal(keys[1], (b, s, config.kv_heads, config.head_dim), dt)
  v = jax.random.normal(keys[2], (b, s, config.kv_heads, config.head_dim), dt)
  return q, k, v


def run_row(config, n, s, b, spec):
  mesh = Mesh(np.array(jax.devices()[:n]), ("seq",))
  q, k, v = _inputs(config, s, b, config.seed)
  shard = NamedSharding(mesh, P(None, "seq", None, None))
  k, v = jax.device_put(k, shard), jax.device_put(v, shard)
  q = jax.device_put(q, NamedSharding(mesh, P()))
  fns = {"dense": lambda q, k, v: cj.distributed.dense_attention(q, k, v, mesh=mesh,
                                                                 seq_axis="seq"),
         "condensate": lambda q, k, v: cj.distributed.condensate_attention(
             q, k, v, spec, mesh=mesh, seq_axis="seq")}
  row = {"devices": n, "keys": s, "batch": b, **collective_bytes(config, s, b, n)}
  for name, fn in fns.items():
    try:
      row[f"{name}_s"], _ = timing.time_loop(fn, q, (k, v), config.iterations,
                                             config.repeats)
    except Exception as err:  # pylint: disable=broad-except
      _out_of_memory_or_raise(err)
      row[f"{name}_s"], row[f"{name}_error"] = None, "out of memory"
      continue
    program = jax.jit(fn).lower(q, k, v).compile()
    row.update({f"{name}_compiled_{kind}_bytes": x
                for kind, x in compiled_collectives(program.as_text()).items()})
    if s <= config.check_max_keys:
      try:    # the one-device reference may not fit where the sharded call does
        got = program(q, k, v)
        host = [jax.device_get(x) for x in (q, k, v)]
        want = (cj.dense_attention(*host) if name == "dense"
                else cj.condensate_attention(*host, spec))
        row[f"{name}_max_abs_vs_one_device"] = float(jnp.max(jnp.abs(
            jnp.asarray(jax.device_get(got), jnp.float32) - jnp.asarray(want, jnp.float32))))
      except Exception as err:  # pylint: disable=broad-except
        _out_of_memory_or_raise(err)
        row[f"{name}_check_error"] = "out of memory"
  return row


def _out_of_memory_or_raise(err):
  if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
    raise err


def table(rows) -> str:
  ms = lambda x: "OOM" if x is None else f"{1e3 * x:.3f}"
  err = lambda r, n: ("—" if f"{n}_max_abs_vs_one_device" not in r
                      else f"{r[f'{n}_max_abs_vs_one_device']:.1e}")
  def got(r, kind, unit, digits):
    x = r.get(f"condensate_compiled_{kind}_bytes")
    return "—" if x is None else f"{x / unit:.{digits}f}"

  body = [[str(r["devices"]), f"{r['keys'] // 1024}K", str(r["batch"]), ms(r["dense_s"]),
           ms(r["condensate_s"]), err(r, "dense"), err(r, "condensate"),
           f"{r['gather_bytes'] / 1e6:.2f} / {got(r, 'gather', 1e6, 2)}",
           f"{r['merge_bytes'] / 1e3:.1f} / {got(r, 'reduce', 1e3, 1)}",
           got(r, "other", 1e3, 1)]
          for r in rows]
  return tables.markdown(["devices", "keys", "B", "dense ms", "condensate ms",
                          "dense vs 1 device", "condensate vs 1 device",
                          "gathered MB (stated / compiled)", "merged KB (stated / compiled)",
                          "other collectives KB (compiled)"], body)


def run(config, workdir, progress: bool = True):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  workdir = manifest_lib.prepare_workdir(workdir)
  store = ResultsStore(workdir / "results.jsonl")
  manifest_lib.check_resume(workdir, config.to_dict(), has_rows=bool(store.rows))
  manifest_lib.write_manifest(workdir, config.to_dict(), {"job": "mesh_bench"})
  a = config.attention
  spec = cj.CondensateSpec(anchor=a.anchor, window=a.window, top_k=a.top_k)
  plan = [(n, s, b) for n in device_counts(config) for s in config.lengths
          for b in config.batches]
  rows = []
  before = len(store.rows)
  with tqdm(total=len(plan), disable=not progress, desc=config.name, unit="row") as bar:
    for n, s, b in plan:
      key = f"{config.name}|n{n}|S{s}|B{b}|{spec!r}|{config.dtype}"
      bar.set_postfix_str(f"{n} devices {s // 1024}K B={b}")
      if key not in store:
        store.append({"key": key, **run_row(config, n, s, b, spec)})
        jax.clear_caches()
      rows.append(store.rows[key])
      bar.update()
  text = table(rows)
  device = manifest_lib.device_info()
  (workdir / "summary.md").write_text(f"# {config.name}\n\n{device}\n\n{text}\n")
  computed = len(store.rows) - before
  return {"table": text, "computed": computed, "skipped": len(plan) - computed, "rows": rows}
