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
+ acc[:, 2 Gp + g])). Products of bfloat16 are exact in float32; the part split leaves
2^-24 |qs_i| per channel, and a D-term float32 accumulation that truncates instead of
rounding (tensor cores align the products and truncate: Fasi et al., "Numerical behavior
of NVIDIA tensor cores", PeerJ CS 2021, measured on V100, T4 and A100; Hopper's
accumulation is not characterised there) errs by at most about D 2^-23 of
sum_i |qs_i| |c_i| -- inside the index's slack (`selection.bounds.bound_slack`, (8 D + 16)
2^-24 of the same sum: two D-term dots with truncating accumulation, times 2) but using
most of its factor-2 margin. The estimate is not bit-identical to reference.py's float32
sums (another order and rounding); sets match except between estimates within that
rounding. Not the default (api.py): opt in with implementation="triton_mma" (the step's
scan="triton_mma") until its bound is checked on the GPU under jit.

Needs a packed width D' >= 16 (a dot's smallest side) and Gp a power of two;
NotImplementedError otherwise (api.py falls back to gpu_triton.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse.triton_common import NEG_INF, check_backend
from pallas_kernels.index_scan import gpu_triton
from pallas_kernels.index_scan.reference import levels

PARTS = 3


def split_parts(x):
  """x float32 -> PARTS bfloat16 arrays whose float32 sum is x to within 2^-24 |x| (each
  part the bfloat16 rounding of what the parts before it leave). The rounding goes
  through `lax.reduce_precision`: a plain f32 -> bf16 -> f32 convert pair may be folded
  away by XLA's GPU pipeline (excess precision allowed), which would leave the later
  parts 0 under jit."""
  parts, rest = [], x.astype(jnp.float32)
  for _ in range(PARTS):
    p = jax.lax.reduce_precision(rest, exponent_bits=8, mantissa_bits=7)   # bf16 values
    parts.append(p.astype(jnp.bfloat16))                                    # exact
    rest = rest - p
  return parts


def _kernel(qt_ref, qmu_ref, packed_ref, step_ref, len_ref, est_ref, *, scale, bits,
            group, anchor, window):
  # qt_ref     [D, Np]   bfloat16 parts of q * sigma, column t * Gp + g (others 0)
  # qmu_ref    [Gp]      float32 q . mu
  # packed_ref [P, D']   uint8 codes of P consecutive keys
  # step_ref   [P]       float32
  # len_ref    []        int32 kv length of the row
  # est_ref    [Gp, P]   float32 output (-inf: not a middle key, or a padding row)
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
  est_ref[...] = jnp.where(middle[:, None] & real, est, NEG_INF).T


def index_scan(qs, qmu, packed, step, kv_lengths, *, scale, bits, group, anchor, window,
               block_keys=128, interpret=False, num_warps=4, num_stages=2):
  """Tensor-core index scan; semantics of reference.index_scan up to the rounding the
  module docstring bounds. Needs S divisible by 16, Gp a power of two and a packed width
  D' = D * bits / 8 >= 16, a power of two; NotImplementedError otherwise."""
  check_backend(interpret)
  b, hkv, gp, d = qs.shape
  s, dp = packed.shape[2], packed.shape[3]
  p = min(1 << (max(int(block_keys), 1).bit_length() - 1), s & -s)
  if p < 16 or gp & (gp - 1) or dp & (dp - 1) or dp < 16:
    raise NotImplementedError(
        f"S={s}, Gp={gp}, packed width {dp}: the tensor-core index scan needs S divisible "
        "by 16, a power-of-two Gp and a power-of-two packed width >= 16.")
  n_cols = max(16, (PARTS + 1) * gp)              # a power of two: Gp-wide column groups
  parts = split_parts(qs)                                            # [B, K, Gp, D] each
  qt = jnp.concatenate(parts + [jnp.zeros_like(parts[0])] * (n_cols // gp - PARTS),
                       axis=2)                                       # [B, K, Np, D]
  qt = qt.transpose(0, 1, 3, 2)                                      # [B, K, D, Np]
  kernel = functools.partial(_kernel, scale=float(scale), bits=int(bits),
                             group=int(group), anchor=int(anchor), window=int(window))
  return gpu_triton.scan_call(kernel, qt, qmu, packed, step, kv_lengths, p=p,
                              name="condensate_index_scan_mma", interpret=interpret,
                              num_warps=num_warps, num_stages=num_stages)
