"""`implementation="fast"`: a model's cached decode on the timed kernels (issue #14).

A model called with implementation="fast" (`lm.generate`, `lm.step`) runs, per layer:

  decode (one token per row, through the cache):
    dense layer (no spec, a pillar of `dense_layers`):  `dense_decode` (cuDNN on a GPU in
        bf16 / fp16 over each row's kv_length, else XLA);
    selection="blocks":   `fast.decode_step` on the cache's block summaries;
    selection="indexed":  `fast.indexed_decode_step` on the cache's packed key index
        (`selection.index.PackedIndex`, appended in place by `append_packed`);
    selection="exact":    the XLA specification (exact top-k scores every key: there is
        no faster exact step);
  prefill (the first call of `lm.generate`, on an empty cache):
    dense:   `dense_prefill` (cuDNN causal on a GPU in bf16 / fp16, else XLA) over the
             call's own keys;
    blocks:  `fast.prefill_step` (the timed block-sparse prefill: per-query-block lists)
             when every row fills the call (its lists read the whole rows: a padded row
             would rank with its padding), else the XLA specification (`lm` picks);
    indexed, exact: the specification over the call's own keys, on a GPU with its
             top-k selections on the Pallas kernel (implementation="pallas_select":
             bitwise the specification's outputs; no indexed prefill kernel yet).
  Any other call with T > 1 tokens runs the XLA specification over the cache.

A layer with the model's own sliding window w (Gemma 3's local layers, Mistral) runs
`dense_decode` over its last w keys when the spec's budget covers the window (anchor +
window + top_k, or top_blocks * block_size, >= w: then the set is every visible key, as in
the specification), else the XLA specification.

The cache is carried through `lm.generate`'s while loop and written with
dynamic_update_slice / scatter (XLA updates loop carries in place). Statistics
(return_stats) and runtime sizes (top_k_capacity) are not offered here: this is the path
that is timed; the parity runner measures through the XLA specification.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from condensate_jax import attention as attention_lib
from condensate_jax.impl import xla_masked

NAME = "fast"
# what generate.decode passes for its prefill call (the cache is known to be empty)
PREFILL = "fast-prefill"
SELECTIONS = ("exact", "blocks", "indexed")


def is_fast(implementation) -> bool:
  return implementation in (NAME, PREFILL)


def check_fast(attention, return_stats: bool = False, sizes=None):
  """ValueError unless `attention` (None or a spec) runs on the fast path."""
  if return_stats:
    raise ValueError("return_stats=True with implementation='fast': the fast path returns "
                     "no statistics; measure with implementation='xla' (the parity runner).")
  if attention is None:
    return
  if attention.selection not in SELECTIONS:
    raise ValueError(f"attention.selection={attention.selection!r} with implementation="
                     f"'fast': expected one of {list(SELECTIONS)} (the modes with a timed "
                     "step; 'certified' and 'bounded' run with implementation='xla').")
  if attention.top_k_capacity or sizes is not None:
    raise ValueError(f"attention.top_k_capacity={attention.top_k_capacity} with "
                     "implementation='fast': the fast kernels take static sizes; use a spec "
                     "without top_k_capacity.")


def _cudnn_ok(q) -> bool:
  return dense_kernel(q.dtype, q.shape[-1]) == "cudnn"


def dense_kernel(dtype, head_dim: int = 128) -> str:
  """The dense kernel `dense_decode` / `dense_prefill` run for this dtype and head dim
  here: "cudnn" on an Ampere-or-later GPU in bf16 / fp16 (head dim <= 128, or <= 256 on
  Hopper and later: JAX's cuDNN attention limits), else "xla"."""
  if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  try:
    cc = float(jax.devices()[0].compute_capability)
  except (AttributeError, TypeError, ValueError):
    return "xla"
  ok = cc >= 8.0 and (head_dim <= 128 or (cc >= 9.0 and head_dim <= 256))
  return "cudnn" if ok else "xla"


def covers_window(spec, sliding_window) -> bool:
  """True when the spec's set is every key a query sees in a window of that size: the
  middle of a window (at most w - anchor - window keys) fits top_k, or for "blocks" the
  blocks it can touch (ceil(m / P) + 1: a run of keys straddles block borders) fit
  top_blocks."""
  if spec is None:
    return True
  middle = max(sliding_window - spec.anchor - spec.window, 0)
  if spec.selection == "blocks":
    return middle == 0 or spec.top_blocks >= -(-middle // spec.block_size) + 1
  return spec.top_k >= middle


def _window_slice(k, v, kv_lengths, w):
  """The last min(w, S) keys before each row's kv_length: (k, v, lengths) of that slice."""
  n = min(w, k.shape[1])
  start = jnp.maximum(kv_lengths - n, 0)
  take = lambda x: jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, n, 0))(x, start)
  return take(k), take(v), jnp.minimum(kv_lengths, n)


def dense_decode(q, k, v, kv_lengths, *, scale, sliding_window=None):
  """One query per row at position kv_length - 1 over keys [0, kv_length) (or the last
  sliding_window of them): q [B, 1, Hq, D] -> [B, 1, Hq, D]."""
  if sliding_window is not None:
    k, v, kv_lengths = _window_slice(k, v, kv_lengths, sliding_window)
  if _cudnn_ok(q):
    b = q.shape[0]
    try:
      return jax.nn.dot_product_attention(
          q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, is_causal=False,
          query_seq_lengths=jnp.ones((b,), jnp.int32), key_value_seq_lengths=kv_lengths,
          implementation="cudnn")
    except NotImplementedError:    # a shape this cuDNN does not take: XLA below
      pass
  pos = (kv_lengths - 1)[:, None]
  return xla_masked.dense(q, k, v, pos, kv_lengths, causal=True, sliding_window=None,
                          scale=scale)


