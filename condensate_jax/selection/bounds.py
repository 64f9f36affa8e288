"""Score bounds from block summaries (DESIGN.md §4).

For a query q the score bound of block b
    U_b = scale * sum_d max(q_d * min_bd, q_d * max_bd)  >=  scale * q . k_j   (j in b)
is computed as q+ . max + q- . min (two matmuls over the summaries), plus a relative
slack that covers float32 rounding of both the bound and the exact score (so U_b bounds
every *computed* score, not only the real-valued one). The fast path's bounds kernel
(pallas_kernels/block_bounds) computes the same formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensate_jax.selection.summaries import BlockSummaries
from condensate_jax.softmax import HIGHEST
from condensate_jax.spec import CondensateSpec

def bound_slack(head_dim: int) -> float:
  """Relative slack of U_b: covers the float32 rounding of a D-term dot product (the
  exact score and the bound itself, gamma_D each, with truncating accumulation) and of the
  scale multiplication, with a factor 2 to spare. Applied to sum_d |q_d| |e_d| where e_d
  is the end of the box the bound picks (max where q_d >= 0, else min)."""
  return (8 * head_dim + 16) * 2.0**-24


def centre_radius(summ: BlockSummaries):
  """(c, r) float32 [B, nb, Hkv, D]: block centres (min + max) / 2 and radii
  (max - min) / 2; empty blocks get 0 (callers mask them)."""
  kmin = summ.kmin.astype(jnp.float32)
  kmax = summ.kmax.astype(jnp.float32)
  empty = ~(kmin <= kmax)
  return _centres(kmin, kmax), jnp.where(empty, 0.0, 0.5 * kmax - 0.5 * kmin)


def _centres(kmin, kmax):
  kmin = kmin.astype(jnp.float32)
  kmax = kmax.astype(jnp.float32)
  return jnp.where(~(kmin <= kmax), 0.0, 0.5 * kmin + 0.5 * kmax)


def block_bounds(q, summ: BlockSummaries, scale: float) -> jax.Array:
  """U [B, Hkv, G, T, nb] float32 for q [B, T, Hq, D] (empty blocks: meaningless):
  scale * (q+ . max + q- . min) + slack, the slack bound_slack(D) * scale *
  sum_d |q_d| |picked end_d| — the formula of the fast path's bounds kernel, so both
  rank blocks alike (a different slack would bias one toward blocks of large keys)."""
  return box_bounds(q, summ.kmin, summ.kmax, scale)


def box_bounds(q, kmin, kmax, scale: float) -> jax.Array:
  """`block_bounds` from the summary arrays kmin, kmax [B, nb, Hkv, D]."""
  b, t, hq, d = q.shape
  hkv = kmin.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
  qp, qn = jnp.maximum(qg, 0.0), jnp.minimum(qg, 0.0)
  kmin = kmin.astype(jnp.float32)
  kmax = kmax.astype(jnp.float32)

  def dot(a, k):
    return jnp.einsum("btkgd,bnkd->bkgtn", a, k, precision=HIGHEST)

  u = dot(qp, kmax) + dot(qn, kmin)
  a = dot(qp, jnp.abs(kmax)) - dot(qn, jnp.abs(kmin))
  sc = jnp.float32(scale)
  return sc * u + (jnp.float32(bound_slack(d)) * sc) * a


def block_centres(q, summ: BlockSummaries, scale: float) -> jax.Array:
  """scale * q . c_b [B, Hkv, G, T, nb] with c_b = (min + max) / 2: a ranking score for
  block_rank="centre", not a bound."""
  return box_centres(q, summ.kmin, summ.kmax, scale)


def box_centres(q, kmin, kmax, scale: float) -> jax.Array:
  """`block_centres` from the summary arrays kmin, kmax [B, nb, Hkv, D]."""
  b, t, hq, d = q.shape
  hkv = kmin.shape[2]
  qs = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d) * jnp.float32(scale)
  return jnp.einsum("btkgd,bnkd->bkgtn", qs, _centres(kmin, kmax), precision=HIGHEST)


def block_ranking(q, summ: BlockSummaries, scale: float, spec: CondensateSpec):
  """(u, rank): the bounds U [B, Hkv, G, T, nb] and the score blocks are ordered by (the
  bounds themselves unless spec.block_rank == "centre")."""
  u = block_bounds(q, summ, scale)
  return u, (block_centres(q, summ, scale) if spec.block_rank == "centre" else u)

