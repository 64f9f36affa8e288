"""The condensate set's static geometry: what a query sees and where its parts lie.

The only home of this arithmetic in condensate_jax (DESIGN.md §1). For query i with
visible keys lo..hi (inclusive; hi < lo: none):
  anchor  lo .. min(lo + anchor - 1, hi)
  window  max(hi - window + 1, lo + anchor) .. hi
  middle  lo + anchor .. hi - window          (neither anchor nor window)
Shapes: lo, hi [B, T] int32; masks broadcast against scores [B, K, G, T, S].
Every function is traceable (no Python control flow on values).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def visible_range(q_positions: jax.Array, kv_lengths: jax.Array, *, causal: bool,
                  sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
  """First and last visible key of each query, [B, T] int32 each.

  causal: keys j <= pos; sliding_window w: keys j > pos - w (and, when not causal,
  j < pos + w); always j < kv_length.
  """
  pos = q_positions.astype(jnp.int32)
  last = kv_lengths.astype(jnp.int32)[:, None] - 1
  hi = jnp.minimum(pos, last) if causal else jnp.broadcast_to(last, pos.shape)
  lo = jnp.zeros_like(pos)
  if sliding_window is not None:
    lo = jnp.maximum(lo, pos - sliding_window + 1)
    if not causal:
      hi = jnp.minimum(hi, pos + sliding_window - 1)
  return lo, hi


def decode_ranges(kv_lengths, spec, nb: int, num_keys: int):
  """(lo, hi [B, 1], n_mid [B, 1, nb]) of a causal decode query at position
  kv_lengths - 1 (no sliding window)."""
  lo, hi = visible_range(kv_lengths[:, None] - 1, kv_lengths, causal=True,
                         sliding_window=None)
  return lo, hi, middle_counts(lo, hi, spec, nb, num_keys)[0]


def _expand(x: jax.Array) -> jax.Array:
  """[B, T] -> [B, 1, 1, T, 1], to broadcast against scores."""
  return x[:, None, None, :, None]


class StaticMasks(NamedTuple):
  """The parts of the set that do not depend on scores, each [B, 1, 1, T, S] bool."""
  visible: jax.Array
  anchor: jax.Array
  window: jax.Array
  middle: jax.Array


def static_masks(lo: jax.Array, hi: jax.Array, num_keys: int, spec) -> StaticMasks:
  j = jnp.arange(num_keys, dtype=jnp.int32)
  lo_, hi_ = _expand(lo), _expand(hi)
  visible = (j >= lo_) & (j <= hi_)
  anchor = visible & (j < lo_ + spec.anchor)
  window = visible & (j > hi_ - spec.window)
  middle = visible & ~anchor & ~window
  return StaticMasks(visible, anchor, window, middle)


def static_positions(lo, hi, spec, num_keys: int):
  """Anchor + window positions [B, T, N] (N = min(anchor, S) + min(window, S)) and
  their validity; invalid slots hold a position clipped into [0, S). Valid positions
  are distinct (a window slot inside the anchor is invalid)."""
  a = lo[..., None] + jnp.arange(min(spec.anchor, num_keys), dtype=jnp.int32)
  a_ok = a <= hi[..., None]
  w = hi[..., None] - jnp.arange(min(spec.window, num_keys), dtype=jnp.int32)
  w_ok = (w >= lo[..., None]) & (w >= lo[..., None] + spec.anchor)
  idx = jnp.concatenate([a, w], -1)
  return jnp.clip(idx, 0, num_keys - 1), jnp.concatenate([a_ok, w_ok], -1)


def static_ranges(lo, hi, spec, num_keys: int):
  """[B, T, 6] int32: anchor a_lo..a_hi, window w_lo..w_hi, middle m_lo..m_hi (inclusive;
  empty when hi < lo). The sets of `static_masks`, as ranges (what kernels take)."""
  a_lo, a_hi = lo, jnp.minimum(lo + spec.anchor - 1, hi)
  w_lo = jnp.maximum(hi - spec.window + 1, lo + spec.anchor)
  m_lo, m_hi = lo + spec.anchor, jnp.minimum(hi - spec.window, num_keys - 1)
  return jnp.stack([a_lo, a_hi, w_lo, hi, m_lo, m_hi], -1).astype(jnp.int32)


def middle_counts(lo, hi, spec, nb: int, num_keys: int):
  """Middle keys of each query in each block of spec.block_size keys, [B, T, nb] int32,
  and the middle range (mlo, mhi) [B, T]: middle keys are mlo..mhi inclusive."""
  p = spec.block_size
  mlo = lo + spec.anchor
  mhi = jnp.minimum(hi - spec.window, num_keys - 1)
  start = jnp.arange(nb, dtype=jnp.int32) * p
  n = jnp.minimum(mhi[..., None], start + p - 1) - jnp.maximum(mlo[..., None], start) + 1
  return jnp.maximum(n, 0), mlo, mhi
