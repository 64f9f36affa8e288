"""GPT-NeoX (Pythia): LayerNorm, partial rotary, parallel or sequential residual."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from condensate_jax.models import kv_cache, hf_config, layers
from condensate_jax.models.layers import Rope, einsum

FAMILY = "gpt_neox"
HF_MODEL_TYPES = ("gpt_neox",)


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_width: int
  rope: Rope
  max_length: int = 2048
  norm_eps: float = 1e-5
  parallel_residual: bool = True
  attention_bias: bool = True
  activation: str = "gelu"
  tie_embeddings: bool = False

  def __post_init__(self):
    layers.check_mha_config(self)

  head_dim = property(layers.mha_head_dim)
  num_kv_heads = property(layers.mha_num_kv_heads)

  # ------------------------------------------------------------------ presets
  @classmethod
  def pythia(cls, width: int, num_layers: int, num_heads: int) -> "NeoXConfig":
    head_dim = width // num_heads
    return cls(vocab_size=50304, width=width, num_layers=num_layers, num_heads=num_heads,
               mlp_width=4 * width, rope=Rope(10000.0, head_dim // 4))

  @classmethod
  def pythia_70m(cls) -> "NeoXConfig":
    return cls.pythia(512, 6, 8)

  @classmethod
  def pythia_160m(cls) -> "NeoXConfig":
    return cls.pythia(768, 12, 12)

  @classmethod
  def pythia_410m(cls) -> "NeoXConfig":
    return cls.pythia(1024, 24, 16)

  @classmethod
  def tiny(cls, vocab_size: int = 258, max_length: int = 512) -> "NeoXConfig":
    return cls(vocab_size=vocab_size, width=64, num_layers=2, num_heads=4, mlp_width=256,
               rope=Rope(10000.0, 4), max_length=max_length)

  # ------------------------------------------------------------------ HF
  _HANDLED = frozenset({
      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
      "intermediate_size", "rotary_pct", "rotary_emb_base", "rope_theta", "rope_scaling",
      "rope_parameters", "partial_rotary_factor", "max_position_embeddings",
      "layer_norm_eps", "use_parallel_residual", "attention_bias", "hidden_act",
      "tie_word_embeddings"})

  @classmethod
  def from_hf_config(cls, hf: dict) -> "NeoXConfig":
    if hf.get("model_type", "gpt_neox") not in HF_MODEL_TYPES:
      raise ValueError(f"model_type={hf.get('model_type')!r}: the gpt_neox family expects "
                       f"{HF_MODEL_TYPES}.")
    hf_config.check_hf_keys(hf, cls._HANDLED, set(), FAMILY)
    req = lambda k: hf_config.require(hf, k, FAMILY)
    width, heads = req("hidden_size"), req("num_attention_heads")
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    pct = params.get("partial_rotary_factor",
                     hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    theta = hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    rope = layers.rope_from_hf(params, theta=theta, rotary_dim=int(width // heads * pct),
                               where="rope_parameters")
    return cls(vocab_size=req("vocab_size"), width=width, num_layers=req("num_hidden_layers"),
               num_heads=heads, mlp_width=req("intermediate_size"), rope=rope,
               max_length=req("max_position_embeddings"),
               norm_eps=hf.get("layer_norm_eps", 1e-5),
               parallel_residual=bool(hf.get("use_parallel_residual", True)),
               attention_bias=bool(hf.get("attention_bias", True)),
               activation=layers.check_activation(hf.get("hidden_act", "gelu"),
                                                  "hidden_act"),
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


class Block(nnx.Module):
  def __init__(self, cfg: NeoXConfig, dtype, rngs: nnx.Rngs):
    d, n, h, f = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_width
    self.ln_attn = layers.LayerNorm(d, cfg.norm_eps, dtype)
    self.ln_mlp = layers.LayerNorm(d, cfg.norm_eps, dtype)
    self.q_dnh = layers.param(rngs, (d, n, h), dtype)
    self.k_dnh = layers.param(rngs, (d, n, h), dtype)
    self.v_dnh = layers.param(rngs, (d, n, h), dtype)
    self.o_nhd = layers.param(rngs, (n, h, d), dtype, std=(n * h)**-0.5)
    bias = cfg.attention_bias
    self.q_bias_nh = layers.param(rngs, (n, h), dtype) if bias else None
    self.k_bias_nh = layers.param(rngs, (n, h), dtype) if bias else None
    self.v_bias_nh = layers.param(rngs, (n, h), dtype) if bias else None
    self.o_bias_d = layers.param(rngs, (d,), dtype) if bias else None
    self.up_df = layers.param(rngs, (d, f), dtype)
    self.up_bias_f = layers.param(rngs, (f,), dtype)
    self.down_fd = layers.param(rngs, (f, d), dtype)
    self.down_bias_d = layers.param(rngs, (d,), dtype)

  def attention(self, x, ctx, layer, cfg: NeoXConfig):
    q = einsum("btd,dnh->btnh", x, self.q_dnh[...])
    k = einsum("btd,dnh->btnh", x, self.k_dnh[...])
    v = einsum("btd,dnh->btnh", x, self.v_dnh[...])
    if self.q_bias_nh is not None:
      q, k, v = q + self.q_bias_nh[...], k + self.k_bias_nh[...], v + self.v_bias_nh[...]
    q, k = cfg.rope.apply(q, ctx.positions), cfg.rope.apply(k, ctx.positions)
    out, kv, stats = kv_cache.attend_layer(ctx, layer, q, k, v, scale=cfg.head_dim**-0.5,
                                         sliding_window=None)
    y = einsum("btnh,nhd->btd", out.astype(x.dtype), self.o_nhd[...])
    return (y if self.o_bias_d is None else y + self.o_bias_d[...]), kv, stats

  def mlp(self, x, cfg: NeoXConfig):
    h = einsum("btd,df->btf", x, self.up_df[...]) + self.up_bias_f[...]
    h = layers.ACTIVATIONS[cfg.activation](h)
    return einsum("btf,fd->btd", h, self.down_fd[...]) + self.down_bias_d[...]

  def __call__(self, x, ctx, layer, cfg: NeoXConfig):
    a, kv, stats = self.attention(self.ln_attn(x), ctx, layer, cfg)
    if cfg.parallel_residual:
      return x + a + self.mlp(self.ln_mlp(x), cfg), kv, stats
    x = x + a
    return x + self.mlp(self.ln_mlp(x), cfg), kv, stats


class Model(nnx.Module):
  def __init__(self, cfg: NeoXConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_vd = layers.param(rngs, (cfg.vocab_size, cfg.width), dtype)
    self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.ln_f = layers.LayerNorm(cfg.width, cfg.norm_eps, dtype)
    self.unembed_dv = (None if cfg.tie_embeddings else
                       layers.param(rngs, (cfg.width, cfg.vocab_size), dtype))

  def __call__(self, tokens, cache=None, *, attention=None, implementation="xla",
               return_stats=False, lengths=None, sizes=None, head=True):
    ctx = kv_cache.make_context(tokens, cache, attention, implementation, return_stats,
                               lengths, sizes)
    x = self.embed_vd[...][tokens]
    x, new_kv, stats = kv_cache.run_layers(self.layers, x, ctx, self.cfg)
    return kv_cache.finish(self.head(x) if head else x, ctx, new_kv, stats, head)

  def head(self, x):
    """Logits [..., V] of final hidden states x [..., D]."""
    return kv_cache.unembed(self.ln_f(x), self.embed_vd, self.unembed_dv)


HF_KEYS = [
    (r"embed_in\.weight", "embed_vd", "copy"),
    (r"embed_out\.weight", "unembed_dv", "linear"),
    (r"final_layer_norm\.weight", "ln_f/scale_d", "copy"),
    (r"final_layer_norm\.bias", "ln_f/bias_d", "copy"),
    (r"layers\.(\d+)\.input_layernorm\.weight", "layers/{0}/ln_attn/scale_d", "copy"),
    (r"layers\.(\d+)\.input_layernorm\.bias", "layers/{0}/ln_attn/bias_d", "copy"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", "layers/{0}/ln_mlp/scale_d",
     "copy"),
    (r"layers\.(\d+)\.post_attention_layernorm\.bias", "layers/{0}/ln_mlp/bias_d", "copy"),
    (r"layers\.(\d+)\.attention\.query_key_value\.weight",
     ("layers/{0}/q_dnh", "layers/{0}/k_dnh", "layers/{0}/v_dnh"), "neox_qkv"),
    (r"layers\.(\d+)\.attention\.query_key_value\.bias",
     ("layers/{0}/q_bias_nh", "layers/{0}/k_bias_nh", "layers/{0}/v_bias_nh"), "neox_qkv"),
    (r"layers\.(\d+)\.attention\.dense\.weight", "layers/{0}/o_nhd", "linear_o"),
    (r"layers\.(\d+)\.attention\.dense\.bias", "layers/{0}/o_bias_d", "copy"),
    (r"layers\.(\d+)\.mlp\.dense_h_to_4h\.weight", "layers/{0}/up_df", "linear"),
    (r"layers\.(\d+)\.mlp\.dense_h_to_4h\.bias", "layers/{0}/up_bias_f", "copy"),
    (r"layers\.(\d+)\.mlp\.dense_4h_to_h\.weight", "layers/{0}/down_fd", "linear"),
    (r"layers\.(\d+)\.mlp\.dense_4h_to_h\.bias", "layers/{0}/down_bias_d", "copy"),
]
# Buffers of older checkpoints (causal mask, rotary frequencies), recomputed here.
HF_IGNORED_KEYS = [r"layers\.\d+\.attention\.bias", r"layers\.\d+\.attention\.masked_bias",
                   r"layers\.\d+\.attention\.rotary_emb\.inv_freq", r"rotary_emb\.inv_freq"]
