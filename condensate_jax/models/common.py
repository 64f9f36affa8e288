"""Building blocks shared by the model families: norms, RoPE, the KV cache, attention.

Axis letters follow `condensate_jax/glossary.py`: B batch, T query positions, S key
positions, D width, N query heads, K kv heads, H head dim, F MLP width, V vocabulary.
Parameters carry their axes in their names (`q_dnh`: [D, N, H]).

Every model family exposes the same call:

  model(tokens [B,T] int, cache=None | KVCache, *, attention=None | CondensateSpec,
        implementation="xla", return_stats=False) -> (logits [B,T,V] f32, cache, stats)

With `cache=None` the sequence attends to itself (teacher forcing, positions 0..T-1).
With a cache, the new keys are written at each row's `lengths` and queries sit at
positions lengths..lengths+T-1; the returned cache has lengths + T.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensate_jax import attention as attention_lib
from condensate_jax import selection as sel
from condensate_jax.selection import AttentionStats

HIGHEST = jax.lax.Precision.HIGHEST
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def check_dtype(dtype) -> jnp.dtype:
  """'float32' | 'bfloat16' | 'float16' (or the jnp dtype) -> jnp dtype."""
  try:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {tuple(DTYPES)}.")
  return jnp.dtype(DTYPES[name])


def einsum(eq: str, *xs, out_dtype=None):
  """einsum at full precision (no TF32 on GPU for float32 models)."""
  out = jnp.einsum(eq, *xs, precision=HIGHEST)
  return out if out_dtype is None else out.astype(out_dtype)


def param(rngs: nnx.Rngs, shape, dtype, std=None) -> nnx.Param:
  """Random init (used by tiny-random models; loaded weights replace it).

  Default std: fan_in^-1/2 with the input axis first (our [in, out...] layout), 0.02 for
  vectors (biases).
  """
  if std is None:
    std = shape[0]**-0.5 if len(shape) >= 2 else 0.02
  return nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(dtype))


def const(shape, value, dtype) -> nnx.Param:
  return nnx.Param(jnp.full(shape, value, dtype))


# ---------------------------------------------------------------------------- norms


class LayerNorm(nnx.Module):
  def __init__(self, width: int, eps: float, dtype, *, bias: bool = True):
    self.eps = eps
    self.scale_d = const((width,), 1.0, dtype)
    self.bias_d = const((width,), 0.0, dtype) if bias else None

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale_d[...].astype(jnp.float32)
    if self.bias_d is not None:
      y = y + self.bias_d[...].astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """Llama: w * norm(x) cast back; Gemma (`plus_one`): norm(x) * (1 + w) in float32."""

  def __init__(self, width: int, eps: float, dtype, *, plus_one: bool = False):
    self.eps = eps
    self.plus_one = plus_one
    self.scale_d = const((width,), 0.0 if plus_one else 1.0, dtype)

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    w = self.scale_d[...]
    if self.plus_one:
      return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * y.astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE

ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary embedding of the first `rotary_dim` features (HF "rotate half" layout).

  scaling: "default" | "linear" (factor) | "llama3" (factor, low/high_freq_factor,
  original_max_position_embeddings) | "dynamic" (NTK; equals "default" up to the
  original context length, which is the model's max_length here, so it is not
  recomputed).
  """
  theta: float
  rotary_dim: int
  scaling: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.scaling not in ROPE_TYPES:
      raise ValueError(f"rope type {self.scaling!r}: expected one of {ROPE_TYPES}.")
    if self.rotary_dim % 2 or self.rotary_dim <= 0:
      raise ValueError(f"rotary_dim={self.rotary_dim}: expected a positive even int.")

  def inv_freq(self) -> np.ndarray:
    dim = self.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (1.0 / np.power(np.float32(self.theta), exponent)).astype(np.float32)
    if self.scaling == "linear":
      inv = inv / np.float32(self.factor)
    elif self.scaling == "llama3":
      old = self.original_max_position_embeddings
      low_wavelen = old / self.low_freq_factor
      high_wavelen = old / self.high_freq_factor
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = (old / wavelen - self.low_freq_factor) / (
          self.high_freq_factor - self.low_freq_factor)
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv

  def apply(self, x, positions):
    """x [B,T,N,H], positions [B,T] -> x with its first rotary_dim features rotated."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq())
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B,T,1,R]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
    half = self.rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos + rotated * sin
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def rope_from_hf(params: Optional[dict], *, theta: float, rotary_dim: int, where: str) -> Rope:
  """A `Rope` from an HF `rope_scaling` / `rope_parameters` dict (None: default)."""
  params = dict(params or {})
  kind = params.pop("rope_type", params.pop("type", "default"))
  theta = float(params.pop("rope_theta", theta))
  params.pop("partial_rotary_factor", None)  # handled by the caller (rotary_dim)
  allowed = {"default": set(), "linear": {"factor"}, "dynamic": {"factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"}}
  if kind not in allowed:
    raise ValueError(f"{where}: rope type {kind!r} is not supported; expected one of "
                     f"{tuple(allowed)}.")
  extra = set(params) - allowed[kind]
  if extra:
    raise ValueError(f"{where}: unknown keys {sorted(extra)} for rope type {kind!r}; "
                     f"expected {sorted(allowed[kind])}.")
  return Rope(theta=theta, rotary_dim=rotary_dim, scaling=kind,
              **{k: (int(v) if k == "original_max_position_embeddings" else float(v))
                 for k, v in params.items()})


# ------------------------------------------------------------------------- KV cache


class KVCache(NamedTuple):
  """Static-shape cache: k[i], v[i] [B, S_max, K, H] per layer; lengths [B] int32.

  summaries: None, or one entry per layer: None or a `blocks.BlockSummaries` (min / max
  of every spec.block_size cached keys per KV head, [B, ceil(S_max / P), K, H] in the
  cache dtype). A layer that runs a block-selection spec (selection != "exact", not a
  pillar layer) builds its summaries from the cached keys on its first cached call
  (prefill) and updates them with `blocks.append_summaries` on every later call; dense
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


