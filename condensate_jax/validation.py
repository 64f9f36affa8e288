"""Input validation shared by every entry point: arrays, integer arrays, static options.

The bottom layer of condensate_jax (imports only the spec): each check raises a
`ValueError` that names the argument, its value and what is allowed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from condensate_jax.spec import BLOCK_SELECTIONS, INT32_MAX, check_spec

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name}: expected an array, got {type(x).__name__}.")
    if x.ndim != 4:
      raise ValueError(
          f"{name}.shape={tuple(x.shape)}: expected 4 dims "
          f"({'[B, T, Hq, D]' if name == 'q' else '[B, S, Hkv, D]'}).")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in DTYPES]:
      raise ValueError(
          f"{name}.dtype={jnp.dtype(x.dtype).name}: expected one of {DTYPE_NAMES}.")
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


def check_int_array(name, x, shape, lo, hi):
  if is_concrete(x) and not isinstance(x, jax.Array):
    x = np.asarray(x)  # range-check in NumPy: jnp.asarray would wrap int64 to int32
    if np.issubdtype(x.dtype, np.integer) and x.size and (x.min() < lo or x.max() > hi):
      raise ValueError(
          f"{name} has values in [{x.min()}, {x.max()}]: expected values in [{lo}, {hi}].")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name}.dtype={x.dtype.name}: expected an integer dtype.")
  if tuple(x.shape) != shape:
    raise ValueError(f"{name}.shape={tuple(x.shape)}: expected {shape}.")
  if is_concrete(x) and x.size:
    xs = np.asarray(x)
    if xs.min() < lo or xs.max() > hi:
      raise ValueError(
          f"{name} has values in [{xs.min()}, {xs.max()}]: expected values in "
          f"[{lo}, {hi}].")
  return x.astype(jnp.int32)


def prepare(q, k, v, *, causal, q_positions, kv_lengths, sliding_window, scale):
  """Validates inputs; returns (kv_lengths [B], q_positions [B,T], scale)."""
  check_qkv(q, k, v)
  b, t, _, d = q.shape
  s = k.shape[1]
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal={causal!r}: expected True or False.")
  if sliding_window is not None and (isinstance(sliding_window, bool) or
                                     not isinstance(sliding_window, (int, np.integer))
                                     or not 1 <= sliding_window <= INT32_MAX):
    raise ValueError(f"sliding_window={sliding_window!r}: expected None or an int in "
                     f"[1, {INT32_MAX}].")
  scale = check_scale(scale, d)
  kv_given = kv_lengths is not None
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)
  else:
    kv_lengths = check_int_array("kv_lengths", kv_lengths, (b,), 0, s)
  if q_positions is None:
    # default: the last T positions before each row's length. A row with 0 < length < T
    # would put some queries at negative positions: refused (an empty row, length 0, is
    # a row with no visible key, whose queries give 0)
    short = None
    if is_concrete(kv_lengths):
      lengths = np.asarray(kv_lengths)
      short = lengths[(lengths > 0) & (lengths < t)]
    if short is not None and short.size:
      where = (f"kv_lengths={np.asarray(kv_lengths).tolist()}" if kv_given
               else f"k.shape[1]={s}")
      raise ValueError(f"{where}: q.shape[1]={t} queries with default positions need "
                       f"at least {t} keys in every non-empty row; pass q_positions.")
    q_positions = kv_lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)
  else:
    q_positions = check_int_array("q_positions", q_positions, (b, t), 0, s - 1)
  return kv_lengths, q_positions, scale


def check_scale(scale, head_dim: int, *, optional: bool = True) -> float:
  """scale: None (1/sqrt(head_dim), when optional) or a float > 0 that stays finite and
  nonzero in float32 (the scores are float32)."""
  if scale is None and optional:
    return 1.0 / float(np.sqrt(head_dim))
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or (
      not np.isfinite(scale)) or not (scale <= float(np.finfo(np.float32).max) and
                                      np.float32(scale) > 0):
    raise ValueError(f"scale={scale!r}: expected {'None or ' if optional else ''}a float "
                     "> 0 that stays finite and nonzero in float32 (at most "
                     f"{np.finfo(np.float32).max:.4g}, at least 1.4e-45).")
  return float(scale)


def static_window(sliding_window, num_keys=None):
  """The static window; clamped to num_keys (a window of S or more restricts nothing,
  and pos + window - 1 must stay inside int32)."""
  if sliding_window is None:
    return None
  return int(sliding_window) if num_keys is None else min(int(sliding_window), num_keys)


def check_bool(name, value):
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}={value!r}: expected True or False.")
  return bool(value)


def check_block_size(block_size, num_keys=None):
  """block_size: an int >= 1 whose padded cache (num_keys rounded up to it) fits int32."""
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or not (
      1 <= block_size <= INT32_MAX):
    raise ValueError(f"block_size={block_size!r}: expected an int in [1, {INT32_MAX}].")
  if num_keys is not None and -(-int(num_keys) // int(block_size)) * int(block_size) > (
      INT32_MAX):
    raise ValueError(f"block_size={block_size!r} with {num_keys} keys: the padded length "
                     f"exceeds {INT32_MAX} positions.")
  return int(block_size)


def check_keys(k, name="k"):
  if not hasattr(k, "shape") or getattr(k, "ndim", 0) != 4:
    raise ValueError(f"{name}: expected an array [B, S, Hkv, D], got "
                     f"{getattr(k, 'shape', type(k).__name__)}.")
  if not jnp.issubdtype(k.dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={jnp.dtype(k.dtype).name}: expected a float dtype.")


def check_decode_qkv(q, k, v, step: str):
  """q [B, 1, Hq, D], k, v [B, S, Hkv, D] of a decode step (`step` names it)."""
  check_qkv(q, k, v)
  if q.shape[1] != 1:
    raise ValueError(f"q.shape={tuple(q.shape)}: {step} takes one query per row "
                     "(q [B, 1, Hq, D]).")


def check_block_spec(spec):
  check_spec(spec)
  if not spec.uses_blocks:
    raise ValueError(f"spec.selection={spec.selection!r} (bounds={spec.bounds!r}): "
                     f"expected one of {BLOCK_SELECTIONS} with bounds='blocks' for "
                     "block-summary selection.")


def check_fast_spec(spec, step: str):
  """A spec the timed fast steps implement: selection="blocks" (`step` names the step)."""
  check_block_spec(spec)
  if spec.selection != "blocks":
    raise ValueError(f"spec.selection={spec.selection!r}: {step} implements "
                     "selection='blocks' (the other block modes run through "
                     "condensate_attention).")
