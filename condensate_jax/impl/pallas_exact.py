"""`implementation="pallas"` for selection="exact": XLA selection + the gather-attention
Pallas kernel.

Selection stays in XLA: the exact top-k needs every score q·k_j of the visible keys, so it
reads all of K whatever the kernel does; `xla_masked.select_scores` gives the set
bit-for-bit as the "xla" implementations do, and the stats come from the same
`selection.exact.certificate`. The kernel (pallas_kernels/gather_attention) then gathers
only the set's K/V rows:
  shared list per K/V group = anchor ∪ window (identical for every head of the group, so
    the kernel reads those rows once per group), per-head list = the head's top-k.
On GPU the Triton kernel runs; on TPU the Mosaic one; on CPU the Triton kernel in Pallas
interpret mode (slow: for tests).
"""

from __future__ import annotations

import functools

import jax

from condensate_jax.impl import xla_masked
from condensate_jax.selection import exact
from pallas_kernels.gather_attention import api as _kernel_api

# Which kernel `implementation="pallas"` runs: None = the best for the platform
# (see pallas_kernels.gather_attention.api); tests may set "mosaic_tpu" etc.
KERNEL_IMPLEMENTATION = None


def split_set(selection, lo, hi, spec, num_keys, num_q_heads):
  """The condensate set as (shared, per-head) index lists for the kernel.

  Returns shared (indices, valid) [B, Hkv, T, A+W] and per-head (indices, valid)
  [B, Hq, T, k'] where A = min(anchor, S), W = min(window, S), k' = min(top_k, S).
  `exact.set_indices` lays the list out as [anchor | window | top-k]; the anchor and
  window slots depend only on (batch, query), so head 0 of each group stands for all.
  """
  idx, valid = exact.set_indices(selection, lo, hi, spec, num_keys)   # [B, K, G, T, N]
  n_static = min(spec.anchor, num_keys) + min(spec.window, num_keys)
  b, hkv, g, t, n = idx.shape
  assert n == n_static + selection.topk.indices.shape[-1], (n, n_static)
  shared = (idx[:, :, 0, :, :n_static], valid[:, :, 0, :, :n_static])
  head = (idx[..., n_static:].reshape(b, num_q_heads, t, n - n_static),
          valid[..., n_static:].reshape(b, num_q_heads, t, n - n_static))
  return shared, head


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def condensate_pallas(q, k, v, q_positions, kv_lengths, *, spec, causal, sliding_window,
                      scale, return_stats):
  """Signature and stats of `xla_masked.condensate_masked`; the output equals it to
  float rounding, not bitwise (the kernel sums the set in its own order; not in
  `attention.BITWISE_DENSE`, so the experiments' gate uses a tolerance)."""
  if spec.selection != "exact":
    raise ValueError(
        f"spec.selection={spec.selection!r} with implementation='pallas': this kernel "
        "path supports selection='exact' only.")
  scores, lo, hi, selection = xla_masked.select_scores(
      q, k, q_positions, kv_lengths, spec, causal, sliding_window, scale)
  (s_idx, s_valid), (h_idx, h_valid) = split_set(selection, lo, hi, spec, k.shape[1],
                                                 q.shape[2])
  out, _ = _kernel_api.gather_attention(
      q, k, v, h_idx, h_valid, scale=scale, shared_indices=s_idx, shared_valid=s_valid,
      implementation=KERNEL_IMPLEMENTATION)
  return (out, xla_masked.exact_stats(scores, selection)) if return_stats else out
