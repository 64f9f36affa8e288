"""Dense and condensate attention with one signature (DESIGN.md §1, §3).

Layout: q [B, T, Hq, D], k and v [B, S, Hkv, D], output [B, T, Hq, D] in q's dtype.
Scores, softmax and the weighted sum accumulate in float32.

Exactness contract: `dense_attention` and the masked condensate implementation share one
softmax kernel (`_masked_softmax`); when a query's set covers every visible key, its mask
equals the visible mask and the two compute the same floating-point operations, so the
outputs are bitwise equal. The gathered implementation sums the set in a different order
(always through its gather, so its own code is what the tests check): it agrees with the
masked one to float rounding, never bitwise by construction. `BITWISE_DENSE` names the
implementations that promise bitwise equality with dense when the set covers everything.

NaN or Inf in q, k or v propagate to the outputs of the queries that read them (and,
as in any masked attention, a NaN in v at a masked position reaches every query of that
row through 0 * NaN); nothing raises.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from condensate_jax import selection as sel
from condensate_jax.selection import AttentionStats
from condensate_jax.spec import CondensateSpec, check_spec

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_DTYPE_NAMES = ("float32", "bfloat16", "float16")
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name}: expected an array, got {type(x).__name__}.")
    if x.ndim != 4:
      raise ValueError(
          f"{name}.shape={tuple(x.shape)}: expected 4 dims "
          f"({'[B, T, Hq, D]' if name == 'q' else '[B, S, Hkv, D]'}).")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in DTYPES]:
      raise ValueError(
          f"{name}.dtype={jnp.dtype(x.dtype).name}: expected one of {_DTYPE_NAMES}.")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(
        f"q, k, v dtypes {q.dtype.name}, {k.dtype.name}, {v.dtype.name}: expected one "
        "dtype for all three.")
  if k.shape != v.shape:
    raise ValueError(
        f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)}: expected equal shapes.")
  b, _, hq, d = q.shape
  if k.shape[0] != b:
    raise ValueError(f"k.shape[0]={k.shape[0]}: expected the batch size of q, {b}.")
  if k.shape[3] != d:
    raise ValueError(f"k.shape[3]={k.shape[3]}: expected the head dim of q, {d}.")
  if d == 0:
    raise ValueError("q.shape[3]=0: expected a head dim >= 1.")
  hkv = k.shape[2]
  if hkv == 0 or hq % hkv:
    raise ValueError(
        f"q heads {hq}, k/v heads {hkv}: expected q heads to be a positive multiple "
        "of k/v heads (MHA, GQA or MQA).")
  if k.shape[1] == 0:
    raise ValueError("k.shape[1]=0: expected at least one key.")


def _check_int_array(name, x, shape, lo, hi):
  if _is_concrete(x) and not isinstance(x, jax.Array):
    x = np.asarray(x)  # range-check in NumPy: jnp.asarray would wrap int64 to int32
    if np.issubdtype(x.dtype, np.integer) and x.size and (x.min() < lo or x.max() > hi):
      raise ValueError(
          f"{name} has values in [{x.min()}, {x.max()}]: expected values in [{lo}, {hi}].")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name}.dtype={x.dtype.name}: expected an integer dtype.")
  if tuple(x.shape) != shape:
    raise ValueError(f"{name}.shape={tuple(x.shape)}: expected {shape}.")
  if _is_concrete(x) and x.size:
    xs = np.asarray(x)
    if xs.min() < lo or xs.max() > hi:
      raise ValueError(
          f"{name} has values in [{xs.min()}, {xs.max()}]: expected values in "
          f"[{lo}, {hi}].")
  return x.astype(jnp.int32)


def _prepare(q, k, v, *, causal, q_positions, kv_lengths, sliding_window, scale):
  """Validates inputs; returns (kv_lengths [B], q_positions [B,T], scale)."""
  _check_qkv(q, k, v)
  b, t, _, d = q.shape
  s = k.shape[1]
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal={causal!r}: expected True or False.")
  if sliding_window is not None and (isinstance(sliding_window, bool) or
                                     not isinstance(sliding_window, (int, np.integer))
                                     or sliding_window < 1):
    raise ValueError(f"sliding_window={sliding_window!r}: expected None or an int >= 1.")
  if scale is None:
    scale = 1.0 / float(np.sqrt(d))
  elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or (
      not np.isfinite(scale)) or scale <= 0:
    raise ValueError(f"scale={scale!r}: expected None or a finite float > 0.")
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)
  else:
    kv_lengths = _check_int_array("kv_lengths", kv_lengths, (b,), 0, s)
  if q_positions is None:
    q_positions = kv_lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)
  else:
    q_positions = _check_int_array("q_positions", q_positions, (b, t), 0, s - 1)
  return kv_lengths, q_positions, float(scale)


def _static_window(sliding_window):
  return None if sliding_window is None else int(sliding_window)


# ------------------------------------------------------------------------------ kernels


def _scores(q, k, scale):
  """q [B,T,Hq,D], k [B,S,K,D] -> scores [B,K,G,T,S] float32."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                 precision=_HIGHEST)
  return s * jnp.float32(scale)


