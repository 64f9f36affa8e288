"""Job "kernel_bench" (configs/kernel_bench.py): the exact-selection gather kernel.

For each case: dense XLA, cuDNN, condensate "xla" and "pallas" (selection included), and
the parts of "pallas": the XLA selection alone, its score matrix alone (the part that
reads all of K) and the gather kernel alone (indices precomputed), on one fixed seeded
input set (`synthetic.normal_qkv`). Timing: `timing.time_loop`, the fast-path benchmark's
method: each sample is one jitted loop of `iterations` chained calls / iterations (device
time of a call plus one sum over its outputs added to q's first row; no per-call host
dispatch), after `warmup` untimed loops; the median over `repeats` samples. Writes
results.json and table.md into workdir; returns the table.

Throughput columns: dense — decode: K+V bytes read / time (GB/s); prefill: causal
attention FLOPs (2 matmuls, half the T x S square) / time (TFLOP/s). Gather kernel:
bytes of the gathered K/V rows (anchor+window once per group, top-k once per head) /
kernel time.
"""

from __future__ import annotations

import json
import platform

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj
from condensate_jax import softmax
from condensate_jax.impl import pallas_exact, xla_masked
from experiments import manifest as manifest_lib
from experiments.bench import synthetic, tables, timing
from pallas_kernels.gather_attention import api as gather_api
from pallas_kernels.gather_attention import arg_specs


def _time_ms(fn, args, warmup, iterations, repeats):
  """`timing.time_loop` of fn(*args) in milliseconds: (median, samples)."""
  median, samples = timing.time_loop(fn, args[0], args[1:], iterations, repeats,
                                     warmup=warmup)
  return median * 1e3, [s * 1e3 for s in samples]


def _inputs(case, dtype, seed):
  return synthetic.normal_qkv(seed, case.batch, case.q_len, case.kv_len, case.q_heads,
                              case.kv_heads, case.head_dim, dtype)


def _functions(case, spec):
  causal = case.q_len > 1
  scale = 1.0 / float(np.sqrt(case.head_dim))
  b, t, s = case.batch, case.q_len, case.kv_len
  q_pos = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
  kv_len = jnp.full((b,), s, jnp.int32)

  def select(q, k):
    _, lo, hi, selection = xla_masked.select_scores(q, k, q_pos, kv_len, spec, True, None,
                                                    scale)
    return pallas_exact.split_set(selection, lo, hi, spec, s, case.q_heads)

  def kernel(q, k, v, shared, head):
    return gather_api.gather_attention(q, k, v, *head, scale=scale, shared_indices=shared[0],
                                       shared_valid=shared[1])[0]

  return {
      "dense_xla": jax.jit(lambda q, k, v: cj.dense_attention(q, k, v, causal=True)),
      "cudnn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, implementation="cudnn")),
      "condensate_xla": jax.jit(lambda q, k, v: cj.condensate_attention(
          q, k, v, spec, implementation="xla")),
      "condensate_pallas": jax.jit(lambda q, k, v: cj.condensate_attention(
          q, k, v, spec, implementation="pallas")),
      "selection_only": jax.jit(select),
      # The part of the selection that reads all of K: the score matrix alone.
      "scores_only": jax.jit(lambda q, k: softmax.scores(q, k, scale)),
      "gather_kernel_only": jax.jit(kernel),
  }


def _bench_case(case, config, spec, dtype):
  q, k, v = _inputs(case, dtype, config.seed)
  fns = _functions(case, spec)
  row = {"case": case.name, "B": case.batch, "T": case.q_len, "S": case.kv_len,
         "Hq": case.q_heads, "Hkv": case.kv_heads, "D": case.head_dim}
  timing_kw = dict(warmup=config.warmup, iterations=config.iterations,
                   repeats=config.repeats)
  indices = None
  for name, fn in fns.items():
    args = (q, k) if name in ("selection_only", "scores_only") else (q, k, v)
    if name == "gather_kernel_only":
      args = (q, k, v) + indices
    try:
      ms, samples = _time_ms(fn, args, **timing_kw)
      row[name + "_ms"], row[name + "_samples_ms"] = ms, samples
    except Exception as err:  # e.g. cuDNN unavailable on this platform/shape
      row[name + "_ms"], row[name + "_error"] = None, f"{type(err).__name__}: {err}"[:300]
    if name == "selection_only":
      indices = jax.block_until_ready(fn(q, k))
  # Sanity: pallas agrees with xla on this input (bf16 tolerance).
  diff = jnp.max(jnp.abs(fns["condensate_pallas"](q, k, v).astype(jnp.float32)
                         - fns["condensate_xla"](q, k, v).astype(jnp.float32)))
  row["max_abs_diff_pallas_vs_xla"] = float(diff)
  itemsize = jnp.dtype(dtype).itemsize
  b, t, s, hq, hkv, d = case.batch, case.q_len, case.kv_len, case.q_heads, case.kv_heads, case.head_dim
  shared, head = indices
  gathered = (int(jnp.sum(shared[1])) + int(jnp.sum(head[1]))) * 2 * d * itemsize
  row["gathered_bytes"] = gathered
  if row.get("gather_kernel_only_ms"):
    row["gather_kernel_GBps"] = gathered / row["gather_kernel_only_ms"] / 1e6
  dense = [row[n] for n in ("dense_xla_ms", "cudnn_ms") if row.get(n)]
  best = min(dense) if dense else None
  row["best_dense_ms"] = best
  if best:
    if t == 1:
      row["best_dense_GBps"] = 2 * b * s * hkv * d * itemsize / best / 1e6
    else:
      row["best_dense_TFLOPs"] = 4 * b * hq * d * t * s / 2 / best / 1e9
    for n in ("condensate_pallas", "condensate_xla", "gather_kernel_only"):
      if row.get(n + "_ms"):
        row[n + "_over_best_dense"] = row[n + "_ms"] / best
  return row


def run(config, workdir):
  workdir = manifest_lib.prepare_workdir(workdir)
  spec = cj.CondensateSpec(anchor=config.attention.anchor, window=config.attention.window,
                           top_k=config.attention.top_k)
  dtype = jnp.dtype(config.dtype)
  device = jax.devices()[0]
  env = {"device": getattr(device, "device_kind", str(device)),
         "platform": jax.default_backend(), "jax": jax.__version__,
         "python": platform.python_version(), "spec": str(spec), "dtype": dtype.name,
         "timing": dict(warmup=config.warmup, iterations=config.iterations,
                        repeats=config.repeats, method="timing.time_loop")}
  rows = []
  for name in config.cases:
    if name not in arg_specs.BENCH_CASES_BY_NAME:
      raise ValueError(f"config.cases has {name!r}: expected names in "
                       f"{sorted(arg_specs.BENCH_CASES_BY_NAME)}.")
    rows.append(_bench_case(arg_specs.BENCH_CASES_BY_NAME[name], config, spec, dtype))
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("samples_ms")}),
          flush=True)
  table = (f"{env['device']} ({env['platform']}), JAX {env['jax']}, {dtype.name}, "
           f"{spec}\n\n" + tables.kernel_table(rows))
  (workdir / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
  (workdir / "table.md").write_text(table + "\n")
  return {"table": table, "computed": len(rows), "skipped": 0}
