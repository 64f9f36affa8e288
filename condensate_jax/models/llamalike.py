"""Llama-like decoders: Llama, TinyLlama, Mistral, Qwen2, SmolLM2 (one family, switches).

RMSNorm, RoPE (default / linear / llama3 / dynamic), SwiGLU MLP, GQA/MQA, optional q/k/v
bias (Qwen2), tied embeddings (SmolLM2, small Qwen2), sliding window (Mistral; Qwen2 per
layer).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
from flax import nnx

from condensate_jax.models import kv_cache, hf_config, layers
from condensate_jax.models.layers import Rope, einsum

FAMILY = "llamalike"
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_width: int
  rope: Rope
  max_length: int
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = False
  sliding_window: Optional[int] = None
  # Per layer: True where the sliding window applies (None: every layer when set).
  sliding_layers: Optional[tuple[bool, ...]] = None
  activation: str = "silu"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}: "
                       "expected num_heads to be a multiple of num_kv_heads.")
    if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
      raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries: expected "
                       f"num_layers={self.num_layers}.")
    layers.check_activation(self.activation, "activation")

  def window(self, layer: int) -> Optional[int]:
    if self.sliding_window is None:
      return None
    if self.sliding_layers is None or self.sliding_layers[layer]:
      return self.sliding_window
    return None

  # ------------------------------------------------------------------ presets
  @classmethod
  def smollm2_135m(cls) -> "LlamaConfig":
    return cls(vocab_size=49152, width=576, num_layers=30, num_heads=9, num_kv_heads=3,
               head_dim=64, mlp_width=1536, rope=Rope(theta=100000.0, rotary_dim=64),
               max_length=8192, tie_embeddings=True)

  @classmethod
  def tinyllama_1_1b(cls) -> "LlamaConfig":
    return cls(vocab_size=32000, width=2048, num_layers=22, num_heads=32, num_kv_heads=4,
               head_dim=64, mlp_width=5632, rope=Rope(theta=10000.0, rotary_dim=64),
               max_length=2048)

  @classmethod
  def mistral_7b(cls) -> "LlamaConfig":
    return cls(vocab_size=32000, width=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               head_dim=128, mlp_width=14336, rope=Rope(theta=10000.0, rotary_dim=128),
               max_length=32768, sliding_window=4096)

  @classmethod
  def qwen2_0_5b(cls) -> "LlamaConfig":
    return cls(vocab_size=151936, width=896, num_layers=24, num_heads=14, num_kv_heads=2,
               head_dim=64, mlp_width=4864, rope=Rope(theta=1000000.0, rotary_dim=64),
               max_length=131072, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True)

  @classmethod
  def tiny(cls, vocab_size: int = 258, max_length: int = 512) -> "LlamaConfig":
    return cls(vocab_size=vocab_size, width=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, mlp_width=128, rope=Rope(theta=10000.0, rotary_dim=16),
               max_length=max_length)

  # ------------------------------------------------------------------ HF
  _HANDLED = frozenset({
      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
      "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps",
      "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
      "attention_bias", "mlp_bias", "tie_word_embeddings", "sliding_window",
      "use_sliding_window", "max_window_layers", "layer_types", "hidden_act"})

  @classmethod
  def from_hf_config(cls, hf: dict) -> "LlamaConfig":
    model_type = hf.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
      raise ValueError(f"model_type={model_type!r}: the llamalike family expects one of "
                       f"{HF_MODEL_TYPES}.")
    hf_config.check_hf_keys(hf, cls._HANDLED, set(), FAMILY)
    req = lambda k: hf_config.require(hf, k, FAMILY)
    width, heads, n_layers = req("hidden_size"), req("num_attention_heads"), \
        req("num_hidden_layers")
    head_dim = hf.get("head_dim") or width // heads
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling")
    rope = layers.rope_from_hf(rope_params, theta=hf.get("rope_theta", 10000.0),
                               rotary_dim=head_dim, where="rope_parameters")
    window, sliding_layers = _sliding(hf, model_type, n_layers)
    qkv_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    return cls(
        vocab_size=req("vocab_size"), width=width, num_layers=n_layers, num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        mlp_width=req("intermediate_size"), rope=rope,
        max_length=req("max_position_embeddings"), norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=qkv_bias, o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window, sliding_layers=sliding_layers,
        activation=layers.check_activation(hf.get("hidden_act", "silu"), "hidden_act"))


def _sliding(hf: dict, model_type: str, layers: int):
  window = hf.get("sliding_window")
  if model_type == "llama" or window is None:
    if hf.get("use_sliding_window"):
      raise ValueError("use_sliding_window=True without sliding_window: expected an int.")
    return None, None
  if model_type == "mistral":
    return int(window), None
  # qwen2: transformers' rule (current and older layouts)
  if not hf.get("use_sliding_window", False):
    return None, None
  types = hf.get("layer_types")
  if types is None:
    first = hf.get("max_window_layers", 28)
    types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
  allowed = ("sliding_attention", "full_attention")
  if len(types) != layers or any(t not in allowed for t in types):
    raise ValueError(f"layer_types={types!r}: expected {layers} entries from {allowed}.")
  return int(window), tuple(t == "sliding_attention" for t in types)


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_dnh = layers.param(rngs, (d, n, h), dtype)
    self.k_dkh = layers.param(rngs, (d, k, h), dtype)
    self.v_dkh = layers.param(rngs, (d, k, h), dtype)
    self.o_nhd = layers.param(rngs, (n, h, d), dtype, std=(n * h)**-0.5)
    bias = cfg.qkv_bias
    self.q_bias_nh = layers.param(rngs, (n, h), dtype) if bias else None
    self.k_bias_kh = layers.param(rngs, (k, h), dtype) if bias else None
    self.v_bias_kh = layers.param(rngs, (k, h), dtype) if bias else None
    self.o_bias_d = layers.param(rngs, (d,), dtype) if cfg.o_bias else None

  def __call__(self, x, ctx, layer: int, cfg: LlamaConfig):
    q = einsum("btd,dnh->btnh", x, self.q_dnh[...])
    k = einsum("btd,dkh->btkh", x, self.k_dkh[...])
    v = einsum("btd,dkh->btkh", x, self.v_dkh[...])
    if self.q_bias_nh is not None:
      q, k, v = q + self.q_bias_nh[...], k + self.k_bias_kh[...], v + self.v_bias_kh[...]
    q, k = cfg.rope.apply(q, ctx.positions), cfg.rope.apply(k, ctx.positions)
    out, kv, stats = kv_cache.attend_layer(ctx, layer, q, k, v, scale=cfg.head_dim**-0.5,
                                         sliding_window=cfg.window(layer))
    y = einsum("btnh,nhd->btd", out.astype(x.dtype), self.o_nhd[...])
    if self.o_bias_d is not None:
      y = y + self.o_bias_d[...]
    return y, kv, stats


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (gelu-tanh)."""

  def __init__(self, width: int, mlp_width: int, activation: str, bias: bool, dtype,
               rngs: nnx.Rngs):
    self.activation = activation
    self.gate_df = layers.param(rngs, (width, mlp_width), dtype)
    self.up_df = layers.param(rngs, (width, mlp_width), dtype)
    self.down_fd = layers.param(rngs, (mlp_width, width), dtype)
    self.gate_bias_f = layers.param(rngs, (mlp_width,), dtype) if bias else None
    self.up_bias_f = layers.param(rngs, (mlp_width,), dtype) if bias else None
    self.down_bias_d = layers.param(rngs, (width,), dtype) if bias else None

  def __call__(self, x):
    gate = einsum("btd,df->btf", x, self.gate_df[...])
    up = einsum("btd,df->btf", x, self.up_df[...])
    if self.gate_bias_f is not None:
      gate, up = gate + self.gate_bias_f[...], up + self.up_bias_f[...]
    y = einsum("btf,fd->btd", layers.ACTIVATIONS[self.activation](gate) * up,
               self.down_fd[...])
    return y if self.down_bias_d is None else y + self.down_bias_d[...]


