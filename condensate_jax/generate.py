"""Teacher-forced logits and greedy decoding with a static-shape KV cache.

Functional style: the model is `nnx.split` once (by `LanguageModel`); these jitted pure
functions take (graphdef, state) and `nnx.merge` inside. `attention` (None or a
CondensateSpec), `implementation` and `return_stats` are static; `sizes` (None or the
runtime `spec.Sizes` of a program spec, `CondensateSpec.top_k_capacity`) is traced, so
specs that differ only in anchor / window / top_k share one compiled program.

With a block-selection spec (selection != "exact") the cache also carries per-layer block
summaries (`KVCache.summaries`): the prefill call builds them from the cached keys and each
decode step appends its key, so a step reads summaries instead of rebuilding them from K.
Dense and exact runs carry none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from condensate_jax import distributed, metrics
from condensate_jax.models import fast_path
from condensate_jax.models.kv_cache import KVCache

_STATIC = ("graphdef", "attention", "implementation")


@functools.partial(jax.jit, static_argnames=_STATIC + ("return_stats", "head"))
def forward(graphdef, state, tokens, sizes=None, *, attention, implementation,
            return_stats, head=True):
  """Teacher-forced logits [B,T,V] float32 (and stacked stats [L,B,Hq,T]); head=False:
  the final hidden states [B,T,D] instead of the logits."""
  model = nnx.merge(graphdef, state)
  logits, _, stats = model(tokens, None, attention=attention,
                           implementation=implementation, return_stats=return_stats,
                           sizes=sizes, head=head)
  return (logits, stats) if return_stats else logits


@jax.jit
def head(graphdef, state, hidden):
  """Logits [..., V] float32 of final hidden states [..., D] (`forward(head=False)`)."""
  return nnx.merge(graphdef, state).head(hidden).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("chunk",))
def hidden_parity_rows(graphdef, state, dense, cond, *, chunk):
  """`metrics.row_parity` of the logits of two final hidden states [R, D], `chunk` rows
  at a time (only [chunk, V] logits per side live at once)."""
  model = nnx.merge(graphdef, state)
  rows = lambda dc: metrics.row_parity(model.head(dc[0]).astype(jnp.float32),
                                       model.head(dc[1]).astype(jnp.float32))
  return jax.lax.map(rows, (dense, cond), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=_STATIC)
def step(graphdef, state, tokens, cache, sizes=None, *, attention, implementation):
  """Runs tokens [B,T] through the cache: (logits [B,T,V], cache with lengths + T)."""
  model = nnx.merge(graphdef, state)
  logits, cache, _ = model(tokens, cache, attention=attention,
                           implementation=implementation, sizes=sizes)
  return logits, cache


def _prefill(model, tokens, cache, lengths, sizes, *, attention, implementation):
  """(logits [B, V] float32 at each row's last real position, cache): the head runs on
  those B positions only (at Gemma 3's vocabulary, [B, T, V] logits of a 32K prompt
  would be 34 GB per row)."""
  hidden, cache, _ = model(tokens, cache, attention=attention, implementation=implementation,
                           sizes=sizes, lengths=lengths, head=False)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return model.head(last).astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=_STATIC)
def prefill(graphdef, state, tokens, cache, lengths, sizes=None, *, attention,
            implementation):
  """Runs tokens [B,T] (row b's real ones: the first lengths[b]) through the cache:
  (logits [B, V] at each row's last real position, cache with lengths + lengths[b])."""
  return _prefill(nnx.merge(graphdef, state), tokens, cache, lengths, sizes,
                  attention=attention, implementation=implementation)


def shard_cache(cache: KVCache, placement) -> KVCache:
  """The cache's K/V buffers laid out as the placement's mesh call reads them."""
  sharding = placement.kv_sharding()
  put = lambda xs: tuple(jax.lax.with_sharding_constraint(x, sharding) for x in xs)
  return cache._replace(k=put(cache.k), v=put(cache.v))


def init_cache(cfg, batch: int, max_len: int, dtype) -> KVCache:
  return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim,
                       dtype)


def nucleus(x, top_p):
  """x [..., V] with the logits outside the top-p nucleus set to -inf: the smallest set
  of highest logits whose softmax mass reaches top_p (at least the top one; ties with the
  last kept logit are kept too). top_p >= 1 keeps everything."""
  desc = -jnp.sort(-x, axis=-1)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs           # mass of the higher logits
  kept = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(desc, kept - 1, axis=-1)
  return jnp.where((x >= threshold) | (top_p >= 1.0), x, -jnp.inf)


def choose(logits, keys, step, *, sample: bool, temperature, top_p):
  """The next token per row from logits [B, V] float32: the argmax (greedy), or a draw
  from softmax(logits / temperature) restricted to the top-p nucleus, by the Gumbel-max
  trick with row b's noise from fold_in(keys[b], step). Two runs that share keys share
  the noise, so their draws differ only where their distributions do (a coupling: the
  token match of a sampled parity run measures the distributions, not the dice)."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = nucleus(logits / temperature, top_p)
  noise = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, step),
                                               logits.shape[-1:], jnp.float32))(keys)
  return jnp.argmax(x + noise, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=_STATIC + (
    "max_new_tokens", "cfg", "dtype", "sample", "eos_id", "fast_prefill"))
def decode(graphdef, state, tokens, prompt_lengths, keys, temperature, top_p, sizes=None,
           *, max_new_tokens, attention, implementation, cfg, dtype, sample, eos_id,
           fast_prefill=True):
  """Prefill the (right-padded) prompts, then up to max_new_tokens - 1 cached steps.

  tokens [B, T] with row b's prompt in tokens[b, :prompt_lengths[b]]; keys [B] PRNG keys
  (used when `sample`). Returns the new tokens [B, max_new_tokens] int32. With an
  `eos_id`, a row stops at its first eos_id and the rest of the row is eos_id; the loop
  ends early once every row has stopped.
  """
  model = nnx.merge(graphdef, state)
  b, t = tokens.shape
  fast = implementation == fast_path.NAME
  size = t + max_new_tokens
  placed = isinstance(implementation, distributed.Placement)
  if fast:
    size = fast_path.cache_length(size, attention)
  if placed:      # whole sequence shards
    size = -(-size // implementation.seq_devices) * implementation.seq_devices
  cache = init_cache(cfg, b, size, dtype)
  if placed:
    cache = shard_cache(cache, implementation)
  run = functools.partial(model, attention=attention, implementation=implementation,
                          sizes=sizes)
  pick = functools.partial(choose, keys=keys, sample=sample, temperature=temperature,
                           top_p=top_p)
  # the cache is empty: the fast path's prefill call attends to its own keys
  last, cache = _prefill(model, tokens, cache, prompt_lengths, sizes, attention=attention,
                         implementation=fast_path.PREFILL if fast and fast_prefill
                         else implementation)
  first = pick(last, step=0)
  stop = jnp.int32(-1 if eos_id is None else eos_id)
  out = jnp.full((b, max_new_tokens), jnp.maximum(stop, 0), jnp.int32).at[:, 0].set(first)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, done, out = carry
    logits, cache, _ = run(tok[:, None], cache)
    nxt = jnp.where(done, stop, pick(logits[:, -1], step=i))
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    return i + 1, nxt, cache, done | (nxt == stop), out

  carry = (jnp.int32(1), first, cache, first == stop, out)
  return jax.lax.while_loop(cond, body, carry)[-1]
