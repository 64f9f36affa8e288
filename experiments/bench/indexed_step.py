"""Where the indexed decode step's time goes, phase by phase, and what the kernels change:
`fast.indexed_decode_step` with the earlier selections ("old": the CUDA-core scan,
lax.top_k and sorts), with the selections on `pallas_kernels.top_select` ("cuda_scan")
and with the tensor-core scan too ("new": scan="triton_mma", the GPU default), the
scan alone, scan + candidates, and cuDNN over every key, timed in the same run on the
same inputs (`timing.time_loop`). Every variant runs the split gather attention (so "old"
is not the earlier step: that one also attended in B * Hkv programs).

  python -m experiments.bench.indexed_step                       # the shapes below
  python -m experiments.bench.indexed_step --shapes=smollm2_8k --iterations=10 --profile

Shapes: "smollm2_8k" is one SmolLM2-135M layer at 8192 keys (9 q / 3 kv heads, d 64,
top_k 1024, 2048 candidates: the model_bench setting); "bench_128k" / "bench_1m" the
retrieval benchmark's (32 q / 8 kv heads, d 128, top_k 128, 512 candidates). bf16,
B = 1, keys with a shared offset and outlier channels (`retrieval.needle_qkv`).

Before any time is printed: "same_sets" (the selection kernel picks lax.top_k's keys in
every head, same scan; False exits with status 1), and the share of heads whose set the
tensor-core scan leaves unchanged ("mma_same_heads") with the largest output change.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj
from condensate_jax import fast
from condensate_jax.selection import index as index_lib
from experiments.bench import retrieval, tables, timing

SHAPES = {
    # name: (S, Hq, Hkv, D, top_k, candidates)
    "smollm2_8k": (8192, 9, 3, 64, 1024, 2048),
    "bench_128k": (131072, 32, 8, 128, 128, 512),
    "bench_1m": (1048576, 32, 8, 128, 128, 512),
}


def inputs(s, hq, hkv, d, seed=0):
  q, k, v, _ = retrieval.needle_qkv(np.random.default_rng(seed), s, hq, hkv, d, needles=4,
                                    gain=2.0, offset=1.0, outliers=4, outlier_scale=8.0,
                                    query_noise=0.5)
  v = np.random.default_rng(seed + 1).standard_normal(v.shape).astype(np.float32)
  return tuple(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))


def _sets(ids):
  ids = np.asarray(ids)
  return [set(r[r >= 0].tolist()) for r in ids.reshape(-1, ids.shape[-1])]


VARIANTS = {   # name: the step's (scan, select); all with the split gather attention
    "new": ("triton_mma", None),    # the tensor-core scan + top_select (the default)
    "cuda_scan": ("triton", None),  # the CUDA-core scan + top_select
    "old": ("triton", "xla"),       # the CUDA-core scan + lax.top_k and sorts (earlier)
}


def run_shape(name, iterations, repeats, with_profile=False):
  s, hq, hkv, d, top_k, cands = SHAPES[name]
  spec = cj.CondensateSpec(anchor=16, window=64, top_k=top_k, selection="indexed",
                           index_bits=4, candidates=cands)
  q, k, v = inputs(s, hq, hkv, d)
  lengths = jnp.full((1,), s, jnp.int32)
  scale = d ** -0.5
  index = jax.block_until_ready(index_lib.pack_index(cj.build_index(k, spec.index_bits)))
  step = {name_: (lambda q, k, v, ix, n, sc=sc, se=se: fast.indexed_decode_step(
      q, k, v, ix, n, spec=spec, scale=scale, scan=sc, select=se))
          for name_, (sc, se) in VARIANTS.items()}
  # correctness first: the selection kernel chooses lax.top_k's keys (same scan); the
  # tensor-core scan's sets are counted against the CUDA-core scan's (rounding may break
  # a near-tie of estimates differently)
  got = {name_: fast.indexed_decode_step(q, k, v, index, lengths, spec=spec, scale=scale,
                                         scan=sc, select=se, return_ids=True)
         for name_, (sc, se) in VARIANTS.items()}
  sets = {name_: _sets(r[3]) for name_, r in got.items()}
  diff = lambda a, b, i: float(jnp.max(jnp.abs(got[a][i].astype(jnp.float32)
                                               - got[b][i].astype(jnp.float32))))
  row = {"shape": name, "keys": s, "same_sets": sets["cuda_scan"] == sets["old"],
         "out_diff": diff("cuda_scan", "old", 0), "eps_diff": diff("cuda_scan", "old", 2),
         "mma_same_heads": float(np.mean([a == b for a, b in zip(sets["new"],
                                                                   sets["cuda_scan"])])),
         "mma_out_diff": diff("new", "cuda_scan", 0)}
  t = lambda fn, args: timing.time_loop(fn, q, args, iterations, repeats)[0] * 1e6
  for sc, key in (("triton", "scan_cuda_us"), ("triton_mma", "scan_new_us")):
    scan = lambda q, ix, n, sc=sc: fast.indexed.scan_estimates(q, ix, n, spec=spec,
                                                              scale=scale, scan=sc)
    row[key] = t(scan, (index, lengths))
  for name_, (sc, se) in VARIANTS.items():
    if name_ != "cuda_scan":
      top = lambda q, ix, n, sc=sc, se=se: fast.indexed.candidates(
          fast.indexed.scan_estimates(q, ix, n, spec=spec, scale=scale, scan=sc), cands, se)
      row[f"scan_cand_{name_}_us"] = t(top, (index, lengths))
    row[f"step_{name_}_us"] = t(step[name_], (k, v, index, lengths))
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)
  row["dense_us"] = t(dense, (k, v))
  if with_profile and jax.default_backend() == "gpu":
    from experiments.bench import profile  # pylint: disable=import-outside-toplevel
    row["profile"] = profile.format_profile(
        f"{name}: indexed step (new)",
        profile.profile(step["new"], q, (k, v, index, lengths), iterations=5), top=14)
  return row


def sweep(name, iterations, repeats):
  """The top-k selection kernel on this shape's rows (the flat or two-level candidate
  rows and the exact top-k's), by num_warps."""
  from pallas_kernels.top_select import api as top_api  # pylint: disable=import-outside-toplevel
  s, hq, _, _, top_k, cands = SHAPES[name]
  if s <= top_api.MAX_ROW:
    rows_n = {s, cands}                        # flat candidates, the exact top-k's
  else:
    chunk = top_api.two_level_chunk(s, cands)
    rows_n = {-(-s // chunk), cands * chunk, cands}      # both levels, the exact top-k's
  q = jnp.zeros((1, 1, hq, 8), jnp.float32)
  t = lambda fn, args: timing.time_loop(fn, q, args, iterations, repeats)[0] * 1e6
  lines = []
  for n in sorted(x for x in rows_n if x <= top_api.MAX_ROW):
    x = jax.random.normal(jax.random.PRNGKey(0), (hq, n), jnp.float32)
    kk = min(cands if n > cands else top_k, n)
    for nw in (4, 8, 16, 32):
      fn = lambda q, x, nw=nw, kk=kk: top_api.top_select(x + q[0, 0, 0, 0], kk,
                                                         implementation="triton",
                                                         num_warps=nw)
      lines.append(f"top_select rows={hq} N={n} k={kk} num_warps={nw}: "
                   f"{t(fn, (x,)):.1f} us")
  return "\n".join(lines)


COLUMNS = ("shape", "same_sets", "mma_same_heads", "mma_out_diff", "scan_cuda_us",
           "scan_new_us", "scan_cand_old_us", "scan_cand_new_us", "step_old_us",
           "step_cuda_scan_us", "step_new_us", "dense_us")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--iterations", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--sweep", action="store_true",
                  help="also time the selection kernel by num_warps")
  ap.add_argument("--profile", action="store_true",
                  help="also print the step's kernels from a profiler trace (GPU)")
  a = ap.parse_args(argv)
  names = tables.names_arg("--shapes", a.shapes, SHAPES)
  tables.check_loops(a.iterations, a.repeats)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows, ok = [], True
  for x in names:
    row = run_shape(x, a.iterations, a.repeats, a.profile)
    ok &= row["same_sets"]
    rows.append(row)
    print(row.pop("profile", ""), flush=True)
    if a.sweep:
      print(sweep(x, a.iterations, a.repeats), flush=True)
    print(row, flush=True)
  print("| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS))
  for r in rows:
    print("| " + " | ".join(f"{r[c]:.1f}" if c.endswith("_us") else
                            f"{r[c]:.2g}" if isinstance(r[c], float) else str(r[c])
                            for c in COLUMNS) + " |")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
