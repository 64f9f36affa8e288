"""Softmax arithmetic in float32: masked softmax, log-sum-exp, merging partial results,
the certified eps from log delta, and the attention statistics.

The only home of this arithmetic in condensate_jax. Conventions: an empty set has
lse = -inf and output 0; reductions take the max over -inf as 0 (no NaN from -inf - -inf).
Shapes follow `selection/exact.py`: scores [B, K, G, T, S], per-query results [B, K, G, T].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")
HIGHEST = jax.lax.Precision.HIGHEST


class AttentionStats(NamedTuple):
  """Per (batch, query head, query) statistics, each [B, Hq, T].

  captured_mass: dense softmax probability of the set (from all scores).
  dropped_mass: 1 - captured_mass, computed directly (accurate when tiny).
  dropped_mass_bound: certified bound on dropped_mass, from the set alone plus the
    top-k threshold (DESIGN.md §1); 0 when nothing was dropped.
  set_size: keys in the set. visible: keys the query may see.
  keys_scored: keys whose score the selection computed ("exact": all visible).
  """
  captured_mass: jax.Array
  dropped_mass: jax.Array
  dropped_mass_bound: jax.Array
  set_size: jax.Array
  visible: jax.Array
  keys_scored: jax.Array


def scores(q, k, scale):
  """q [B,T,Hq,D], k [B,S,K,D] -> scores [B,K,G,T,S] float32."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                 precision=HIGHEST)
  return s * jnp.float32(scale)


def masked_softmax(scores, mask, v, out_dtype):
  """softmax(scores | mask) @ v; rows with an empty mask give 0. Returns [B,T,Hq,D].

  The optimization barrier makes the dense and the condensate graphs hand this function
  the same materialised operands (full-shape float32 scores, full-shape bool mask, v):
  without it XLA fuses the mask (and on GPU the score scaling) differently into each
  graph, and on GPU the covers-everything outputs drifted from dense by ~1e-6 (seen on an
  H200, jax 0.11.2). With it both graphs compile this part to the same kernels.
  """
  mask = jnp.broadcast_to(mask, scores.shape)
  scores, mask, v = jax.lax.optimization_barrier((scores, mask, v))
  s = jnp.where(mask, scores, NEG_INF)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(jnp.float32), precision=HIGHEST)
  o = o / jnp.where(l > 0, l, 1.0)[..., None]
  b, hkv, g, t, d = o.shape
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d).astype(out_dtype)
  # Fenced on the way out too. Seen on an H200 (jax 0.11.2): Gemma 3 270M at 8064 tokens,
  # the covers-everything logits are bitwise dense without stats but only 1e-4 of rows
  # with return_stats=True, where condensate_attention also reads the output (its
  # overflow check) and XLA may fuse the product's epilogue differently. This barrier
  # gives the epilogue one consumer in every graph; that it restores bitwise equality
  # there is NOT yet verified on a GPU (experiments/bench/coverage_gate.py checks it).
  return jax.lax.optimization_barrier(out)


def heads_last(x):
  """[B, K, G, T] -> [B, Hq, T]."""
  b, hkv, g, t = x.shape
  return x.reshape(b, hkv * g, t)


def heads_to_tokens(o):
  """[B, K, G, T, D] -> [B, T, Hq, D]."""
  b, hkv, g, t, d = o.shape
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d)


def gather_rows(x, idx):
  """x [B, S, K, D], idx [B, K or 1, ...] key positions -> rows [B, K, ..., D]."""
  b, _, hkv, d = x.shape
  idx = jnp.broadcast_to(idx, (b, hkv) + idx.shape[2:])
  flat = idx.reshape(b, hkv, -1, 1)
  rows = jnp.take_along_axis(x.transpose(0, 2, 1, 3), flat, axis=2)
  return rows.reshape(idx.shape + (d,))


def masked_lse(scores, mask):
  """(m, z) over the last axis within `mask`: m the max (0 where the set is empty) and
  z = sum exp(s - m)."""
  s = jnp.where(mask, scores, NEG_INF)
  m = jnp.max(s, axis=-1)
  m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
  z = jnp.sum(jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0), axis=-1)
  return m_safe, z


def lse_of(m, l):
  """log(l) + m of an online softmax's running max m and sum l; -inf where l == 0."""
  return jnp.where(l > 0, jnp.where(jnp.isneginf(m), 0.0, m) + jnp.log(
      jnp.where(l > 0, l, 1.0)), NEG_INF)