def make_context(tokens, cache, attention, implementation, return_stats) -> Context:
  b, t = tokens.shape
  start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
  positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  return Context(positions, cache, attention, implementation, return_stats)


def _write(buf, new, start):
  """buf [B,S,K,H] <- new [B,T,K,H] at rows' start positions."""
  return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (i, 0, 0)))(
      buf, new.astype(buf.dtype), start)


def dense_stats(q_positions, kv_lengths, num_heads, sliding_window) -> AttentionStats:
  """Stats of a dense layer: everything captured, set = visible keys."""
  lo, hi = sel.visible_range(q_positions, kv_lengths, causal=True,
                             sliding_window=sliding_window)
  n = jnp.maximum(hi - lo + 1, 0).astype(jnp.int32)
  n = jnp.broadcast_to(n[:, None, :], (n.shape[0], num_heads, n.shape[1]))
  ones = jnp.ones(n.shape, jnp.float32)
  return AttentionStats(ones, 0 * ones, 0 * ones, n, n, n)


def uses_block_summaries(spec) -> bool:
  """True when a layer's spec (from `CondensateSpec.for_layer`) selects by block
  summaries, i.e. the layer keeps summaries in the cache."""
  return spec is not None and spec.selection != "exact"


def _cache_summaries(ctx: Context, layer: int, spec, k_new, keys, kv_lengths):
  """The layer's summaries after this call's write: the input cache's, updated with the
  new keys (positions ctx.positions), or built from all cached keys when the input cache
  has none of this block size (the first cached call: prefill)."""
  from condensate_jax import blocks   # lazy: blocks imports attention, not the models
  old = None if ctx.cache.summaries is None else ctx.cache.summaries[layer]
  if (isinstance(old, blocks.BlockSummaries) and old.block_size == spec.block_size
      and old.num_blocks == blocks.num_blocks(keys.shape[1], spec.block_size)
      and old.kmin.dtype == keys.dtype):
    return blocks.append_summaries(old, k_new.astype(keys.dtype), ctx.positions)
  return blocks.build_summaries(keys, spec.block_size, kv_lengths)


