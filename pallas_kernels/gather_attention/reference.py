"""Gather attention, reference (plain jnp): the spec of the op.

Each query (b, t, h) attends over a *list* of key positions: its own per-head list
`indices[b, h, t, :]` (where `valid`) plus, optionally, a list shared by every query head
of its K/V group, `shared_indices[b, h // G, t, :]` (where `shared_valid`), G = Hq / Hkv.
The condensate set of condensate-jax maps onto this as: per-head list = the dynamic
top-k, shared list = anchor ∪ window (identical for every head of a group), which lets a
kernel read those K/V rows once per group instead of once per head.

  s_j = scale * <q[b, t, h], k[b, j, h // G]>            (float32)
  lse = log sum_j exp(s_j)                               (over the valid entries)
  o   = sum_j exp(s_j - lse) * v[b, j, h // G]           (float32, cast to q.dtype)

Entries are a multiset: a position listed twice counts twice (callers pass distinct
positions). A query with no valid entry gets o = 0 and lse = -inf.

Shapes:
  q [B, T, Hq, D]; k, v [B, S, Hkv, D]; Hq a multiple of Hkv; q, k, v one float dtype.
  indices, valid [B, Hq, T, N]: int positions in [0, S) where valid (ignored elsewhere).
  shared_indices, shared_valid [B, Hkv, T, M] (optional, both or neither).
  Returns o [B, T, Hq, D] (q.dtype), lse [B, Hq, T] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def check_args(q, k, v, indices, valid, shared_indices, shared_valid, scale):
  """Shape/dtype checks shared by every implementation; returns the scale as a float."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name}.shape={getattr(x, 'shape', None)}: expected 4 dims.")
    if jnp.dtype(x.dtype).name not in _FLOAT_DTYPES:
      raise ValueError(
          f"{name}.dtype={jnp.dtype(x.dtype).name}: expected one of {_FLOAT_DTYPES}.")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one dtype.")
  b, t, hq, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k.shape={k.shape}, v.shape={v.shape}: expected equal shapes.")
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k.shape={k.shape}: expected [B={b}, S, Hkv, D={d}].")
  hkv = k.shape[2]
  if hkv == 0 or hq % hkv:
    raise ValueError(f"q heads {hq}, k/v heads {hkv}: expected a positive multiple.")
  if k.shape[1] == 0:
    raise ValueError("k.shape[1]=0: expected at least one key.")
  for name, idx, msk, heads in (("indices", indices, valid, hq),
                                ("shared_indices", shared_indices, shared_valid, hkv)):
    if idx is None and msk is None and name == "shared_indices":
      continue
    if idx is None or msk is None:
      raise ValueError(f"{name} and its valid mask: expected both or neither.")
    if getattr(idx, "ndim", None) != 4 or tuple(idx.shape[:3]) != (b, heads, t):
      raise ValueError(
          f"{name}.shape={getattr(idx, 'shape', None)}: expected [{b}, {heads}, {t}, N].")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
      raise ValueError(f"{name}.dtype={idx.dtype}: expected an integer dtype.")
    if tuple(msk.shape) != tuple(idx.shape) or msk.dtype != jnp.bool_:
      raise ValueError(
          f"valid mask of {name}: shape {msk.shape} dtype {msk.dtype}: expected bool "
          f"{tuple(idx.shape)}.")
  if scale is None:
    return 1.0 / float(np.sqrt(d))
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or (
      not np.isfinite(scale)) or scale <= 0:
    raise ValueError(f"scale={scale!r}: expected None or a finite float > 0.")
  return float(scale)


def _rows(x, idx):
  """x [B, S, Hkv, D], idx [B, Hkv, G, T, N] -> [B, Hkv, G, T, N, D]."""
  b, _, hkv, d = x.shape
  flat = idx.reshape(b, hkv, -1, 1)
  rows = jnp.take_along_axis(x.transpose(0, 2, 1, 3), flat, axis=2)
  return rows.reshape(idx.shape + (d,))


def gather_attention(q, k, v, indices, valid, *, scale=None, shared_indices=None,
                     shared_valid=None):
  """Reference gather attention; see the module docstring. Returns (o, lse)."""
  scale = check_args(q, k, v, indices, valid, shared_indices, shared_valid, scale)
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  idx = indices.astype(jnp.int32).reshape(b, hkv, g, t, -1)
  ok = valid.reshape(b, hkv, g, t, -1)
  if shared_indices is not None:
    m = shared_indices.shape[-1]
    sidx = jnp.broadcast_to(shared_indices.astype(jnp.int32)[:, :, None], (b, hkv, g, t, m))
    sok = jnp.broadcast_to(shared_valid[:, :, None], (b, hkv, g, t, m))
    idx = jnp.concatenate([sidx, idx], axis=-1)
    ok = jnp.concatenate([sok, ok], axis=-1)
  idx = jnp.clip(idx, 0, s_len - 1)
  qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).astype(jnp.float32)
  k_rows = _rows(k, idx).astype(jnp.float32)
  v_rows = _rows(v, idx).astype(jnp.float32)
  s = jnp.einsum("bkgtd,bkgtnd->bkgtn", qg, k_rows, precision=_HIGHEST) * jnp.float32(scale)
  s = jnp.where(ok, s, -jnp.inf)
  m_ = jnp.max(s, axis=-1, initial=-jnp.inf)
  m_safe = jnp.where(jnp.isneginf(m_), 0.0, m_)
  p = jnp.exp(s - m_safe[..., None])
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgtn,bkgtnd->bkgtd", p, v_rows, precision=_HIGHEST)
  ok = l != 0            # a NaN l stays NaN (the kernels' convention)
  o = jnp.where(ok[..., None], o / jnp.where(ok, l, 1.0)[..., None], 0.0)
  lse = jnp.where(ok, m_safe + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)
  return o, lse.reshape(b, hq, t).astype(jnp.float32)