# XLA prefill attends this many queries at a time: its [B, Hq, chunk, T] scores, not
# [B, Hq, T, T] (Gemma 3 at 32K: 17 GB per row)
PREFILL_CHUNK = 1024


def _positions(q):
  """[B, T] positions 0..T-1 of a call's queries (a prefill of an empty cache)."""
  return jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])


def dense_prefill(q, k, v, *, scale, sliding_window=None):
  """Causal attention of a call's T queries over its own T keys (positions 0..T-1)."""
  b, t = q.shape[:2]
  if _cudnn_ok(q):
    window = None if sliding_window is None else (sliding_window - 1, 0)
    try:
      return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                          scale=scale, is_causal=True,
                                          local_window_size=window, implementation="cudnn")
    except NotImplementedError:    # a shape this cuDNN does not take: XLA below
      pass
  lengths = jnp.full((b,), t, jnp.int32)
  return attention_lib.over_query_chunks(
      lambda qc, pos: xla_masked.dense(qc, k, v, pos, lengths, causal=True,
                                       sliding_window=sliding_window, scale=scale),
      q, _positions(q), min(PREFILL_CHUNK, t), return_stats=False)


def prefill_implementation(spec) -> str:
  """What `spec_prefill` runs: on a GPU "pallas_select" for "exact" / "indexed" (the
  specification with its top-k selections on the Pallas kernel: the same sets, bitwise
  the same outputs, without XLA's sort of every [chunk, S] row), else "xla"."""
  if jax.default_backend() == "gpu" and spec.selection in ("exact", "indexed"):
    return "pallas_select"
  return "xla"


def spec_prefill(q, k, v, spec, kv_lengths, *, scale, implementation=None):
  """The specification's causal prefill over the call's own keys (the first
  kv_lengths[b] real in row b), in query chunks; an "indexed" spec's key index built once,
  from each row's real keys, as the cache's is. implementation: None =
  `prefill_implementation(spec)`."""
  from condensate_jax.selection import index as index_lib  # pylint: disable=import-outside-toplevel
  extra = {}
  if spec.uses_index:
    extra["index"] = index_lib.build(k, kv_lengths, spec.index_bits)
  implementation = implementation or prefill_implementation(spec)
  return attention_lib.condensate_attention(
      q, k, v, spec, q_positions=_positions(q), kv_lengths=kv_lengths, scale=scale,
      implementation=implementation, query_chunk=PREFILL_CHUNK, **extra)


def attend(ctx, spec, q, k_new, v_new, keys, values, structure, *, scale, sliding_window):
  """The fast path's attention of one layer (module docstring); None where the call runs
  the XLA specification instead (the caller's general path)."""
  from condensate_jax import fast   # the timed steps import the Pallas kernels
  t = q.shape[1]
  kv_lengths = ctx.kv_lengths
  local = sliding_window is not None
  if local and not covers_window(spec, sliding_window):
    return None
  dense = spec is None or local
  if t == 1 and ctx.cache is not None:
    if dense:
      return dense_decode(q, keys, values, kv_lengths, scale=scale,
                          sliding_window=sliding_window)
    if spec.selection == "blocks":
      out, _, _ = fast.decode_step(q, keys, values, structure.kmin, structure.kmax,
                                   kv_lengths, spec=spec, scale=scale)
      return out
    if spec.selection == "indexed":
      out, _, _ = fast.indexed_decode_step(q, keys, values, structure, kv_lengths,
                                           spec=spec, scale=scale)
      return out
    return None
  if ctx.implementation != PREFILL:
    return None
  if dense:
    return dense_prefill(q, k_new, v_new, scale=scale, sliding_window=sliding_window)
  if spec.selection == "blocks":
    out, _ = fast.prefill_step(q, k_new.astype(q.dtype), v_new.astype(q.dtype), spec=spec,
                               scale=scale)
    return out
  return spec_prefill(q, k_new, v_new, spec, kv_lengths, scale=scale)


def cache_length(n: int, attention) -> int:
  """A cache of at least n positions in whole blocks of the spec's block size (what
  `fast.decode_step` reads), and a multiple of 128 otherwise."""
  unit = 128
  if attention is not None and attention.selection == "blocks":
    unit = attention.block_size * (-(-128 // attention.block_size))
  return -(-n // unit) * unit


def prefill_kernels_apply(attention, lengths, width: int) -> bool:
  """May a prefill of prompts right-padded to `width` (host lengths [B]) run the fast
  prefill kernels? Not "blocks" with a padded row: its per-query-block lists would rank
  that row with its padding (the XLA specification then runs, the set of the row alone)."""
  if attention is None or attention.selection != "blocks":
    return True
  return bool(np.all(np.asarray(lengths) >= width))


def check_cache_length(attention, length: int) -> None:
  """"blocks" on the fast path reads whole blocks: a cache of `length` positions must hold
  a whole number of them (ValueError naming the size to ask for)."""
  if attention is not None and attention.selection == "blocks" and (
      length % attention.block_size):
    raise ValueError(f"cache of {length} positions with implementation='fast' and "
                     f"block_size={attention.block_size}: the timed decode step reads whole "
                     f"blocks; expected a multiple of {attention.block_size} (e.g. "
                     f"{cache_length(length, attention)}: models.fast_path.cache_length).")
