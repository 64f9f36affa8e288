"""The KV cache and the attention glue of a model layer.

Every model family exposes the same call:

  model(tokens [B,T] int, cache=None | KVCache, *, attention=None | CondensateSpec,
        implementation="xla", return_stats=False, lengths=None, sizes=None, head=True)
      -> (logits [B,T,V] f32, cache, stats)
  model.head(x [..., D]) -> logits [..., V] f32 of final hidden states

`head=False` returns the final hidden states [B,T,D] (model dtype) instead of the logits, and
`model.head` maps any rows of them to their logits: a parity measurement then holds
[T, D] per side, not [T, V] (Gemma 3: V = 262144).

With `cache=None` the sequence attends to itself (teacher forcing, positions 0..T-1).
With a cache, the new keys are written at each row's `lengths` and queries sit at
positions lengths..lengths+T-1; the returned cache has lengths + T.

`sizes` (optional): the runtime `spec.Sizes` of `attention` when it is a program spec
(`CondensateSpec.top_k_capacity`); every condensate layer reads them.

`lengths` [B] int (optional, default T): how many of this call's T tokens are real per
row of a right-padded batch (ragged prompts). Keys past a row's real tokens are written
but stay invisible (every layer's kv_lengths, the index / summaries and the returned
cache's lengths count the real tokens only), so a later call overwrites them; real
queries never see them (they lie in their causal future), and the logits at padded
positions are meaningless.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from condensate_jax import attention as attention_lib
from condensate_jax import distributed
from condensate_jax import geometry
from condensate_jax.models import fast_path
from condensate_jax.models.layers import einsum
from condensate_jax.selection import index as index_lib
from condensate_jax.selection import summaries as summaries_lib
from condensate_jax.softmax import AttentionStats

# ------------------------------------------------------------------------- KV cache


class KVCache(NamedTuple):
  """Static-shape cache: k[i], v[i] [B, S_max, K, H] per layer; lengths [B] int32.

  summaries: None, or one entry per layer: None, a `selection.index.KeyIndex` (layers
  running selection="indexed": built at prefill, appended per token like the summaries)
  or a `selection.summaries.BlockSummaries` (min / max
  of every spec.block_size cached keys per KV head, [B, ceil(S_max / P), K, H] in the
  cache dtype). A layer that runs a block-selection spec (selection != "exact", not a
  pillar layer) builds its summaries from the cached keys on its first cached call
  (prefill) and updates them with `summaries_lib.append_summaries` on every later call; dense
  and exact layers carry None and pay nothing. Summaries assume append-only writes: to
  rewind `lengths` or overwrite keys, drop them first (`cache._replace(summaries=None)`).
  """
  k: tuple
  v: tuple
  lengths: jax.Array
  summaries: Optional[tuple] = None

  @staticmethod
  def zeros(num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
            dtype) -> "KVCache":
    shape = (batch, max_len, kv_heads, head_dim)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   jnp.zeros((batch,), jnp.int32))


class Context(NamedTuple):
  """What every layer needs to know about the call (shared, static parts in kwargs)."""
  positions: jax.Array         # [B, T] absolute positions of the queries
  cache: Optional[KVCache]     # the input cache (None: attend to this call's keys)
  attention: object            # None | CondensateSpec
  implementation: str
  return_stats: bool
  kv_lengths: jax.Array        # [B] valid keys after this call's write (start + real)
  sizes: object = None         # None | the runtime spec.Sizes of a program spec


def make_context(tokens, cache, attention, implementation, return_stats,
                 lengths=None, sizes=None) -> Context:
  b, t = tokens.shape
  start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
  positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  real = (jnp.full((b,), t, jnp.int32) if lengths is None
          else jnp.clip(jnp.asarray(lengths, jnp.int32), 0, t))
  return Context(positions, cache, attention, implementation, return_stats, start + real,
                 sizes)


def _write(buf, new, start):
  """buf [B,S,K,H] <- new [B,T,K,H] at rows' start positions."""
  return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (i, 0, 0)))(
      buf, new.astype(buf.dtype), start)


def dense_stats(q_positions, kv_lengths, num_heads, sliding_window) -> AttentionStats:
  """Stats of a dense layer: everything captured, set = visible keys."""
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=True,
                             sliding_window=sliding_window)
  n = jnp.maximum(hi - lo + 1, 0).astype(jnp.int32)
  n = jnp.broadcast_to(n[:, None, :], (n.shape[0], num_heads, n.shape[1]))
  ones = jnp.ones(n.shape, jnp.float32)
  return AttentionStats(ones, 0 * ones, 0 * ones, n, n, n)


def uses_block_summaries(spec) -> bool:
  """True when a layer's spec (from `CondensateSpec.for_layer`) selects by a structure
  kept beside the cache: block summaries, or the key index of selection="indexed"."""
  return spec is not None and spec.selection != "exact"


