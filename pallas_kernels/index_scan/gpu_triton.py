"""Index scan, GPU backend: `pallas_call` lowered through Triton.

One program per (batch b, K/V head k, tile i of P consecutive keys): the [P, D'] packed
codes of the tile are read once (bits / 8 of a byte per channel) and unpacked in
registers, 8 / bits channel slices of D' each; the G query rows of the group score them
as float32 elementwise products and sums (exact IEEE float32, no TF32: the estimate keeps
the float32 rounding that the index's slack covers). The semantics are reference.py's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.block_sparse.triton_common import NEG_INF, check_backend
from pallas_kernels.index_scan.reference import levels


def _scan_kernel(qs_ref, qmu_ref, packed_ref, step_ref, len_ref, est_ref, *, scale, bits,
                 group, anchor, window):
  # qs_ref     [Gp, D]   float32 q * sigma of the group (rows >= G: padding)
  # qmu_ref    [Gp]      float32 q . mu
  # packed_ref [P, D']   uint8 codes of P consecutive keys
  # step_ref   [P]       float32
  # len_ref    []        int32 kv length of the row
  # est_ref    [Gp, P]   float32 output (-inf: not a middle key, or a padding row)
  gp, p = est_ref.shape
  dp = packed_ref.shape[1]
  x = packed_ref[...].astype(jnp.int32)
  mask, lv = (1 << bits) - 1, levels(bits)
  codes = [(((x >> (n * bits)) & mask) - lv).astype(jnp.float32)           # [P, D'] each
           for n in range(8 // bits)]
  step = step_ref[...]
  pos = pl.program_id(2) * p + jnp.arange(p, dtype=jnp.int32)
  middle = (pos >= anchor) & (pos <= len_ref[...] - 1 - window)
  # one query row at a time: a [P, D'] product and a row sum per slice (2-D tiles only)
  for g in range(gp):
    if g >= group:
      est_ref[g, :] = jnp.full((p,), NEG_INF, jnp.float32)
      continue
    acc = jnp.zeros((p,), jnp.float32)
    for n, c in enumerate(codes):
      acc += jnp.sum(c * qs_ref[g, pl.ds(n * dp, dp)][None, :], axis=1)
    est = scale * (qmu_ref[g] + step * acc)
    est_ref[g, :] = jnp.where(middle, est, NEG_INF)


def index_scan(qs, qmu, packed, step, kv_lengths, *, scale, bits, group, anchor, window,
               block_keys=64, interpret=False, num_warps=4, num_stages=2):
  """Triton index scan; semantics of reference.index_scan. Needs Gp and D' powers of two
  and S divisible by 16 (the tile P: the largest power of two dividing S, at most
  block_keys); NotImplementedError otherwise (api.py then falls back)."""
  check_backend(interpret)
  b, hkv, gp, d = qs.shape
  s, dp = packed.shape[2], packed.shape[3]
  p = min(1 << (max(int(block_keys), 1).bit_length() - 1), s & -s)  # powers of two
  if p < 16 or gp & (gp - 1) or dp & (dp - 1) or dp < 1:
    raise NotImplementedError(
        f"S={s}, Gp={gp}, packed width {dp}: the index scan needs S divisible by 16 and "
        "power-of-two Gp and packed width.")
  kernel = functools.partial(_scan_kernel, scale=float(scale), bits=int(bits),
                             group=int(group), anchor=int(anchor), window=int(window))
  return scan_call(kernel, qs.astype(jnp.float32), qmu, packed, step, kv_lengths, p=p,
                   name="condensate_index_scan", interpret=interpret, num_warps=num_warps,
                   num_stages=num_stages)


def scan_call(kernel, q_arg, qmu, packed, step, kv_lengths, *, p, name, interpret,
              num_warps, num_stages):
  """The scan's pallas_call, one program per (b, k, tile of p keys): kernel(q_ref, qmu_ref,
  packed_ref, step_ref, len_ref, est_ref) with q_arg [B, K, ...] (the whole group's query
  operand per program), est [B, K, Gp, S] float32."""
  b, hkv, gp = qmu.shape
  s, dp = packed.shape[2], packed.shape[3]
  q_block = (None, None) + tuple(q_arg.shape[2:])
  return pl.pallas_call(
      kernel, grid=(b, hkv, s // p),
      in_specs=[pl.BlockSpec(q_block, lambda b_, h, i: (b_, h) + (0,) * (len(q_block) - 2)),
                pl.BlockSpec((None, None, gp), lambda b_, h, i: (b_, h, 0)),
                pl.BlockSpec((None, None, p, dp), lambda b_, h, i: (b_, h, i, 0)),
                pl.BlockSpec((None, None, p), lambda b_, h, i: (b_, h, i)),
                pl.BlockSpec((None,), lambda b_, h, i: (b_,))],
      out_specs=pl.BlockSpec((None, None, gp, p), lambda b_, h, i: (b_, h, 0, i)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, gp, s), jnp.float32),
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      name=name)(q_arg, qmu.astype(jnp.float32), packed, step.astype(jnp.float32),
                 jnp.asarray(kv_lengths, jnp.int32).reshape(b))
