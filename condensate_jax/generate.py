"""Teacher-forced logits and greedy decoding with a static-shape KV cache.

Functional style: the model is `nnx.split` once (by `LanguageModel`); these jitted pure
functions take (graphdef, state) and `nnx.merge` inside. `attention` (None or a
CondensateSpec), `implementation` and `return_stats` are static.

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

from condensate_jax.models.kv_cache import KVCache

_STATIC = ("graphdef", "attention", "implementation")


@functools.partial(jax.jit, static_argnames=_STATIC + ("return_stats",))
def forward(graphdef, state, tokens, *, attention, implementation, return_stats):
  """Teacher-forced logits [B,T,V] float32 (and stacked stats [L,B,Hq,T])."""
  model = nnx.merge(graphdef, state)
  logits, _, stats = model(tokens, None, attention=attention,
                           implementation=implementation, return_stats=return_stats)
  return (logits, stats) if return_stats else logits


@functools.partial(jax.jit, static_argnames=_STATIC)
def step(graphdef, state, tokens, cache, *, attention, implementation):
  """Runs tokens [B,T] through the cache: (logits [B,T,V], cache with lengths + T)."""
  model = nnx.merge(graphdef, state)
  logits, cache, _ = model(tokens, cache, attention=attention,
                           implementation=implementation)
  return logits, cache


def init_cache(cfg, batch: int, max_len: int, dtype) -> KVCache:
  return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim,
                       dtype)


@functools.partial(jax.jit, static_argnames=_STATIC + ("max_new_tokens", "cfg", "dtype"))
def greedy(graphdef, state, tokens, *, max_new_tokens, attention, implementation, cfg,
           dtype):
  """Greedy decoding: prefill the prompt, then max_new_tokens - 1 cached decode steps.

  Returns the new tokens [B, max_new_tokens] int32; no stop token (fixed length).
  """
  model = nnx.merge(graphdef, state)
  b, t = tokens.shape
  cache = init_cache(cfg, b, t + max_new_tokens, dtype)
  run = functools.partial(model, attention=attention, implementation=implementation)
  logits, cache, _ = run(tokens, cache)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def body(carry, _):
    tok, cache = carry
    logits, cache, _ = run(tok[:, None], cache)
    return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache), tok

  (last, _), toks = jax.lax.scan(body, (first, cache), None, length=max_new_tokens - 1)
  return jnp.concatenate([toks.T, last[:, None]], axis=1)
