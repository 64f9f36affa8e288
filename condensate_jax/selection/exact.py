"""Exact top-k selection and its certificate (DESIGN.md §1), in plain jnp.

Shapes (axis letters, see `condensate_jax/glossary.py`):
  scores  [B, K, G, T, S]  float32: query head h = k * G + g, key position s
  lo, hi  [B, T]           int32: the visible keys of query t are lo..hi (inclusive);
                                  hi < lo means none
Every function here is traceable (no Python control flow on values), so it runs under jit.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from condensate_jax import geometry
from condensate_jax.softmax import NEG_INF, AttentionStats, mass_split, masked_lse
from condensate_jax.spec import CondensateSpec


class TopK(NamedTuple):
  indices: jax.Array   # [B, K, G, T, k'] int32 key positions, k' = min(top_k, S)
  valid: jax.Array     # [B, K, G, T, k'] bool: the index is a selected middle key
  tau: jax.Array       # [B, K, G, T] float32: every dropped middle score is <= tau
  n_dropped: jax.Array  # [B, 1, 1, T] int32: middle keys not selected


def exact_top_k(scores: jax.Array, middle: jax.Array, top_k,
                capacity: Optional[int] = None, top_fn=None) -> TopK:
  """Per-head exact top-k of the middle keys; ties go to the lower position.

  `lax.top_k` is stable: among equal values it returns the lower index first, which is
  exactly the tie rule of DESIGN.md §1 (tested against a NumPy stable sort).

  top_fn: None (lax.top_k), or fn(x, k) -> (indices [..., k], tau [...]) returning the
  set lax.top_k(x, k) picks (in any order) and its k-th value, e.g. the Pallas selection
  `pallas_kernels.top_select.api.top_set` (`impl.pallas_select`): the same TopK up to the
  order of its indices (tau differs only where a row's picks hold a NaN: the k-th in
  the total order against min(values)). Not with `capacity`.

  capacity None: top_k is a Python int. An int: top_k may be a traced int32 <= capacity
  (`CondensateSpec.top_k_capacity`); the top-k is taken at width min(capacity, S) and
  cut at top_k. The stable order is one total order, so the first top_k of the wider
  top-k are the static top_k's indices, and tau is the same value.
  """
  num_keys = scores.shape[-1]
  masked = jnp.where(middle, scores, NEG_INF)
  n_mid = jnp.sum(middle, axis=-1, dtype=jnp.int32)
  n_dropped = jnp.maximum(n_mid - top_k, 0)
  if capacity is not None:
    return _traced_top_k(masked, middle, top_k, min(capacity, num_keys), n_dropped)
  kk = min(top_k, num_keys)
  if kk == 0:
    empty = jnp.zeros(scores.shape[:-1] + (0,), jnp.int32)
    return TopK(empty, empty.astype(bool), jnp.max(masked, axis=-1), n_dropped)
  middle_b = jnp.broadcast_to(middle, scores.shape)
  if top_fn is not None:
    indices, tau = top_fn(masked, kk)
    return TopK(indices.astype(jnp.int32), jnp.take_along_axis(middle_b, indices, axis=-1),
                tau, n_dropped)
  values, indices = jax.lax.top_k(masked, kk)
  valid = jnp.take_along_axis(middle_b, indices, axis=-1)
  # The k-th selected value bounds every unselected middle score; when fewer than k
  # middle keys exist nothing is dropped (n_dropped == 0) and tau is irrelevant.
  # min over the k values, not values[..., -1]: the same number, but XLA (seen on CPU)
  # lowers a top_k whose values are read only through a slice of the last column to a
  # full sort of the row (18x slower at S = 1056; the whole parity forward 10x).
  return TopK(indices.astype(jnp.int32), valid, jnp.min(values, axis=-1), n_dropped)


def _traced_top_k(masked, middle, top_k, width: int, n_dropped) -> TopK:
  """exact_top_k at a static width >= 1 cut at a traced top_k (see there)."""
  values, indices = jax.lax.top_k(masked, width)
  in_rank = jnp.arange(width, dtype=jnp.int32) < top_k
  valid = jnp.take_along_axis(jnp.broadcast_to(middle, masked.shape), indices,
                              axis=-1) & in_rank
  # the top_k-th value (the last one where top_k >= width); top_k 0: the row's max, as
  # the static path reports (min / max rather than a slice: see exact_top_k)
  tau = jnp.where(top_k > 0, jnp.min(jnp.where(in_rank, values, jnp.inf), axis=-1),
                  jnp.max(values, axis=-1))
  return TopK(indices.astype(jnp.int32), valid, tau, n_dropped)


def _all_middle(scores, middle, top_k: int) -> TopK:
  """exact_top_k where top_k >= S - anchor - window (no query has more middle keys):
  every middle key, listed by position (valid where middle); nothing dropped, so tau is
  never read (the row's max middle score)."""
  shape = scores.shape
  n_mid = jnp.sum(middle, axis=-1, dtype=jnp.int32)
  indices = jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.int32), shape)
  tau = jnp.max(jnp.where(middle, scores, NEG_INF), axis=-1)
  return TopK(indices, jnp.broadcast_to(middle, shape), tau, jnp.maximum(n_mid - top_k, 0))