def _masked_softmax(scores, mask, v, out_dtype):
  """softmax(scores | mask) @ v; rows with an empty mask give 0. Returns [B,T,Hq,D].

  The optimization barrier makes the dense and the condensate graphs hand this function
  the same materialised operands (full-shape float32 scores, full-shape bool mask, v):
  without it XLA fuses the mask (and on GPU the score scaling) differently into each
  graph, and on GPU the covers-everything outputs drifted from dense by ~1e-6 (seen on an
  H200, jax 0.11.2). With it both graphs compile this part to the same kernels.
  """
  mask = jnp.broadcast_to(mask, scores.shape)
  scores, mask, v = jax.lax.optimization_barrier((scores, mask, v))
  s = jnp.where(mask, scores, sel.NEG_INF)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(jnp.float32), precision=_HIGHEST)
  o = o / jnp.where(l > 0, l, 1.0)[..., None]
  b, hkv, g, t, d = o.shape
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d).astype(out_dtype)


def _heads_last(x):
  """[B, K, G, T] -> [B, Hq, T]."""
  b, hkv, g, t = x.shape
  return x.reshape(b, hkv * g, t)


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "scale"))
def _dense(q, k, v, q_positions, kv_lengths, *, causal, sliding_window, scale):
  lo, hi = sel.visible_range(q_positions, kv_lengths, causal=causal,
                             sliding_window=sliding_window)
  j = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = (j >= lo[:, None, None, :, None]) & (j <= hi[:, None, None, :, None])
  return _masked_softmax(_scores(q, k, scale), visible, v, q.dtype)


def _select(q, k, q_positions, kv_lengths, spec, causal, sliding_window, scale):
  lo, hi = sel.visible_range(q_positions, kv_lengths, causal=causal,
                             sliding_window=sliding_window)
  scores = _scores(q, k, scale)
  return scores, lo, hi, sel.select(scores, lo, hi, spec)


def _stats(scores, selection):
  return AttentionStats(*map(_heads_last, sel.certificate(scores, selection)))


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def _condensate_masked(q, k, v, q_positions, kv_lengths, *, spec, causal, sliding_window,
                       scale, return_stats):
  scores, _, _, selection = _select(q, k, q_positions, kv_lengths, spec, causal,
                                    sliding_window, scale)
  out = _masked_softmax(scores, selection.in_set, v, q.dtype)
  return (out, _stats(scores, selection)) if return_stats else out


def _gather_rows(x, idx):
  """x [B,S,K,D], idx [B,K,G,T,N] -> rows [B,K,G,T,N,D]."""
  b, _, hkv, d = x.shape
  flat = idx.reshape(b, hkv, -1, 1)
  rows = jnp.take_along_axis(x.transpose(0, 2, 1, 3), flat, axis=2)
  return rows.reshape(idx.shape + (d,))


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def _condensate_gathered(q, k, v, q_positions, kv_lengths, *, spec, causal,
                         sliding_window, scale, return_stats):
  scores, lo, hi, selection = _select(q, k, q_positions, kv_lengths, spec, causal,
                                      sliding_window, scale)
  idx, valid = sel.set_indices(selection, lo, hi, spec, k.shape[1])
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)
  k_rows, v_rows = _gather_rows(k, idx), _gather_rows(v, idx)
  s = jnp.einsum("bkgtd,bkgtnd->bkgtn", qg, k_rows, preferred_element_type=jnp.float32,
                 precision=_HIGHEST) * jnp.float32(scale)
  s = jnp.where(valid, s, sel.NEG_INF)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgtn,bkgtnd->bkgtd", p, v_rows.astype(jnp.float32),
                 precision=_HIGHEST)
  o = o / jnp.where(l > 0, l, 1.0)[..., None]
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)
  return (out, _stats(scores, selection)) if return_stats else out


# -------------------------------------------------------------------------- public API

# name -> function(q, k, v, q_positions, kv_lengths, *, spec, causal, sliding_window,
#                  scale, return_stats). Kernel packages register more (e.g. "pallas").
IMPLEMENTATIONS: dict[str, Callable] = {
    "xla_masked": _condensate_masked,
    "xla_gathered": _condensate_gathered,
}
# "xla" picks the masked form: the gathered form materialises per-query K/V rows,
# T * budget * D per head, which exceeds K itself whenever T * budget > S, and both
# compute every score anyway for the exact top-k.
_ALIASES = {"xla": "xla_masked"}
# Implementations whose output is bitwise dense when the set covers every visible key
# (the experiments' exactness gate is bitwise for these, a float tolerance for others).
BITWISE_DENSE = frozenset({"xla", "xla_masked"})
# Implementations that live in optional modules, imported on first use; each module calls
# `register_implementation` for its names.
# spec.selection != "exact": implementation -> block-selection implementation.
_BLOCK_IMPLEMENTATIONS = {"xla": "xla_blocks", "xla_blocks": "xla_blocks",
                          "pallas": "pallas_blocks", "pallas_blocks": "pallas_blocks"}
_LAZY = {
    "pallas": "condensate_jax.pallas_impl",
    "xla_blocks": "condensate_jax.blocks",
    "pallas_blocks": "condensate_jax.blocks",
}


