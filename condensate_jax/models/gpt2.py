"""GPT-2: learned positions, pre-LayerNorm, GELU-tanh MLP, tied embeddings.

HF stores GPT-2's projections as Conv1D ([in, out]); the loader splits `c_attn` into
q/k/v and reshapes, no transposition needed for Conv1D (nn.Linear layouts are transposed).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from condensate_jax.models import kv_cache, hf_config, layers
from condensate_jax.models.layers import einsum

FAMILY = "gpt2"
HF_MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_width: int = 3072
  max_length: int = 1024
  norm_eps: float = 1e-5
  activation: str = "gelu_new"
  scale_attn_weights: bool = True

  def __post_init__(self):
    layers.check_mha_config(self)

  head_dim = property(layers.mha_head_dim)
  num_kv_heads = property(layers.mha_num_kv_heads)

  # ------------------------------------------------------------------ presets
  @classmethod
  def gpt2(cls) -> "GPT2Config":
    return cls()

  @classmethod
  def gpt2_medium(cls) -> "GPT2Config":
    return cls(width=1024, num_layers=24, num_heads=16, mlp_width=4096)

  @classmethod
  def gpt2_large(cls) -> "GPT2Config":
    return cls(width=1280, num_layers=36, num_heads=20, mlp_width=5120)

  @classmethod
  def gpt2_xl(cls) -> "GPT2Config":
    return cls(width=1600, num_layers=48, num_heads=25, mlp_width=6400)

  @classmethod
  def tiny(cls, vocab_size: int = 258, max_length: int = 512) -> "GPT2Config":
    return cls(vocab_size=vocab_size, width=64, num_layers=2, num_heads=4, mlp_width=256,
               max_length=max_length)

  # ------------------------------------------------------------------ HF
  _HANDLED = frozenset({"vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
                        "n_positions", "n_ctx", "layer_norm_epsilon", "activation_function",
                        "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                        "reorder_and_upcast_attn", "tie_word_embeddings", "n_special",
                        "predict_special_tokens"})
  # n_ctx: older configs' alias of n_positions; reorder_and_upcast_attn only changes
  # the float precision of HF's own computation (ours accumulates in float32 anyway);
  # n_special (must be 0) and predict_special_tokens: OpenAI-GPT leftovers in the
  # gpt2-medium/-large configs.

  @classmethod
  def from_hf_config(cls, hf: dict) -> "GPT2Config":
    if hf.get("model_type", "gpt2") not in HF_MODEL_TYPES:
      raise ValueError(f"model_type={hf.get('model_type')!r}: the gpt2 family expects "
                       f"{HF_MODEL_TYPES}.")
    hf_config.check_hf_keys(hf, cls._HANDLED, set(), FAMILY)
    for key, allowed in (("scale_attn_by_inverse_layer_idx", False),
                         ("tie_word_embeddings", True), ("n_special", 0)):
      if key in hf and hf[key] != allowed:
        raise ValueError(f"HF config {key}={hf[key]!r}: only {allowed} is supported.")
    req = lambda k: hf_config.require(hf, k, FAMILY)
    width = req("n_embd")
    return cls(vocab_size=req("vocab_size"), width=width, num_layers=req("n_layer"),
               num_heads=req("n_head"), mlp_width=hf.get("n_inner") or 4 * width,
               max_length=hf_config.require(hf, "n_positions", FAMILY, "n_ctx"),
               norm_eps=hf.get("layer_norm_epsilon", 1e-5),
               activation=layers.check_activation(hf.get("activation_function", "gelu_new"),
                                                  "activation_function"),
               scale_attn_weights=bool(hf.get("scale_attn_weights", True)))


class Block(nnx.Module):
  def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs):
    d, n, h, f = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_width
    self.ln_1 = layers.LayerNorm(d, cfg.norm_eps, dtype)
    self.q_dnh = layers.param(rngs, (d, n, h), dtype)
    self.k_dnh = layers.param(rngs, (d, n, h), dtype)
    self.v_dnh = layers.param(rngs, (d, n, h), dtype)
    self.q_bias_nh = layers.param(rngs, (n, h), dtype)
    self.k_bias_nh = layers.param(rngs, (n, h), dtype)
    self.v_bias_nh = layers.param(rngs, (n, h), dtype)
    self.o_nhd = layers.param(rngs, (n, h, d), dtype, std=(n * h)**-0.5)
    self.o_bias_d = layers.param(rngs, (d,), dtype)
    self.ln_2 = layers.LayerNorm(d, cfg.norm_eps, dtype)
    self.up_df = layers.param(rngs, (d, f), dtype)
    self.up_bias_f = layers.param(rngs, (f,), dtype)
    self.down_fd = layers.param(rngs, (f, d), dtype)
    self.down_bias_d = layers.param(rngs, (d,), dtype)

  def __call__(self, x, ctx, layer, cfg: GPT2Config):
    h = self.ln_1(x)
    q = einsum("btd,dnh->btnh", h, self.q_dnh[...]) + self.q_bias_nh[...]
    k = einsum("btd,dnh->btnh", h, self.k_dnh[...]) + self.k_bias_nh[...]
    v = einsum("btd,dnh->btnh", h, self.v_dnh[...]) + self.v_bias_nh[...]
    scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    out, kv, stats = kv_cache.attend_layer(ctx, layer, q, k, v, scale=scale,
                                         sliding_window=None)
    x = x + einsum("btnh,nhd->btd", out.astype(x.dtype), self.o_nhd[...]) + \
        self.o_bias_d[...]
    h = einsum("btd,df->btf", self.ln_2(x), self.up_df[...]) + self.up_bias_f[...]
    h = layers.ACTIVATIONS[cfg.activation](h)
    x = x + einsum("btf,fd->btd", h, self.down_fd[...]) + self.down_bias_d[...]
    return x, kv, stats


class Model(nnx.Module):
  def __init__(self, cfg: GPT2Config, dtype=jnp.float32, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_vd = layers.param(rngs, (cfg.vocab_size, cfg.width), dtype)
    self.pos_embed_sd = layers.param(rngs, (cfg.max_length, cfg.width), dtype, std=0.01)
    self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.ln_f = layers.LayerNorm(cfg.width, cfg.norm_eps, dtype)

  def __call__(self, tokens, cache=None, *, attention=None, implementation="xla",
               return_stats=False, lengths=None, sizes=None, head=True):
    ctx = kv_cache.make_context(tokens, cache, attention, implementation, return_stats,
                               lengths, sizes)
    emb = self.embed_vd[...]
    x = emb[tokens] + self.pos_embed_sd[...][ctx.positions]
    x, new_kv, stats = kv_cache.run_layers(self.layers, x, ctx, self.cfg)
    return kv_cache.finish(self.head(x) if head else x, ctx, new_kv, stats, head)

  def head(self, x):
    """Logits [..., V] of final hidden states x [..., D]."""
    return einsum("...d,vd->...v", self.ln_f(x), self.embed_vd[...])


# Conversions: see condensate_jax/weights/hf.py (CONVERSIONS).
HF_KEYS = [
    (r"wte\.weight", "embed_vd", "copy"),
    (r"wpe\.weight", "pos_embed_sd", "copy"),
    (r"ln_f\.weight", "ln_f/scale_d", "copy"),
    (r"ln_f\.bias", "ln_f/bias_d", "copy"),
    (r"h\.(\d+)\.ln_1\.weight", "layers/{0}/ln_1/scale_d", "copy"),
    (r"h\.(\d+)\.ln_1\.bias", "layers/{0}/ln_1/bias_d", "copy"),
    (r"h\.(\d+)\.ln_2\.weight", "layers/{0}/ln_2/scale_d", "copy"),
    (r"h\.(\d+)\.ln_2\.bias", "layers/{0}/ln_2/bias_d", "copy"),
    (r"h\.(\d+)\.attn\.c_attn\.weight",
     ("layers/{0}/q_dnh", "layers/{0}/k_dnh", "layers/{0}/v_dnh"), "conv1d_qkv"),
    (r"h\.(\d+)\.attn\.c_attn\.bias",
     ("layers/{0}/q_bias_nh", "layers/{0}/k_bias_nh", "layers/{0}/v_bias_nh"),
     "conv1d_qkv"),
    (r"h\.(\d+)\.attn\.c_proj\.weight", "layers/{0}/o_nhd", "conv1d_o"),
    (r"h\.(\d+)\.attn\.c_proj\.bias", "layers/{0}/o_bias_d", "copy"),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", "layers/{0}/up_df", "conv1d"),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", "layers/{0}/up_bias_f", "copy"),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", "layers/{0}/down_fd", "conv1d"),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", "layers/{0}/down_bias_d", "copy"),
]
# The causal-mask buffers old checkpoints carry; lm_head is tied to wte.
HF_IGNORED_KEYS = [r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias", r"lm_head\.weight"]