def log_delta_to_eps(log_delta, lse):
  """eps = delta / (Z_C + delta) from log delta and lse = log Z_C (same reference)."""
  eps = jax.nn.sigmoid(log_delta - jnp.where(jnp.isneginf(lse), 0.0, lse))
  eps = jnp.where(jnp.isneginf(lse), 1.0, eps)
  # a finite delta never reads 0: float32's sigmoid flushes below ~1e-38, and eps = 0 must
  # mean that nothing was dropped (the smallest normal float32 bounds the truth instead)
  eps = jnp.where(jnp.isfinite(log_delta), jnp.maximum(eps, jnp.finfo(jnp.float32).tiny),
                  eps)
  return jnp.where(jnp.isneginf(log_delta), 0.0, eps)


def merge_partial(o_acc, lse_acc, o_j, lse_j, take):
  """Adds a normalised partial (o_j, lse_j) to (o_acc, lse_acc) where `take` [.., G, T]."""
  lse_new = jnp.logaddexp(lse_acc, lse_j)
  ref = jnp.where(jnp.isneginf(lse_new), 0.0, lse_new)
  w_acc = jnp.where(jnp.isneginf(lse_acc), 0.0, jnp.exp(lse_acc - ref))
  w_j = jnp.where(jnp.isneginf(lse_j), 0.0, jnp.exp(lse_j - ref))
  o_new = w_acc[..., None] * o_acc + w_j[..., None] * o_j
  return (jnp.where(take[..., None], o_new, o_acc), jnp.where(take, lse_new, lse_acc))


def combine_splits(o, lse):
  """Split-K merge of normalised partials o [..., NS, D], lse [..., NS] -> (o, lse)."""
  lse_tot = jax.nn.logsumexp(lse, axis=-1)
  # only all-empty splits give -inf; a NaN partial keeps the total NaN
  lse_tot = jnp.where(jnp.all(jnp.isneginf(lse), axis=-1), NEG_INF, lse_tot)
  w = jnp.where(jnp.isneginf(lse), 0.0,
                jnp.exp(lse - jnp.where(jnp.isneginf(lse_tot), 0.0, lse_tot)[..., None]))
  return jnp.sum(w[..., None] * o, axis=-2), lse_tot


def mass_stats(scores, in_set, visible, eps, scored) -> AttentionStats:
  """AttentionStats [B, Hq, T] from scores [B, K, G, T, S], the set and visible masks,
  the certified eps [B, K, G, T] and the keys scored (broadcastable to [B, K, G, T]).
  Non-finite scores among the visible keys give NaN masses."""
  visible = jnp.broadcast_to(visible, scores.shape)
  captured, dropped = mass_split(scores, in_set, visible)
  set_size = jnp.sum(in_set & visible, -1, dtype=jnp.int32)
  n_visible = jnp.sum(visible, -1, dtype=jnp.int32)
  scored = jnp.broadcast_to(scored, set_size.shape)
  h = heads_last
  return AttentionStats(h(captured), h(dropped), h(eps), h(set_size), h(n_visible),
                        h(scored))


def mass_split(scores, in_set, visible):
  """(captured, dropped) [B, K, G, T]: the dense softmax mass over `visible` of the keys
  in `in_set` and of the others, each summed directly (accurate when tiny); 1 / 0 where
  nothing is visible, NaN where a visible score is not finite.

  z_all is the sum of the two parts, so captured + dropped = 1 and captured <= 1 even
  where XLA evaluates exp(s - m) in each reduction differently (seen on CPU: at scale
  1e5 a fused multiply-add put s - m an ulp of the score above 0, captured 1.027; at
  1e10 exp overflowed); exp(min(s - m, 0)) keeps each term <= 1 (s <= m exactly)."""
  m, _ = masked_lse(scores, visible)
  e = jnp.where(visible, jnp.exp(jnp.minimum(scores - m[..., None], 0.0)), 0.0)
  z_set = jnp.sum(jnp.where(in_set, e, 0.0), -1)
  z_drop = jnp.sum(jnp.where(in_set, 0.0, e), -1)
  z_all = z_set + z_drop
  safe = jnp.where(z_all > 0, z_all, 1.0)
  bad = jnp.any(visible & ~jnp.isfinite(scores), -1)
  captured = jnp.where(bad, jnp.nan, jnp.where(z_all > 0, z_set / safe, 1.0))
  dropped = jnp.where(bad, jnp.nan, jnp.where(z_all > 0, z_drop / safe, 0.0))
  return captured, dropped
