"""python -m experiments.bench.scan_bench [--shapes=smollm2_8k,bench_128k,bench_1m]

The index scan alone (issue #16: the Mosaic GPU port of the tensor-core scan), every
implementation on the same packed index in one run, beside cuDNN dense decode attention
over the same keys: the decode query's estimates est [B, K, Gp, S] for every key, from the
4-bit index of `experiments.bench.indexed_step`'s inputs (needles, keys with an offset and
outlier channels). Correctness first, per implementation against the plain-jnp reference:
the same -inf pattern (middle keys, padding rows), the largest |est - reference| over the
largest |reference| (float32 rounding: the kernels sum in another order), and the share of
query heads whose top-C candidate set (lax.top_k of est, C = the shape's candidates) equals
the reference's. An implementation that fails to compile or run prints its error and the
run goes on. Bytes: the packed index (D' + 4 bytes of codes and step per key and K/V
head) read once plus est written once (4 Gp bytes): GB/s = bytes / time.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj
from condensate_jax import fast
from condensate_jax.selection import index as index_lib
from experiments.bench import indexed_step, tables, timing

IMPLS = {   # name: (scan implementation, its tuning)
    "reference": ("reference", {}), "triton": ("triton", {}),
    "triton_mma": ("triton_mma", {}),
    "mosaic_gpu": ("mosaic_gpu", {}),                          # codes from registers
    "mosaic_gpu_smem": ("mosaic_gpu", {"a_operand": "smem"}),  # codes through SMEM
}


def run_shape(name, iterations, repeats):
  s, hq, hkv, d, top_k, cands = indexed_step.SHAPES[name]
  spec = cj.CondensateSpec(anchor=16, window=64, top_k=top_k, selection="indexed",
                           index_bits=4, candidates=cands)
  q, k, v = indexed_step.inputs(s, hq, hkv, d)
  lengths = jnp.full((1,), s, jnp.int32)
  scale = d ** -0.5
  index = jax.block_until_ready(index_lib.pack_index(cj.build_index(k, spec.index_bits)))
  gp = 1 << (hq // hkv - 1).bit_length()
  nbytes = hkv * s * (index.packed.shape[-1] + 4 + 4 * gp)
  t = lambda fn, args: timing.time_loop(fn, q, args, iterations, repeats)[0] * 1e6
  est = {}
  rows = []
  for impl, (scan, kw) in IMPLS.items():
    fn = jax.jit(lambda q, ix, n, scan=scan, kw=kw: fast.indexed.scan_estimates(
        q, ix, n, spec=spec, scale=scale, scan=scan, **kw))
    row = {"shape": name, "impl": impl}
    try:
      est[impl] = np.asarray(fn(q, index, lengths))
      row["us"] = t(fn, (index, lengths))
    except Exception as err:  # pylint: disable=broad-except
      row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
      traceback.print_exc()
      rows.append(row)
      continue
    rows.append(row)
  if "reference" not in est:       # nothing to check against: times only
    _beside_dense(rows, t, k, v)
    return rows
  ref = est["reference"]
  ref_top = _top_sets(ref, cands)
  scale_ref = float(np.max(np.abs(ref[np.isfinite(ref)])))
  for row in rows:
    if "us" not in row:
      continue
    e = est[row["impl"]]
    fin = np.isfinite(ref)
    row["same_inf"] = bool(np.array_equal(np.isneginf(e), np.isneginf(ref)))
    row["rel_err"] = float(np.max(np.abs(e[fin] - ref[fin]))) / scale_ref
    row["same_top_heads"] = float(np.mean([a == b for a, b in zip(_top_sets(e, cands),
                                                                   ref_top)]))
    row["gb_s"] = nbytes / (row["us"] * 1e-6) / 1e9
  _beside_dense(rows, t, k, v)
  return rows


def _beside_dense(rows, t, k, v):
  """cuDNN (XLA off a GPU) over the same keys, and each time against triton_mma's."""
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)
  dense_us = t(dense, (k, v))
  mma = next((r["us"] for r in rows if r["impl"] == "triton_mma" and "us" in r), None)
  for row in rows:
    row["dense_us"] = dense_us
    if mma and "us" in row:
      row["vs_triton_mma"] = mma / row["us"]


def _top_sets(est, c):
  flat = jnp.asarray(est.reshape(-1, est.shape[-1]))
  _, ids = jax.lax.top_k(flat, min(c, flat.shape[-1]))
  return [frozenset(r.tolist()) for r in np.asarray(ids)]


def table(rows) -> str:
  f = lambda r, key, spec: "—" if key not in r else format(r[key], spec)
  body = [[r["shape"], r["impl"], f(r, "us", ".1f"), f(r, "vs_triton_mma", ".2f"),
           f(r, "gb_s", ".0f"), str(r.get("same_inf", "—")), f(r, "rel_err", ".1e"),
           f(r, "same_top_heads", ".3f"), f(r, "dense_us", ".1f"),
           r.get("error", "")[:120]] for r in rows]
  return tables.markdown(["shape", "scan", "µs", "vs triton_mma", "GB/s", "same -inf",
                          "max rel err", "same top-C heads", "cuDNN µs", "error"], body)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default=",".join(indexed_step.SHAPES))
  ap.add_argument("--iterations", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args(argv)
  names = tables.names_arg("--shapes", a.shapes, indexed_step.SHAPES)
  rows = [r for n in names for r in run_shape(n, a.iterations, a.repeats)]
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(table(rows))
  bad = [r for r in rows if "us" in r and r["impl"] != "reference"
         and not (r.get("same_inf") and r.get("rel_err", 1.0) < 1e-5)]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
