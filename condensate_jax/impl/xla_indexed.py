"""`selection="indexed"` in XLA: the specification of the indexed fast path.

Per query head: anchor + window as always; the middle keys are ranked by the key index's
estimate (`selection.index`), the best `spec.num_candidates` are scored exactly, and the
top_k of those (ties to the lower position, as in "exact") join the set. When the
candidates hold the exact top-k, the set is exact top-k's.

Certificate: every unselected middle key j is bounded by its exact score if it was a
candidate, else by the index's upper bound U_j = estimate + slack, so
    delta = sum_j exp(bound_j - m)  >=  the true dropped mass (unnormalised), and
    dropped_mass_bound = delta / (Z_set + delta)
bounds the dropped mass of the set actually chosen (not of exact top-k's).
`keys_scored` counts the visible anchor/window keys plus the candidates.

selection="certified" with bounds="index" (the default): the set grows by single middle
keys in the order of their index upper bound U_j (highest first, ties to the lower
position), each scored exactly and attended, until the certificate of the set meets
spec.epsilon: the smallest n >= min(top_k, middle keys) with
    delta_n / (Z_n + delta_n) <= epsilon,   delta_n = sum of exp(U_j) over the keys after
the first n, Z_n = the set's exact mass. eps falls monotonically in n (Z_n grows, delta_n
shrinks) and reaches 0 when every middle key is in, so n exists; n is found from a
cumulative sum (chosen against 0.999 * epsilon, so that the rounding of the sums does
not make the reported eps, computed afterwards like "indexed"'s, exceed the target at
ordinary score magnitudes; at |scores| ~ 3e4 the certificate's own float32 rounding can
still put it up to ~0.05% above), and
`keys_scored` = `set_size` = the visible anchor/window keys + n, per query. Keys whose
bound is NaN (a broken index entry) are ranked last and never counted as certified: a
set that leaves one out reports eps NaN.

The specification computes every score (for the output and the stats); the selection
reads only the index and the candidates' scores.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from condensate_jax import geometry, softmax
from condensate_jax.selection import exact
from condensate_jax.selection import index as index_lib
from condensate_jax.softmax import NEG_INF

LOG_MARGIN = 1e-4   # log delta += this: see `certificate`


class Indexed(NamedTuple):
  """What the indexed selection of a call produced."""
  in_set: jax.Array            # [B, K, G, T, S] bool: the set
  candidates: jax.Array        # [B, K, G, T, S] bool: middle keys scored exactly
  bound_unselected: jax.Array  # [B, K, G, T, S]: bound of each unselected middle key
  n_static: jax.Array          # [B, 1, 1, T] int32: visible anchor + window keys


def select(scores, q, index, lo, hi, spec, scale, top_fn=None) -> Indexed:
  """The indexed set of every (query head, query) and its certificate terms. top_fn:
  the top-k selections (None: lax.top_k; see `exact.exact_top_k`)."""
  num_keys = scores.shape[-1]
  masks = geometry.static_masks(lo, hi, num_keys, spec)
  middle = jnp.broadcast_to(masks.middle, scores.shape)
  est, slack = index_lib.index_bounds(q, index, scale)
  c = min(spec.num_candidates, num_keys)
  by_est = jnp.where(middle, est, NEG_INF)                                   # by estimate
  top = jax.lax.top_k(by_est, c)[1] if top_fn is None else top_fn(by_est, c)[0]
  picked = jnp.put_along_axis(jnp.zeros(scores.shape, bool), top, True, axis=-1,
                              inplace=False)
  candidates = picked & middle
  topk = exact.exact_top_k(scores, candidates, spec.top_k, top_fn=top_fn)
  chosen = exact.topk_mask(topk, num_keys) & candidates
  in_set = masks.anchor | masks.window | chosen
  bound = jnp.where(candidates, scores, est + slack)
  bound_unselected = jnp.where(middle & ~in_set, bound, NEG_INF)
  n_static = jnp.sum((masks.anchor | masks.window), axis=-1, dtype=jnp.int32)
  return Indexed(in_set, candidates, bound_unselected, n_static)


# "certified": the set is chosen against this fraction of epsilon (module docstring)
_CHOICE_MARGIN = 0.999


def select_certified(scores, q, index, lo, hi, spec, scale) -> Indexed:
  """The "certified" set on the index bounds of every (query head, query) (module
  docstring): anchor + window + the first n middle keys in bound order."""
  num_keys = scores.shape[-1]
  masks = geometry.static_masks(lo, hi, num_keys, spec)
  middle = jnp.broadcast_to(masks.middle, scores.shape)
  static = jnp.broadcast_to(masks.anchor | masks.window, scores.shape)
  est, slack = index_lib.index_bounds(q, index, scale)
  ub = jnp.where(middle, est + slack, NEG_INF)
  # bound order: highest first, ties to the lower position, NaN last
  order = jnp.argsort(jnp.where(jnp.isnan(ub), jnp.inf, -ub), axis=-1, stable=True)
  ub_o = jnp.take_along_axis(ub, order, axis=-1)
  s_o = jnp.take_along_axis(scores, order, axis=-1)
  live = jnp.take_along_axis(middle, order, axis=-1) & jnp.isfinite(ub_o)
  # log z_in[n], log d_out[n] for n = 0 .. S: the set's mass with the first n keys, the
  # bound of the rest, as log-space cumulative sums (no underflow when the bounds are
  # loose by more than float32's exponent range, no cancellation when the rest is tiny),
  # relative to the row's largest term m (static scores and bounds; the bounds lie above
  # the scores), so that scores ~1e4 (float32 ulp ~1e-3, the choice margin) still compare.
  m = jnp.maximum(jnp.max(jnp.where(static, scores, NEG_INF), axis=-1, keepdims=True),
                  jnp.max(jnp.where(live, ub_o, NEG_INF), axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  lz_static = jax.nn.logsumexp(jnp.where(static, scores - m, NEG_INF), axis=-1,
                               keepdims=True)
  lz_static = jnp.where(jnp.isnan(lz_static), NEG_INF, lz_static)   # no static key
  none = jnp.full(lz_static.shape, NEG_INF, jnp.float32)
  lz_in = jnp.logaddexp(lz_static, jnp.concatenate(
      [none, jax.lax.cumlogsumexp(jnp.where(live, s_o - m, NEG_INF), axis=s_o.ndim - 1)],
      -1))
  ld_out = jnp.concatenate([jax.lax.cumlogsumexp(jnp.where(live, ub_o - m, NEG_INF),
                                                 axis=ub_o.ndim - 1, reverse=True), none],
                           -1)
  n_live = jnp.sum(live, axis=-1)
  steps = jnp.arange(num_keys + 1)
  target = _CHOICE_MARGIN * spec.epsilon
  # d / (z + d) <= target  <=>  log d - log z <= logit(target)
  ok = (ld_out - lz_in <= jnp.float32(math.log(target / (1.0 - target)))) & (
      steps >= jnp.minimum(spec.top_k, n_live)[..., None])
  ok = ok | (steps >= n_live[..., None])       # every bounded key in: nothing left
  n = jnp.argmax(ok, axis=-1)                  # the first n that holds
  take_o = (jnp.arange(num_keys) < n[..., None]) & live
  chosen = jnp.put_along_axis(jnp.zeros(scores.shape, bool), order, take_o, axis=-1,
                              inplace=False)
  in_set = static | chosen
  bound_unselected = jnp.where(in_set, NEG_INF, ub)
  n_static = jnp.sum((masks.anchor | masks.window), axis=-1, dtype=jnp.int32)
  return Indexed(in_set, chosen, bound_unselected, n_static)


def certificate(scores, sel: Indexed):
  """eps [B, K, G, T] = delta / (Z_set + delta) from the set's exact scores and the
  unselected keys' bounds (module docstring)."""
  m_c, z_c = softmax.masked_lse(scores, sel.in_set)
  lse = jnp.where(z_c > 0, m_c + jnp.log(jnp.where(z_c > 0, z_c, 1.0)), NEG_INF)
  # + 1e-4: delta inflated by 0.01% so that float rounding of the two sums (this one
  # and the true dropped mass's) cannot put the bound below the truth (seen: 3e-6)
  log_delta = jax.nn.logsumexp(sel.bound_unselected, axis=-1) + jnp.float32(LOG_MARGIN)
  log_delta = jnp.where(jnp.all(jnp.isneginf(sel.bound_unselected), axis=-1), NEG_INF,
                        log_delta)
  return softmax.log_delta_to_eps(log_delta, lse)


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def condensate_xla_indexed(q, k, v, q_positions, kv_lengths, *, spec, causal,
                           sliding_window, scale, return_stats, index=None):
  return indexed_attention(q, k, v, q_positions, kv_lengths, spec=spec, causal=causal,
                           sliding_window=sliding_window, scale=scale,
                           return_stats=return_stats, index=index)


def indexed_attention(q, k, v, q_positions, kv_lengths, *, spec, causal, sliding_window,
                      scale, return_stats, index=None, top_fn=None):
  """The body of `condensate_xla_indexed` (traceable); top_fn: "indexed"'s top-k
  selections (`select`; "certified" has none)."""
  if index is None:
    index = index_lib.build(k, kv_lengths, spec.index_bits)
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=causal,
                                  sliding_window=sliding_window)
  scores = softmax.scores(q, k, scale)
  if spec.selection == "certified":
    sel = select_certified(scores, q, index, lo, hi, spec, scale)
  else:
    sel = select(scores, q, index, lo, hi, spec, scale, top_fn)
  out = softmax.masked_softmax(scores, sel.in_set, v, q.dtype)
  if not return_stats:
    return out
  visible = geometry.static_masks(lo, hi, k.shape[1], spec).visible
  scored = sel.n_static + jnp.sum(sel.candidates, axis=-1, dtype=jnp.int32)
  return out, softmax.mass_stats(scores, sel.in_set, visible, certificate(scores, sel),
                                 scored)
