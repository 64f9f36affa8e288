"""Block bounds, GPU backend: `pallas_call` lowered through Triton.

One program per (batch b, K/V head h, chunk i of C consecutive blocks): the G query rows
of the group are gathered in the kernel into a [Gp, D] tile (Gp = max(16, next_pow2(G)),
zero rows beyond G), the [C, D] min / max summaries are read once in their cache layout,
and the box bound is four tensor-core matmuls (q+ . max, q- . min and the two |.| terms of
the rounding slack). The semantics, padding rows included, are those of reference.py.
Precision: float32 inputs use Precision.HIGHEST; bf16/f16 dots accumulate in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.util import next_pow2
from pallas_kernels.block_sparse.triton_common import (
    NEG_INF, check_backend, dot_precision, group_rows)


def _bounds_kernel(q_ref, kmin_ref, kmax_ref, *refs, scale, slack, precision, dtype,
                   group, block_size, anchor, window, num_keys, with_centre, masked,
                   superblock):
  # q_ref      [Hq, D]   the decode queries of batch row b, unscaled
  # kmin_ref   [C, D]    min / max summaries of C consecutive blocks of one K/V head
  # kmax_ref   [C, D]
  # len_ref    []        (masked only) int32 kv length of the row
  # Outputs
  # u_ref      [Gp, C]   float32 upper bounds on scale * q.k over each block
  #                      (masked: -inf where the block holds no middle key)
  # c_ref      [Gp, C]   (with_centre) float32 scale * q.(min + max) / 2, the centre score
  # sbmax_ref  [Gp, C/X] (superblock X) max of the ranking score (c or u) per X blocks
  len_ref = refs[0] if masked else None
  u_ref, *rest = refs[1:] if masked else refs
  c_ref = rest.pop(0) if with_centre else None
  sbmax_ref = rest.pop(0) if superblock else None
  gp, c = u_ref.shape
  q = group_rows(q_ref, group, gp).astype(dtype)
  zero = jnp.zeros_like(q)
  qp, qn = jnp.maximum(q, zero), jnp.minimum(q, zero)        # exact in any dtype
  mn, mx = kmin_ref[...].astype(dtype), kmax_ref[...].astype(dtype)

  def dot(a, b):
    return jnp.dot(a, b.T, preferred_element_type=jnp.float32, precision=precision)

  # sum_d max(q_d mn_d, q_d mx_d) = q+ . mx + q- . mn (q_d >= 0 picks the max end)
  up, un = dot(qp, mx), dot(qn, mn)
  # rounding slack: relative to sum_d |q_d| |picked end| (a product of two values of
  # the summaries' dtype is exact in float32 for bf16/f16; only the accumulation rounds)
  a = dot(qp, jnp.abs(mx)) - dot(qn, jnp.abs(mn))
  u = scale * (up + un) + (slack * scale) * a
  if with_centre:
    # q.(mn + mx) / 2 from the same four products: q+.mx + q-.mn + q+.mn + q-.mx
    cen = (0.5 * scale) * (up + un + dot(qp, mn) + dot(qn, mx))
  if masked:   # middle keys of the decode query at len - 1: anchor .. len - 1 - window
    start = (pl.program_id(2) * c + jnp.arange(c, dtype=jnp.int32)) * block_size
    m_hi = jnp.minimum(len_ref[...] - 1 - window, num_keys - 1)
    # the block's middle count is > 0 (also right when no key is middle: m_hi < anchor)
    has = jnp.minimum(start + block_size - 1, m_hi) >= jnp.maximum(start, anchor)
    u = jnp.where(has[None, :], u, NEG_INF)
    if with_centre:
      cen = jnp.where(has[None, :], cen, NEG_INF)
  u_ref[...] = u
  if with_centre:
    c_ref[...] = cen
  if superblock:
    score = cen if with_centre else u
    sbmax_ref[...] = jnp.max(score.reshape(gp, c // superblock, superblock), axis=2)


def block_bounds(q, kmin, kmax, *, scale, slack, with_centre=False, kv_lengths=None,
                 block_size=None, anchor=0, window=0, superblock=None, chunk=128,
                 interpret=False, num_warps=4, num_stages=1):
  """Triton block bounds; semantics of reference.block_bounds.

  q [B, Hq, D] decode queries (unscaled); kmin, kmax [B, nb, K, D] per-block min / max
  summaries (nb divisible by 16, D a power of two >= 16; `chunk` shrinks to fit nb).
  Returns u [B, K, Gp, nb] float32, or the tuple (u, [centre], [superblock max]) (the
  superblock max [B, K, Gp, nb / X]; X a power of two dividing nb). Rows >= G: padding.
  NotImplementedError for shapes the kernel does not take (api.py then falls back).
  """
  check_backend(interpret)
  b, hq, d = q.shape
  nb, hkv = kmin.shape[1], kmin.shape[2]
  g = hq // hkv
  gp = max(16, next_pow2(g))
  c = min(chunk, nb & -nb)          # largest power of two dividing nb, at most chunk
  if c < 16 or d < 16 or d & (d - 1):
    raise NotImplementedError(f"num_blocks={nb}, head dim {d}: the bounds kernel needs "
                              "num_blocks divisible by 16 and a power-of-two head dim.")
  if superblock is not None:
    x = int(superblock)
    if x < 1 or x & (x - 1) or nb % x:
      raise NotImplementedError(f"superblock={superblock}: expected a power of two "
                                f"dividing num_blocks={nb}.")
    c = max(c, x)
  masked = kv_lengths is not None
  if masked and not block_size:
    raise ValueError("block_bounds: kv_lengths needs block_size (keys per block).")
  dt = jnp.promote_types(q.dtype, kmin.dtype)    # never round q or the summaries
  kernel = functools.partial(
      _bounds_kernel, scale=float(scale), slack=float(slack), precision=dot_precision(dt),
      dtype=dt, group=g, block_size=block_size, anchor=anchor, window=window,
      num_keys=nb * (block_size or 1), with_centre=with_centre, masked=masked,
      superblock=superblock)
  in_specs = [pl.BlockSpec((None, hq, d), lambda b_, h, i: (b_, 0, 0)),
              pl.BlockSpec((None, c, None, d), lambda b_, h, i: (b_, i, h, 0)),
              pl.BlockSpec((None, c, None, d), lambda b_, h, i: (b_, i, h, 0))]
  args = [q, kmin, kmax]
  if masked:
    in_specs.append(pl.BlockSpec((None,), lambda b_, h, i: (b_,)))
    args.append(jnp.asarray(kv_lengths, jnp.int32).reshape(b))
  out = pl.BlockSpec((None, None, gp, c), lambda b_, h, i: (b_, h, 0, i))
  shape = jax.ShapeDtypeStruct((b, hkv, gp, nb), jnp.float32)
  out_specs, out_shape = [out], [shape]
  if with_centre:
    out_specs.append(out)
    out_shape.append(shape)
  if superblock:
    out_specs.append(pl.BlockSpec((None, None, gp, c // superblock),
                                  lambda b_, h, i: (b_, h, 0, i)))
    out_shape.append(jax.ShapeDtypeStruct((b, hkv, gp, nb // superblock), jnp.float32))
  return pl.pallas_call(
      kernel, grid=(b, hkv, nb // c), in_specs=in_specs,
      out_specs=tuple(out_specs) if len(out_specs) > 1 else out,
      out_shape=tuple(out_shape) if len(out_shape) > 1 else shape,
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      name="condensate_block_bounds")(*args)