def _cache_summaries(ctx: Context, layer: int, spec, k_new, keys, kv_lengths,
                     packed: bool = False):
  """The layer's summaries (or key index) after this call's write: the input cache's,
  updated with the new keys (positions ctx.positions), or built from all cached keys when
  the input cache has none of these settings (the first cached call: prefill). packed: a
  key index in the layout of the timed step (`PackedIndex`, implementation="fast")."""
  old = None if ctx.cache.summaries is None else ctx.cache.summaries[layer]
  if spec.uses_index and packed:
    if (isinstance(old, index_lib.PackedIndex) and old.bits == spec.index_bits
        and old.num_keys == keys.shape[1]):
      return index_lib.append_packed(old, k_new, ctx.positions)
    return index_lib.pack_index(index_lib.build_index(keys, spec.index_bits, kv_lengths))
  if spec.uses_index:
    if (isinstance(old, index_lib.KeyIndex) and old.bits == spec.index_bits
        and old.codes.shape == keys.shape):
      return index_lib.append_index(old, k_new, ctx.positions)
    return index_lib.build_index(keys, spec.index_bits, kv_lengths)
  if (isinstance(old, summaries_lib.BlockSummaries) and old.block_size == spec.block_size
      and old.num_blocks == summaries_lib.num_blocks(keys.shape[1], spec.block_size)
      and old.kmin.dtype == keys.dtype):
    return summaries_lib.append_summaries(old, k_new.astype(keys.dtype), ctx.positions)
  return summaries_lib.build_summaries(keys, spec.block_size, kv_lengths)


def attend_layer(ctx: Context, layer: int, q, k, v, *, scale: float,
                 sliding_window: Optional[int]):
  """Attention of one layer through the cache. q [B,T,N,H], k/v [B,T,K,H].

  Returns (out [B,T,N,H], (k_cache, v_cache, summaries or None) or None, stats or None).
  """
  spec = None if ctx.attention is None else ctx.attention.for_layer(layer)
  fast = fast_path.is_fast(ctx.implementation)
  summaries = None
  if ctx.cache is None:
    keys, values, kv_lengths, new = k, v, ctx.kv_lengths, None
  else:
    start = ctx.cache.lengths
    keys = _write(ctx.cache.k[layer], k, start)
    values = _write(ctx.cache.v[layer], v, start)
    kv_lengths = ctx.kv_lengths
    q = q.astype(keys.dtype)
    # the fast path runs a sliding-window layer whose window the spec covers dense: it
    # keeps no structure for it
    if uses_block_summaries(spec) and not (
        fast and sliding_window is not None
        and fast_path.covers_window(spec, sliding_window)):
      summaries = _cache_summaries(ctx, layer, spec, k, keys, kv_lengths, packed=fast)
    new = (keys, values, summaries)
  kwargs = dict(q_positions=ctx.positions, kv_lengths=kv_lengths,
                sliding_window=sliding_window, scale=scale)
  if isinstance(ctx.implementation, distributed.Placement):
    res = distributed.model_attend(ctx.implementation, q, keys, values, spec,
                                   return_stats=ctx.return_stats and spec is not None,
                                   index=(summaries if isinstance(summaries,
                                                                  index_lib.KeyIndex)
                                          else None), **kwargs)
    out, stats = res if (ctx.return_stats and spec is not None) else (res, None)
    if ctx.return_stats and spec is None:
      stats = dense_stats(ctx.positions, kv_lengths, q.shape[2], sliding_window)
    if new is not None:
      sharding = ctx.implementation.kv_sharding()
      new = (jax.lax.with_sharding_constraint(new[0], sharding),
             jax.lax.with_sharding_constraint(new[1], sharding),
             ctx.implementation.shard_index(new[2]))
    return out, new, stats
  if fast:
    out = fast_path.attend(ctx, spec, q, k, v, keys, values, summaries, scale=scale,
                           sliding_window=sliding_window)
    if out is not None:
      return out, new, None
    # the XLA specification (a packed index is not its input: it builds its own)
    ctx = ctx._replace(implementation="xla")
    if isinstance(summaries, index_lib.PackedIndex):
      summaries = None
  if spec is None:
    out = attention_lib.attend(q, keys, values, None, **kwargs)
    stats = (dense_stats(ctx.positions, kv_lengths, q.shape[2], sliding_window)
             if ctx.return_stats else None)
  else:
    structure = ({"index": summaries} if spec.uses_index
                 else {"summaries": summaries})
    res = attention_lib.condensate_attention(
        q, keys, values, spec, implementation=ctx.implementation,
        return_stats=ctx.return_stats, sizes=ctx.sizes, **structure, **kwargs)
    out, stats = res if ctx.return_stats else (res, None)
  return out, new, stats


def run_layers(layers, x, ctx: Context, cfg):
  """Runs the decoder blocks in order; returns (x, per-layer (k, v, summaries) or None,
  per-layer stats)."""
  new_kv, stats = [], []
  for i, block in enumerate(layers):
    x, kv, st = block(x, ctx, i, cfg)
    new_kv.append(kv)
    stats.append(st)
  return x, new_kv, stats


def unembed(x, embed_vd, unembed_dv):
  """Logits [..., V] from the tied embedding (unembed_dv None) or a separate output
  matrix."""
  if unembed_dv is None:
    return einsum("...d,vd->...v", x, embed_vd[...])
  return einsum("...d,dv->...v", x, unembed_dv[...])


def finish(logits, ctx: Context, new_kv: list, stats: list, head: bool = True):
  """Assembles the model's (logits f32, cache, stacked stats) result; head=False: the
  final hidden states [B,T,D] stand in the logits' place, in the model's dtype."""
  cache = None
  if ctx.cache is not None:
    summaries = tuple(kv[2] for kv in new_kv)
    cache = KVCache(tuple(kv[0] for kv in new_kv), tuple(kv[1] for kv in new_kv),
                    ctx.kv_lengths,
                    summaries if any(x is not None for x in summaries) else None)
  stacked = None
  if ctx.return_stats:
    stacked = AttentionStats(*[jnp.stack(fields) for fields in zip(*stats)])
  return (logits.astype(jnp.float32) if head else logits), cache, stacked
