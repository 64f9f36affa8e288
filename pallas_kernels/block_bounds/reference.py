"""Block bounds, reference (plain jnp): the spec of the op.

Inputs: decode queries q [B, Hq, D] (one per batch row, unscaled) and per-block key
summaries kmin, kmax [B, nb, K, D]: the elementwise min / max of the keys of each block
of each K/V head (an empty block has min > max, e.g. +inf / -inf). Query head k*G + g
(G = Hq / K) belongs to K/V head k. With q+ = max(q, 0), q- = min(q, 0):

  u[b, k, g, n] = scale * (q+ . kmax + q- . kmin)
                  + slack * scale * (q+ . |kmax| - q- . |kmin|)

The first term is sum_d max(q_d kmin_d, q_d kmax_d) >= q . key for every key of block n;
the second, slack times sum_d |q_d| |picked end_d|, covers float rounding (the caller
picks slack). float32, shape [B, K, Gp, nb] with Gp = max(16, next_pow2(G)): rows
g >= G are padding (the kernel's tile rows; here the same formula for zero query rows,
so 0, or -inf where masked); they are not part of the contract.

with_centre: also centre[b, k, g, n] = scale * q . (kmin + kmax) / 2 (a ranking score,
  not a bound).
Empty blocks: u and centre are NaN (0 * inf in the products, as in the kernel's dots)
  unless masked; callers mask them, e.g. by kv_lengths.
kv_lengths [B] (needs block_size P; anchor, window): the decode query of row b sits at
  position len_b - 1; its middle keys are the positions anchor .. m_hi with
  m_hi = min(len_b - 1 - window, nb * P - 1). A block n (keys nP .. nP + P - 1) holding
  none of them, i.e. min(nP + P - 1, m_hi) < max(nP, anchor), gets u = centre = -inf.
superblock X (dividing nb): also the max of the ranking score (centre with with_centre,
  else u; after masking) over each run of X consecutive blocks, [B, K, Gp, nb / X].
Returns u, or the tuple (u, [centre], [superblock max]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.util import next_pow2

_HIGHEST = jax.lax.Precision.HIGHEST
NEG_INF = float("-inf")


def block_bounds(q, kmin, kmax, *, scale, slack, with_centre=False, kv_lengths=None,
                 block_size=None, anchor=0, window=0, superblock=None):
  b, hq, d = q.shape
  nb, hkv = kmin.shape[1], kmin.shape[2]
  g = hq // hkv
  gp = max(16, next_pow2(g))
  if kv_lengths is not None and not block_size:
    raise ValueError("block_bounds: kv_lengths needs block_size (keys per block).")
  if superblock is not None and not (int(superblock) >= 1 and nb % int(superblock) == 0):
    raise ValueError(f"superblock={superblock}: expected a divisor of num_blocks={nb}.")
  qg = q.astype(jnp.float32).reshape(b, hkv, g, d)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))          # zero padding rows
  qp, qn = jnp.maximum(qg, 0.0), jnp.minimum(qg, 0.0)
  mn, mx = kmin.astype(jnp.float32), kmax.astype(jnp.float32)

  def dot(a, keys):
    return jnp.einsum("bkgd,bnkd->bkgn", a, keys, precision=_HIGHEST)

  sc = jnp.float32(scale)
  u = sc * (dot(qp, mx) + dot(qn, mn)) + jnp.float32(slack * scale) * (
      dot(qp, jnp.abs(mx)) - dot(qn, jnp.abs(mn)))
  centre = sc * dot(qp + qn, 0.5 * (mn + mx)) if with_centre else None
  if kv_lengths is not None:
    p = int(block_size)
    start = jnp.arange(nb, dtype=jnp.int32) * p
    m_hi = jnp.minimum(jnp.asarray(kv_lengths, jnp.int32).reshape(b, 1) - 1 - window,
                       nb * p - 1)
    has = (jnp.minimum(start + p - 1, m_hi) >= jnp.maximum(start, anchor))[:, None, None]
    u = jnp.where(has, u, NEG_INF)
    if with_centre:
      centre = jnp.where(has, centre, NEG_INF)
  outs = [u] + ([centre] if with_centre else [])
  if superblock is not None:
    x = int(superblock)
    score = centre if with_centre else u
    outs.append(jnp.max(score.reshape(b, hkv, gp, nb // x, x), axis=-1))
  return tuple(outs) if len(outs) > 1 else u