def register_implementation(name: str, fn: Callable) -> None:
  """Adds a condensate implementation selectable with `implementation=name`."""
  IMPLEMENTATIONS[name] = fn


def dense_attention(q, k, v, *, causal: bool = True, q_positions=None, kv_lengths=None,
                    sliding_window: Optional[int] = None,
                    scale: Optional[float] = None) -> jax.Array:
  """Softmax attention over every visible key.

  Args:
    q: [B, T, Hq, D] queries. k, v: [B, S, Hkv, D]; Hq a multiple of Hkv.
    causal: queries see keys at positions <= their own.
    q_positions: [B, T] int positions of the queries in [0, S); default: the last T
      positions before each row's kv_length.
    kv_lengths: [B] valid keys per row (a padded cache); default S.
    sliding_window: the model's own local-attention limit w: keys j > pos - w.
    scale: score scale; default 1/sqrt(D).
  Returns:
    [B, T, Hq, D] in q's dtype. Queries with no visible key get 0.
  """
  kv_lengths, q_positions, scale = _prepare(
      q, k, v, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  return _dense(q, k, v, q_positions, kv_lengths, causal=bool(causal),
                sliding_window=_static_window(sliding_window), scale=scale)


def condensate_attention(q, k, v, spec: CondensateSpec, *, causal: bool = True,
                         q_positions=None, kv_lengths=None,
                         sliding_window: Optional[int] = None,
                         scale: Optional[float] = None, implementation: str = "xla",
                         return_stats: bool = False):
  """Attention restricted to each query's condensate set (DESIGN.md §1).

  Same arguments as `dense_attention`, plus:
    spec: a `CondensateSpec` (static under jit).
    implementation: "xla" (= "xla_masked"), "xla_masked", "xla_gathered", or a name
      registered by a kernel package ("pallas").
    return_stats: also return an `AttentionStats` of [B, Hq, T] arrays.
  """
  check_spec(spec)
  if not isinstance(implementation, str):
    raise ValueError(f"implementation={implementation!r}: expected a str, one of "
                     f"{sorted(set(IMPLEMENTATIONS) | set(_ALIASES) | set(_LAZY))}.")
  name = _ALIASES.get(implementation, implementation)
  if spec.selection != "exact":
    # Block-summary selection modes (DESIGN.md §4) live in condensate_jax.blocks.
    if implementation not in _BLOCK_IMPLEMENTATIONS:
      raise ValueError(
          f"implementation={implementation!r} with spec.selection={spec.selection!r}: "
          f"expected one of {sorted(_BLOCK_IMPLEMENTATIONS)} (the masked and gathered XLA "
          "forms implement selection='exact' only).")
    name = _BLOCK_IMPLEMENTATIONS[implementation]
  if name not in IMPLEMENTATIONS and name in _LAZY:
    importlib.import_module(_LAZY[name])
  if name not in IMPLEMENTATIONS:
    allowed = sorted(set(IMPLEMENTATIONS) | set(_ALIASES) | set(_LAZY))
    raise ValueError(f"implementation={implementation!r}: expected one of {allowed}.")
  if not isinstance(return_stats, (bool, np.bool_)):
    raise ValueError(f"return_stats={return_stats!r}: expected True or False.")
  kv_lengths, q_positions, scale = _prepare(
      q, k, v, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  return IMPLEMENTATIONS[name](q, k, v, q_positions, kv_lengths, spec=spec,
                               causal=bool(causal),
                               sliding_window=_static_window(sliding_window),
                               scale=scale, return_stats=bool(return_stats))


def condensate_mask(q, k, spec: CondensateSpec, *, causal: bool = True, q_positions=None,
                    kv_lengths=None, sliding_window: Optional[int] = None,
                    scale: Optional[float] = None) -> jax.Array:
  """The condensate set as a [B, Hq, T, S] bool mask (selection="exact"), for analysis
  and plots. Same arguments and validation as `condensate_attention`."""
  check_spec(spec)
  if spec.selection != "exact":
    raise ValueError(f"spec.selection={spec.selection!r}: condensate_mask supports "
                     "selection='exact' only.")
  kv_lengths, q_positions, scale = _prepare(
      q, k, k, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  return _mask(q, k, q_positions, kv_lengths, spec=spec, causal=bool(causal),
               sliding_window=_static_window(sliding_window), scale=scale)


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale"))
def _mask(q, k, q_positions, kv_lengths, *, spec, causal, sliding_window, scale):
  *_, selection = _select(q, k, q_positions, kv_lengths, spec, causal, sliding_window,
                          scale)
  b, hkv, g, t, s = selection.in_set.shape
  return selection.in_set.reshape(b, hkv * g, t, s)


def attend(q, k, v, attention: Optional[CondensateSpec], **kwargs) -> jax.Array:
  """What a model layer calls: dense when `attention` is None, else condensate."""
  if attention is None:
    kwargs.pop("implementation", None)
    kwargs.pop("return_stats", None)
    return dense_attention(q, k, v, **kwargs)
  return condensate_attention(q, k, v, attention, **kwargs)
