"""Gemma 3 (text): interleaved sliding/global layers with their own RoPE bases.

q/k RMSNorm, pre and post norms around attention and MLP (Gemma RMSNorm: x * (1 + w)),
GeGLU MLP, embeddings scaled by sqrt(width), scores scaled by query_pre_attn_scalar^-1/2,
MQA/GQA, optional final logit softcapping.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
from flax import nnx

from condensate_jax.models import kv_cache, hf_config, layers
from condensate_jax.models.layers import Rope, einsum
from condensate_jax.models.llamalike import GatedMLP

FAMILY = "gemma3"
HF_MODEL_TYPES = ("gemma3_text",)
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_width: int
  sliding_window: int
  layer_types: tuple[str, ...]
  local_rope: Rope
  global_rope: Rope
  max_length: int
  query_pre_attn_scalar: float
  norm_eps: float = 1e-6
  final_logit_softcapping: Optional[float] = None
  activation: str = "gelu_pytorch_tanh"
  tie_embeddings: bool = True

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}: "
                       "expected num_heads to be a multiple of num_kv_heads.")
    if len(self.layer_types) != self.num_layers or any(
        t not in LAYER_TYPES for t in self.layer_types):
      raise ValueError(f"layer_types={self.layer_types!r}: expected {self.num_layers} "
                       f"entries from {LAYER_TYPES}.")
    layers.check_activation(self.activation, "activation")

  def is_sliding(self, layer: int) -> bool:
    return self.layer_types[layer] == "sliding_attention"

  @staticmethod
  def pattern(num_layers: int, every: int = 6) -> tuple[str, ...]:
    """Every `every`-th layer global, the others sliding (Gemma 3's 5:1)."""
    return tuple("full_attention" if (i + 1) % every == 0 else "sliding_attention"
                 for i in range(num_layers))

  # ------------------------------------------------------------------ presets
  @classmethod
  def gemma3_270m(cls) -> "Gemma3Config":
    return cls(vocab_size=262144, width=640, num_layers=18, num_heads=4, num_kv_heads=1,
               head_dim=256, mlp_width=2048, sliding_window=512,
               layer_types=cls.pattern(18), local_rope=Rope(10000.0, 256),
               global_rope=Rope(1000000.0, 256), max_length=32768,
               query_pre_attn_scalar=256.0)

  @classmethod
  def tiny(cls, vocab_size: int = 258, max_length: int = 512) -> "Gemma3Config":
    return cls(vocab_size=vocab_size, width=64, num_layers=2, num_heads=4, num_kv_heads=1,
               head_dim=16, mlp_width=128, sliding_window=16,
               layer_types=("sliding_attention", "full_attention"),
               local_rope=Rope(10000.0, 16), global_rope=Rope(1000000.0, 16),
               max_length=max_length, query_pre_attn_scalar=16.0)

  # ------------------------------------------------------------------ HF
  _HANDLED = frozenset({
      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
      "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps",
      "rope_theta", "rope_local_base_freq", "rope_scaling", "rope_parameters",
      "max_position_embeddings", "sliding_window", "sliding_window_pattern",
      "_sliding_window_pattern", "layer_types", "query_pre_attn_scalar",
      "final_logit_softcapping", "attn_logit_softcapping", "hidden_activation",
      "hidden_act", "attention_bias", "tie_word_embeddings", "use_bidirectional_attention",
      "cache_implementation"})

  @classmethod
  def from_hf_config(cls, hf: dict) -> "Gemma3Config":
    model_type = hf.get("model_type", "gemma3_text")
    if model_type not in HF_MODEL_TYPES:
      raise ValueError(f"model_type={model_type!r}: the gemma3 family expects one of "
                       f"{HF_MODEL_TYPES} (the text model).")
    hf_config.check_hf_keys(hf, cls._HANDLED, set(), FAMILY)
    for key, allowed in (("attn_logit_softcapping", (None,)), ("attention_bias", (False,)),
                         ("use_bidirectional_attention", (False, None)),
                         ("tie_word_embeddings", (True,))):
      if key in hf and hf[key] not in allowed:
        raise ValueError(f"HF config {key}={hf[key]!r}: only {allowed} is supported for "
                         "Gemma 3.")
    req = lambda k: hf_config.require(hf, k, FAMILY)
    n_layers, head_dim = req("num_hidden_layers"), req("head_dim")
    types = hf.get("layer_types")
    if types is None:
      every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
      types = cls.pattern(n_layers, every)
    local, global_ = _ropes(hf, head_dim)
    return cls(
        vocab_size=req("vocab_size"), width=req("hidden_size"), num_layers=n_layers,
        num_heads=req("num_attention_heads"),
        num_kv_heads=hf.get("num_key_value_heads") or req("num_attention_heads"),
        head_dim=head_dim, mlp_width=req("intermediate_size"),
        sliding_window=req("sliding_window"), layer_types=tuple(types), local_rope=local,
        global_rope=global_, max_length=req("max_position_embeddings"),
        query_pre_attn_scalar=float(req("query_pre_attn_scalar")),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        activation=layers.check_activation(
            hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
            "hidden_activation"))


def _ropes(hf: dict, head_dim: int) -> tuple[Rope, Rope]:
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and set(params) <= set(LAYER_TYPES) and params:
    # current layout: one dict per layer type
    local = layers.rope_from_hf(params.get("sliding_attention"), theta=10000.0,
                                rotary_dim=head_dim, where="rope_parameters[sliding]")
    global_ = layers.rope_from_hf(params.get("full_attention"), theta=1000000.0,
                                  rotary_dim=head_dim, where="rope_parameters[full]")
    return local, global_
  # older layout: rope_theta + rope_scaling for global layers, rope_local_base_freq local
  local = Rope(float(hf.get("rope_local_base_freq", 10000.0)), head_dim)
  global_ = layers.rope_from_hf(params or hf.get("rope_scaling"),
                                theta=hf.get("rope_theta", 1000000.0), rotary_dim=head_dim,
                                where="rope_scaling")
  return local, global_


class Attention(nnx.Module):
  def __init__(self, cfg: Gemma3Config, dtype, rngs: nnx.Rngs):
    d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_dnh = layers.param(rngs, (d, n, h), dtype)
    self.k_dkh = layers.param(rngs, (d, k, h), dtype)
    self.v_dkh = layers.param(rngs, (d, k, h), dtype)
    self.o_nhd = layers.param(rngs, (n, h, d), dtype, std=(n * h)**-0.5)
    self.q_norm = layers.RMSNorm(h, cfg.norm_eps, dtype, plus_one=True)
    self.k_norm = layers.RMSNorm(h, cfg.norm_eps, dtype, plus_one=True)

  def __call__(self, x, ctx, layer: int, cfg: Gemma3Config):
    q = self.q_norm(einsum("btd,dnh->btnh", x, self.q_dnh[...]))
    k = self.k_norm(einsum("btd,dkh->btkh", x, self.k_dkh[...]))
    v = einsum("btd,dkh->btkh", x, self.v_dkh[...])
    rope = cfg.local_rope if cfg.is_sliding(layer) else cfg.global_rope
    q, k = rope.apply(q, ctx.positions), rope.apply(k, ctx.positions)
    window = cfg.sliding_window if cfg.is_sliding(layer) else None
    out, kv, stats = kv_cache.attend_layer(ctx, layer, q, k, v,
                                         scale=cfg.query_pre_attn_scalar**-0.5,
                                         sliding_window=window)
    return einsum("btnh,nhd->btd", out.astype(x.dtype), self.o_nhd[...]), kv, stats


class Block(nnx.Module):
  def __init__(self, cfg: Gemma3Config, dtype, rngs: nnx.Rngs):
    norm = lambda: layers.RMSNorm(cfg.width, cfg.norm_eps, dtype, plus_one=True)
    self.pre_attn_norm, self.post_attn_norm = norm(), norm()
    self.pre_mlp_norm, self.post_mlp_norm = norm(), norm()
    self.attn = Attention(cfg, dtype, rngs)
    self.mlp = GatedMLP(cfg.width, cfg.mlp_width, cfg.activation, False, dtype, rngs)

  def __call__(self, x, ctx, layer, cfg):
    y, kv, stats = self.attn(self.pre_attn_norm(x), ctx, layer, cfg)
    x = x + self.post_attn_norm(y)
    x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
    return x, kv, stats


class Model(nnx.Module):
  def __init__(self, cfg: Gemma3Config, dtype=jnp.float32, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_vd = layers.param(rngs, (cfg.vocab_size, cfg.width), dtype)
    self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.width, cfg.norm_eps, dtype, plus_one=True)

  def __call__(self, tokens, cache=None, *, attention=None, implementation="xla",
               return_stats=False, lengths=None, sizes=None, head=True):
    ctx = kv_cache.make_context(tokens, cache, attention, implementation, return_stats,
                               lengths, sizes)
    emb = self.embed_vd[...]
    x = emb[tokens] * jnp.asarray(self.cfg.width**0.5, emb.dtype)
    x, new_kv, stats = kv_cache.run_layers(self.layers, x, ctx, self.cfg)
    return kv_cache.finish(self.head(x) if head else x, ctx, new_kv, stats, head)

  def head(self, x):
    """Logits [..., V] float32 of final hidden states x [..., D] (norm, unembed, cap)."""
    logits = einsum("...d,vd->...v", self.final_norm(x), self.embed_vd[...]).astype(
        jnp.float32)
    cap = self.cfg.final_logit_softcapping
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return logits


HF_KEYS = [
    (r"embed_tokens\.weight", "embed_vd", "copy"),
    (r"norm\.weight", "final_norm/scale_d", "copy"),
    (r"layers\.(\d+)\.input_layernorm\.weight", "layers/{0}/pre_attn_norm/scale_d", "copy"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", "layers/{0}/post_attn_norm/scale_d",
     "copy"),
    (r"layers\.(\d+)\.pre_feedforward_layernorm\.weight", "layers/{0}/pre_mlp_norm/scale_d",
     "copy"),
    (r"layers\.(\d+)\.post_feedforward_layernorm\.weight",
     "layers/{0}/post_mlp_norm/scale_d", "copy"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.weight", "layers/{0}/attn/q_dnh", "linear"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.weight", "layers/{0}/attn/k_dkh", "linear"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.weight", "layers/{0}/attn/v_dkh", "linear"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", "layers/{0}/attn/o_nhd", "linear_o"),
    (r"layers\.(\d+)\.self_attn\.q_norm\.weight", "layers/{0}/attn/q_norm/scale_d", "copy"),
    (r"layers\.(\d+)\.self_attn\.k_norm\.weight", "layers/{0}/attn/k_norm/scale_d", "copy"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", "layers/{0}/mlp/gate_df", "linear"),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", "layers/{0}/mlp/up_df", "linear"),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", "layers/{0}/mlp/down_fd", "linear"),
]
HF_IGNORED_KEYS = [r"lm_head\.weight"]  # tied: equal to embed_tokens when present
