"""`implementation="pallas_select"`: the masked XLA specification of selection="exact"
and "indexed" with its top-k selections on the Pallas kernel (`pallas_kernels.top_select`,
`top_set`: rows of any length) instead of `lax.top_k`, which XLA's GPU backend runs as a
sort of every row (a causal prefill's [B, Hq, T, S] rows: the bulk of the indexed
prefill's time).

`top_set` picks the set `lax.top_k` picks (total order of floats, ties to the lower
position) and everything else is the specification's own code (`xla_masked`,
`xla_indexed`: the same scores, masks and masked softmax), so outputs and stats are
bitwise those of implementation="xla" (and bitwise dense when the set covers every
visible key: `attention.BITWISE_DENSE`). The one difference is a certificate's tau where
a query's exact top-k holds a NaN score (the k-th in the total order instead of the
minimum of the picks); inputs reach here sanitized (`condensate_attention`), so that
takes a score that overflows.

This is what the models' fast path runs for "exact" and "indexed" prefill on a GPU
(`models.fast_path`); on a CPU the kernel runs interpreted (for tests; slow).
"""

from __future__ import annotations

import functools

import jax

from condensate_jax import geometry, softmax
from condensate_jax.impl import xla_indexed, xla_masked
from condensate_jax.selection import exact
from pallas_kernels.top_select import api as _top_api

# Which top_select implementation runs: None = the platform's best (tests may set
# "reference": lax.top_k and a sort, the same sets).
KERNEL_IMPLEMENTATION = None
SELECTIONS = ("exact", "indexed")


def top_fn(x, k):
  """Top-k ids and threshold of `x`'s rows on the top_select kernel (the `top_fn` of selection)."""
  _, ids, tau = _top_api.top_set(x, k, implementation=KERNEL_IMPLEMENTATION)
  return ids, tau


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def condensate_pallas_select(q, k, v, q_positions, kv_lengths, *, spec, causal,
                             sliding_window, scale, return_stats, index=None):
  """Signature and results of `xla_masked.condensate_masked` ("exact") and
  `xla_indexed.condensate_xla_indexed` ("indexed"), bitwise (module docstring)."""
  if spec.selection not in SELECTIONS:
    raise ValueError(f"spec.selection={spec.selection!r} with implementation="
                     f"'pallas_select': expected one of {list(SELECTIONS)}.")
  if spec.selection == "indexed":
    return xla_indexed.indexed_attention(
        q, k, v, q_positions, kv_lengths, spec=spec, causal=causal,
        sliding_window=sliding_window, scale=scale, return_stats=return_stats,
        index=index, top_fn=top_fn)
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=causal,
                                  sliding_window=sliding_window)
  scores = softmax.scores(q, k, scale)
  selection = exact.select(scores, lo, hi, spec, top_fn=top_fn)
  out = softmax.masked_softmax(scores, selection.in_set, v, q.dtype)
  return (out, xla_masked.exact_stats(scores, selection)) if return_stats else out