def attend_layer(ctx: Context, layer: int, q, k, v, *, scale: float,
                 sliding_window: Optional[int]):
  """Attention of one layer through the cache. q [B,T,N,H], k/v [B,T,K,H].

  Returns (out [B,T,N,H], (k_cache, v_cache, summaries or None) or None, stats or None).
  """
  b, t = q.shape[:2]
  spec = None if ctx.attention is None else ctx.attention.for_layer(layer)
  summaries = None
  if ctx.cache is None:
    keys, values, kv_lengths, new = k, v, jnp.full((b,), t, jnp.int32), None
  else:
    start = ctx.cache.lengths
    keys = _write(ctx.cache.k[layer], k, start)
    values = _write(ctx.cache.v[layer], v, start)
    kv_lengths = start + t
    q = q.astype(keys.dtype)
    if uses_block_summaries(spec):
      summaries = _cache_summaries(ctx, layer, spec, k, keys, kv_lengths)
    new = (keys, values, summaries)
  kwargs = dict(q_positions=ctx.positions, kv_lengths=kv_lengths,
                sliding_window=sliding_window, scale=scale)
  if spec is None:
    out = attention_lib.attend(q, keys, values, None, **kwargs)
    stats = (dense_stats(ctx.positions, kv_lengths, q.shape[2], sliding_window)
             if ctx.return_stats else None)
  else:
    if summaries is not None:
      from condensate_jax import blocks
      res = blocks.attend_with_summaries(q, keys, values, spec, summaries,
                                         implementation=ctx.implementation,
                                         return_stats=ctx.return_stats, **kwargs)
    else:
      res = attention_lib.attend(q, keys, values, spec, implementation=ctx.implementation,
                                 return_stats=ctx.return_stats, **kwargs)
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
  """Logits from the tied embedding (unembed_dv None) or a separate output matrix."""
  if unembed_dv is None:
    return einsum("btd,vd->btv", x, embed_vd[...])
  return einsum("btd,dv->btv", x, unembed_dv[...])


def finish(logits, ctx: Context, new_kv: list, stats: list, t: int):
  """Assembles the model's (logits f32, cache, stacked stats) result."""
  cache = None
  if ctx.cache is not None:
    summaries = tuple(kv[2] for kv in new_kv)
    cache = KVCache(tuple(kv[0] for kv in new_kv), tuple(kv[1] for kv in new_kv),
                    ctx.cache.lengths + t,
                    summaries if any(x is not None for x in summaries) else None)
  stacked = None
  if ctx.return_stats:
    stacked = AttentionStats(*[jnp.stack(fields) for fields in zip(*stats)])
  return logits.astype(jnp.float32), cache, stacked


def check_mha_config(cfg) -> None:
  """Checks of a multi-head (no GQA) config with `width`, `num_heads`, `activation`."""
  if cfg.width % cfg.num_heads:
    raise ValueError(f"width={cfg.width}, num_heads={cfg.num_heads}: expected width "
                     "to be a multiple of num_heads.")
  check_activation(cfg.activation, "activation")


def mha_head_dim(cfg) -> int:
  return cfg.width // cfg.num_heads


def mha_num_kv_heads(cfg) -> int:
  return cfg.num_heads


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def check_activation(name: str, where: str) -> str:
  if name not in ACTIVATIONS:
    raise ValueError(f"{where}={name!r}: expected one of {tuple(ACTIVATIONS)}.")
  return name


# ------------------------------------------------------------------- HF config keys

# Keys of HF configs that carry no information for inference (training, tokens, bookkeeping).
COMMON_IGNORED = frozenset({
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "id2label", "label2id",
    "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "attention_dropout", "hidden_dropout", "classifier_dropout", "attn_pdrop",
    "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "task_specific_params",
    "tokenizer_class", "prefix", "finetuning_task", "tie_encoder_decoder",
    "pruned_heads", "torchscript", "output_scores", "return_dict_in_generate",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "diversity_penalty",
    "num_beam_groups", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "encoder_no_repeat_ngram_size", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "quantization_config", "model_type",
    "_attn_implementation_autoset", "_attn_implementation", "pretraining_tp",
    "gradient_checkpointing", "use_memory_efficient_attention", "_commit_hash",
})


def check_hf_keys(hf: dict, handled: set, ignored: set, family: str) -> None:
  """Refuses HF config keys neither handled nor deliberately ignored."""
  unknown = sorted(set(hf) - set(handled) - set(ignored) - COMMON_IGNORED)
  if unknown:
    raise ValueError(
        f"HF config for family {family!r} has unknown keys {unknown}: refusing to guess "
        "their meaning (add them to the family's handled or ignored keys).")


def require(hf: dict, key: str, family: str, *alternatives: str):
  for k in (key,) + alternatives:
    if k in hf and hf[k] is not None:
      return hf[k]
  names = " or ".join(repr(k) for k in (key,) + alternatives)
  raise ValueError(f"HF config for family {family!r}: missing {names}.")
