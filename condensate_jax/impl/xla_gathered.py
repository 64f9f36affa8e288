"""`implementation="xla_gathered"`: exact top-k, then each query's set gathered as rows.

It sums the set in a different order from the masked form (always through its gather,
so its own code is what the tests check): it agrees with it to float rounding, never
bitwise by construction. It materialises per-query K/V rows, T * budget * D per head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from condensate_jax import softmax
from condensate_jax.impl import xla_masked
from condensate_jax.selection import exact


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def condensate_gathered(q, k, v, q_positions, kv_lengths, *, spec, causal,
                        sliding_window, scale, return_stats):
  scores, lo, hi, selection = xla_masked.select_scores(
      q, k, q_positions, kv_lengths, spec, causal, sliding_window, scale)
  idx, valid = exact.set_indices(selection, lo, hi, spec, k.shape[1])
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)
  k_rows, v_rows = softmax.gather_rows(k, idx), softmax.gather_rows(v, idx)
  s = jnp.einsum("bkgtd,bkgtnd->bkgtn", qg, k_rows, preferred_element_type=jnp.float32,
                 precision=softmax.HIGHEST) * jnp.float32(scale)
  s = jnp.where(valid, s, softmax.NEG_INF)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgtn,bkgtnd->bkgtd", p, v_rows.astype(jnp.float32),
                 precision=softmax.HIGHEST)
  o = o / jnp.where(l > 0, l, 1.0)[..., None]
  out = softmax.heads_to_tokens(o).astype(q.dtype)
  return (out, xla_masked.exact_stats(scores, selection)) if return_stats else out
