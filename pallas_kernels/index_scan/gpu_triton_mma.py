"""Index scan, GPU backend on tensor cores: `pallas_call` lowered through Triton, the codes
scored by bf16 dots with float32 accumulation.

One program per (batch b, K/V head k, tile i of P consecutive keys), as gpu_triton.py, but
the group's estimates come from matrix products: the signed codes are small integers
(|c| <= 2^(bits-1) - 1 <= 127), exact in bfloat16, and q * sigma is split into three
bfloat16 parts hi + mid + lo (each the bfloat16 rounding of what the parts before it
leave: 24 bits of mantissa in all, the float32 value to within 2^-24 relative), so

  acc[p, j] = sum_i c[p, i] * part[j][i]     (the Np columns: part t, head g at t * Gp + g)

is a [P, D'] x [D', Np] bfloat16 product per packed slice, accumulated in float32 on the
tensor cores, and est_g = scale * (qmu_g + step_p * (acc[:, g] + acc[:, Gp + g]
+ acc[:, 2 Gp + g])). Products of bfloat16 are exact in float32; the accumulation and the
part split round within a few units of 2^-24 of sum_i |qs_i| |c_i| (tensor cores align and
truncate rather than round: Fasi et al., "Numerical behavior of NVIDIA tensor cores",
PeerJ CS 2021), which the index's slack covers (`selection.bounds.bound_slack`: the float32
rounding of two D-term dots with truncating accumulation, times 2). The estimate is not
bit-identical to reference.py's float32 sums (a different order and rounding); sets match
except between estimates within that rounding.

Needs a packed width D' >= 16 (a dot's smallest side) and Gp a power of two;
NotImplementedError otherwise (api.py falls back to gpu_triton.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.block_sparse.triton_common import NEG_INF, check_backend
from pallas_kernels.index_scan.reference import levels

PARTS = 3


def split_parts(x):
  """x float32 -> PARTS bfloat16 arrays whose float32 sum is x to within 2^-24 |x|."""
  parts, rest = [], x.astype(jnp.float32)
  for _ in range(PARTS):
    p = rest.astype(jnp.bfloat16)
    parts.append(p)
    rest = rest - p.astype(jnp.float32)
  return parts


def _kernel(qt_ref, qmu_ref, packed_ref, step_ref, len_ref, *rest, scale, bits, group,
            anchor, window, chunk):
  # qt_ref     [D, Np]   bfloat16 parts of q * sigma, column t * Gp + g (others 0)
  # qmu_ref    [Gp]      float32 q . mu
  # packed_ref [P, D']   uint8 codes of P consecutive keys
  # step_ref   [P]       float32
  # len_ref    []        int32 kv length of the row
  # with chunk: err_ref [P] float32, a_ref [3, Gp] float32 (a_err, a_step, a_one)
  # est_ref    [Gp, P]   float32 output (-inf: not a middle key, or a padding row)
  # with chunk: cmax_ref, clse_ref [Gp, P / chunk] (reference.chunk_stats)
  if chunk:
    err_ref, a_ref, est_ref, cmax_ref, clse_ref = rest
  else:
    (est_ref,) = rest
  gp, p = est_ref.shape
  dp = packed_ref.shape[1]
  n_cols = qt_ref.shape[1]
  x = packed_ref[...].astype(jnp.int32)
  mask, lv = (1 << bits) - 1, levels(bits)
  acc = jnp.zeros((p, n_cols), jnp.float32)
  for n in range(8 // bits):
    c = (((x >> (n * bits)) & mask) - lv).astype(jnp.float32).astype(jnp.bfloat16)
    acc += jnp.dot(c, qt_ref[pl.ds(n * dp, dp), :], preferred_element_type=jnp.float32)
  cols = jnp.split(acc, n_cols // gp, axis=1)                       # [P, Gp] each
  dot = cols[0] + cols[1] + cols[2]                                  # hi + mid + lo
  step = step_ref[...]
  pos = pl.program_id(2) * p + jnp.arange(p, dtype=jnp.int32)
  middle = (pos >= anchor) & (pos <= len_ref[...] - 1 - window)
  est = scale * (qmu_ref[...][None, :] + step[:, None] * dot)       # [P, Gp]
  real = jnp.arange(gp, dtype=jnp.int32)[None, :] < group
  live = middle[:, None] & real
  est = jnp.where(live, est, NEG_INF)
  est_ref[...] = est.T
  if not chunk:
    return
  a = a_ref[...]
  upper = est + a[0][None, :] * err_ref[...][:, None] + a[1][None, :] * step[:, None]
  upper = jnp.where(live, upper + a[2][None, :], NEG_INF)
  shape = (p // chunk, chunk, gp)
  e = est.reshape(shape)
  has_nan = jnp.sum(jnp.isnan(e).astype(jnp.int32), axis=1) > 0
  cmax_ref[...] = jnp.where(has_nan, jnp.nan, jnp.max(e, axis=1)).T
  u = upper.reshape(shape)
  m = jnp.max(u, axis=1)                                             # [P / chunk, Gp]
  m_use = jnp.where(jnp.isneginf(m) | jnp.isnan(m), 0.0, m)
  total = jnp.sum(jnp.exp(u - m_use[:, None, :]), axis=1)           # NaN stays NaN
  clse_ref[...] = jnp.where(jnp.isneginf(m), NEG_INF, m_use + jnp.log(total)).T


def _call(qs, qmu, packed, step, kv_lengths, extra, *, scale, bits, group, anchor,
          window, chunk, block_keys, interpret, num_warps, num_stages):
  check_backend(interpret)
  b, hkv, gp, d = qs.shape
  s, dp = packed.shape[2], packed.shape[3]
  p = min(1 << (max(int(block_keys), int(chunk or 1), 1).bit_length() - 1), s & -s)
  if p < 16 or gp & (gp - 1) or dp & (dp - 1) or dp < 16 or (chunk and p % chunk):
    raise NotImplementedError(
        f"S={s}, Gp={gp}, packed width {dp}, chunk {chunk}: the tensor-core index scan "
        "needs S divisible by 16 and by the chunk, a power-of-two Gp and a power-of-two "
        "packed width >= 16.")
  n_cols = max(16, (PARTS + 1) * gp)              # a power of two: Gp-wide column groups
  parts = split_parts(qs)                                            # [B, K, Gp, D] each
  qt = jnp.concatenate(parts + [jnp.zeros_like(parts[0])] * (n_cols // gp - PARTS),
                       axis=2)                                       # [B, K, Np, D]
  qt = qt.transpose(0, 1, 3, 2)                                      # [B, K, D, Np]
  kernel = functools.partial(_kernel, scale=float(scale), bits=int(bits),
                             group=int(group), anchor=int(anchor), window=int(window),
                             chunk=int(chunk or 0))
  keys = lambda b_, h, i: (b_, h, i)
  in_specs = [pl.BlockSpec((None, None, d, n_cols), lambda b_, h, i: (b_, h, 0, 0)),
              pl.BlockSpec((None, None, gp), lambda b_, h, i: (b_, h, 0)),
              pl.BlockSpec((None, None, p, dp), lambda b_, h, i: (b_, h, i, 0)),
              pl.BlockSpec((None, None, p), keys),
              pl.BlockSpec((None,), lambda b_, h, i: (b_,))]
  args = [qt, qmu.astype(jnp.float32), packed, step.astype(jnp.float32),
          jnp.asarray(kv_lengths, jnp.int32).reshape(b)]
  out_specs = [pl.BlockSpec((None, None, gp, p), lambda b_, h, i: (b_, h, 0, i))]
  out_shape = [jax.ShapeDtypeStruct((b, hkv, gp, s), jnp.float32)]
  if chunk:
    err, a_err, a_step, a_one = extra
    in_specs += [pl.BlockSpec((None, None, p), keys),
                 pl.BlockSpec((None, None, 3, gp), lambda b_, h, i: (b_, h, 0, 0))]
    args += [err.astype(jnp.float32),
             jnp.stack([a_err, a_step, a_one], axis=2).astype(jnp.float32)]
    stat = pl.BlockSpec((None, None, gp, p // chunk), lambda b_, h, i: (b_, h, 0, i))
    out_specs += [stat, stat]
    out_shape += [jax.ShapeDtypeStruct((b, hkv, gp, s // chunk), jnp.float32)] * 2
  return pl.pallas_call(
      kernel, grid=(b, hkv, s // p), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      name="condensate_index_scan_mma")(*args)


def index_scan(qs, qmu, packed, step, kv_lengths, *, scale, bits, group, anchor, window,
               block_keys=128, interpret=False, num_warps=4, num_stages=2):
  """Tensor-core index scan; semantics of reference.index_scan up to the rounding the
  module docstring bounds. Needs S divisible by 16, Gp a power of two and a packed width
  D' = D * bits / 8 >= 16, a power of two; NotImplementedError otherwise."""
  (est,) = _call(qs, qmu, packed, step, kv_lengths, None, scale=scale, bits=bits,
                 group=group, anchor=anchor, window=window, chunk=None,
                 block_keys=block_keys, interpret=interpret, num_warps=num_warps,
                 num_stages=num_stages)
  return est


def index_scan_chunks(qs, qmu, packed, step, err, a_err, a_step, a_one, kv_lengths, *,
                      scale, bits, group, anchor, window, chunk, block_keys=128,
                      interpret=False, num_warps=4, num_stages=2):
  """(est, cmax, clse) of reference.index_scan_chunks in one pass over the index (the
  chunk statistics from the tile in registers, the estimates' rounding as index_scan's).
  The tile holds whole chunks (P = max(block_keys, chunk))."""
  return tuple(_call(qs, qmu, packed, step, kv_lengths, (err, a_err, a_step, a_one),
                     scale=scale, bits=bits, group=group, anchor=anchor, window=window,
                     chunk=chunk, block_keys=block_keys, interpret=interpret,
                     num_warps=num_warps, num_stages=num_stages))
