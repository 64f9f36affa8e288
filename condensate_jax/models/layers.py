"""Layers shared by the model families: dtypes, einsum, parameters, norms, RoPE,
activations and the MHA config helpers.

Axis letters follow `condensate_jax/glossary.py`: B batch, T query positions, S key
positions, D width, N query heads, K kv heads, H head dim, F MLP width, V vocabulary.
Parameters carry their axes in their names (`q_dnh`: [D, N, H]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
