"""`implementation="xla_masked"` (alias "xla") and the dense path.

Exactness contract: `dense` and `condensate_masked` share one softmax
(`softmax.masked_softmax`); when a query's set covers every visible key, its mask equals
the visible mask and the two compute the same floating-point operations, so the outputs
are bitwise equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from condensate_jax import geometry, softmax
from condensate_jax.selection import exact


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "scale"))
def dense(q, k, v, q_positions, kv_lengths, *, causal, sliding_window, scale):
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=causal,
                                  sliding_window=sliding_window)
  j = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = (j >= lo[:, None, None, :, None]) & (j <= hi[:, None, None, :, None])
  return softmax.masked_softmax(softmax.scores(q, k, scale), visible, v, q.dtype)


def select_scores(q, k, q_positions, kv_lengths, spec, causal, sliding_window, scale,
                  sizes=None):
  """(scores [B,K,G,T,S], lo, hi [B,T], exact.Selection) of validated inputs; `sizes`
  (a program spec's runtime `Sizes`) replaces spec's anchor / window / top_k."""
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=causal,
                                  sliding_window=sliding_window)
  scores = softmax.scores(q, k, scale)
  if sizes is None:
    return scores, lo, hi, exact.select(scores, lo, hi, spec)
  return scores, lo, hi, exact.select(scores, lo, hi, sizes, spec.top_k_capacity)


def exact_stats(scores, selection) -> softmax.AttentionStats:
  """AttentionStats [B, Hq, T] of an exact selection."""
  return softmax.AttentionStats(*map(softmax.heads_last,
                                     exact.certificate(scores, selection)))


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def condensate_masked(q, k, v, q_positions, kv_lengths, *, spec, causal, sliding_window,
                      scale, return_stats, sizes=None):
  """sizes: None, or the runtime `spec.Sizes` (int32 scalars) of a program spec
  (spec.top_k_capacity > 0), traced: one compiled program serves every size."""
  scores, _, _, selection = select_scores(q, k, q_positions, kv_lengths, spec, causal,
                                          sliding_window, scale, sizes)
  out = softmax.masked_softmax(scores, selection.in_set, v, q.dtype)
  return (out, exact_stats(scores, selection)) if return_stats else out


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale"))
def mask(q, k, q_positions, kv_lengths, *, spec, causal, sliding_window, scale):
  """The exact condensate set as a [B, Hq, T, S] bool mask."""
  *_, selection = select_scores(q, k, q_positions, kv_lengths, spec, causal,
                                sliding_window, scale)
  b, hkv, g, t, s = selection.in_set.shape
  return selection.in_set.reshape(b, hkv * g, t, s)