class Block(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.attn_norm = layers.RMSNorm(cfg.width, cfg.norm_eps, dtype)
    self.attn = Attention(cfg, dtype, rngs)
    self.mlp_norm = layers.RMSNorm(cfg.width, cfg.norm_eps, dtype)
    self.mlp = GatedMLP(cfg.width, cfg.mlp_width, cfg.activation, cfg.mlp_bias, dtype, rngs)

  def __call__(self, x, ctx, layer, cfg):
    y, kv, stats = self.attn(self.attn_norm(x), ctx, layer, cfg)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), kv, stats


class Model(nnx.Module):
  def __init__(self, cfg: LlamaConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_vd = layers.param(rngs, (cfg.vocab_size, cfg.width), dtype)
    self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.width, cfg.norm_eps, dtype)
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
    return kv_cache.unembed(self.final_norm(x), self.embed_vd, self.unembed_dv)


# Checkpoint key (prefix-stripped, HF layout) -> module path and conversion.
# Linear weights are [out, in] in HF: transpose, then reshape to the parameter's shape.
HF_KEYS = [
    (r"embed_tokens\.weight", "embed_vd", "copy"),
    (r"norm\.weight", "final_norm/scale_d", "copy"),
    (r"lm_head\.weight", "unembed_dv", "linear"),
    (r"layers\.(\d+)\.input_layernorm\.weight", "layers/{0}/attn_norm/scale_d", "copy"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", "layers/{0}/mlp_norm/scale_d",
     "copy"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.weight", "layers/{0}/attn/q_dnh", "linear"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.weight", "layers/{0}/attn/k_dkh", "linear"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.weight", "layers/{0}/attn/v_dkh", "linear"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", "layers/{0}/attn/o_nhd", "linear_o"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.bias", "layers/{0}/attn/q_bias_nh", "bias"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.bias", "layers/{0}/attn/k_bias_kh", "bias"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.bias", "layers/{0}/attn/v_bias_kh", "bias"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.bias", "layers/{0}/attn/o_bias_d", "copy"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", "layers/{0}/mlp/gate_df", "linear"),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", "layers/{0}/mlp/up_df", "linear"),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", "layers/{0}/mlp/down_fd", "linear"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.bias", "layers/{0}/mlp/gate_bias_f", "copy"),
    (r"layers\.(\d+)\.mlp\.up_proj\.bias", "layers/{0}/mlp/up_bias_f", "copy"),
    (r"layers\.(\d+)\.mlp\.down_proj\.bias", "layers/{0}/mlp/down_bias_d", "copy"),
]
# Buffers some checkpoints carry that are recomputed here.
HF_IGNORED_KEYS = [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"rotary_emb\.inv_freq"]