def topk_mask(topk: TopK, num_keys: int) -> jax.Array:
  """Scatter the selected indices into a [B, K, G, T, S] bool mask."""
  shape = topk.indices.shape[:-1] + (num_keys,)
  if topk.indices.shape[-1] == 0:
    return jnp.zeros(shape, bool)
  return jnp.put_along_axis(jnp.zeros(shape, bool), topk.indices, topk.valid, axis=-1,
                            inplace=False)


class Selection(NamedTuple):
  masks: geometry.StaticMasks
  topk: TopK
  in_set: jax.Array  # [B, K, G, T, S] bool: the condensate set


def select(scores: jax.Array, lo: jax.Array, hi: jax.Array, spec,
           capacity: Optional[int] = None, top_fn=None) -> Selection:
  """The condensate set of every (query head, query) as a mask over key positions.

  spec: a CondensateSpec, or with `capacity` (its top_k_capacity) the runtime
  `spec.Sizes` of a program spec. top_fn: the top-k selection (`exact_top_k`)."""
  num_keys = scores.shape[-1]
  masks = geometry.static_masks(lo, hi, num_keys, spec)
  if capacity is None and spec.top_k >= max(num_keys - spec.anchor - spec.window, 0):
    # every middle key is selected (a query has at most S - anchor - window of them: the
    # covers-everything case): no top_k, no scatter (at 16K keys their index arrays asked
    # an H200 for 75 GiB); the set is the visible keys, the same mask, the same bits
    return Selection(masks, _all_middle(scores, masks.middle, spec.top_k),
                     jnp.broadcast_to(masks.visible, scores.shape))
  topk = exact_top_k(scores, masks.middle, spec.top_k, capacity, top_fn)
  in_set = masks.anchor | masks.window | (topk_mask(topk, num_keys) & masks.middle)
  return Selection(masks, topk, in_set)


def set_indices(selection: Selection, lo: jax.Array, hi: jax.Array,
                spec: CondensateSpec, num_keys: int) -> tuple[jax.Array, jax.Array]:
  """The set as positions: (indices, valid), each [B, K, G, T, N] with
  N = min(anchor, S) + min(window, S) + min(top_k, S), laid out [anchor | window |
  top-k]. Invalid slots hold a position clipped into [0, S) and must be ignored. Valid
  positions are distinct.
  """
  st_idx, st_ok = geometry.static_positions(lo, hi, spec, num_keys)   # [B, T, A + W]
  shape = selection.topk.indices.shape[:-1]
  n = st_idx.shape[-1:]
  idx = jnp.concatenate([jnp.broadcast_to(st_idx[:, None, None], shape + n),
                         selection.topk.indices], axis=-1)
  valid = jnp.concatenate([jnp.broadcast_to(st_ok[:, None, None], shape + n),
                           selection.topk.valid], axis=-1)
  return idx, valid


def certificate(scores: jax.Array, selection: Selection) -> AttentionStats:
  """True captured/dropped mass and the certified bound; shapes [B, K, G, T]."""
  masks, topk, in_set = selection
  visible = jnp.broadcast_to(masks.visible, scores.shape)
  captured, dropped = mass_split(scores, in_set, visible)
  # Certificate from the set's own max m_c and normaliser z_c (what a sparse kernel
  # knows): delta <= n_dropped * exp(tau - m_c), eps <= delta / (z_c + delta).
  m_c, z_c = masked_lse(scores, in_set)
  n_drop = topk.n_dropped.astype(jnp.float32)
  log_delta = jnp.log(n_drop) + (topk.tau - m_c)
  log_delta = jnp.where(n_drop > 0, log_delta, NEG_INF)
  bound = jax.nn.sigmoid(log_delta - jnp.log(jnp.where(z_c > 0, z_c, 1.0)))
  bound = jnp.where(z_c > 0, bound, 1.0)  # an empty set drops everything
  bound = jnp.where(n_drop > 0, bound, 0.0)
  n_visible = jnp.sum(visible, axis=-1, dtype=jnp.int32)
  set_size = jnp.sum(in_set, axis=-1, dtype=jnp.int32)
  return AttentionStats(captured, dropped, bound, set_size, n_visible, n_visible)
