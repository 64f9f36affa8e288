"""Layout shared by the kernel backends: group heads, pad, fold masks into indices.

Kernels see one program per (batch, K/V head, query): the G query heads of a group, the
group's shared index list and the G per-head lists. Invalid slots hold -1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from pallas_kernels.util import next_pow2, round_up


class Grouped(NamedTuple):
  q: jnp.ndarray      # [B, T, Hkv, Gp, Dp]  (zero padded)
  k: jnp.ndarray      # [B, S, Hkv, Dp]
  v: jnp.ndarray      # [B, S, Hkv, Dp]
  hidx: jnp.ndarray   # [B, Hkv, Gp, T, Nh]  int32, -1 = unused
  sidx: jnp.ndarray   # [B, Hkv, T, Ns]      int32, -1 = unused
  n_head: int         # per-head list length before padding (0: none)
  n_shared: int       # shared list length before padding (0: none)


def group(q, k, v, indices, valid, shared_indices, shared_valid, *, pad_heads_to=1,
          pad_dim_to=1, head_chunk=1, shared_chunk=1) -> Grouped:
  """Regroups the op's inputs for a kernel; pads G to a multiple of `pad_heads_to`
  (or to a power of two when pad_heads_to == "pow2"), D likewise, lists to chunk multiples
  (at least one chunk, all -1, when a list is absent)."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  gp = next_pow2(g) if pad_heads_to == "pow2" else round_up(g, pad_heads_to)
  dp = next_pow2(d) if pad_dim_to == "pow2" else round_up(d, pad_dim_to)
  qg = q.reshape(b, t, hkv, g, d)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, dp - d)))
  if dp != d:
    k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
  n_head = indices.shape[-1]
  hidx = jnp.where(valid, indices.astype(jnp.int32), -1).reshape(b, hkv, g, t, n_head)
  nh = max(round_up(n_head, head_chunk), head_chunk)
  hidx = jnp.pad(hidx, ((0, 0), (0, 0), (0, gp - g), (0, 0), (0, nh - n_head)),
                 constant_values=-1)
  if shared_indices is None:
    n_shared = 0
    sidx = jnp.full((b, hkv, t, shared_chunk), -1, jnp.int32)
  else:
    n_shared = shared_indices.shape[-1]
    sidx = jnp.where(shared_valid, shared_indices.astype(jnp.int32), -1)
    ns = max(round_up(n_shared, shared_chunk), shared_chunk)
    sidx = jnp.pad(sidx, ((0, 0), (0, 0), (0, 0), (0, ns - n_shared)), constant_values=-1)
  return Grouped(qg, k, v, hidx, sidx, n_head, n_shared)


def ungroup(o, lse, q_shape):
  """o [B, T, Hkv, Gp, Dp], lse [B, Hkv, T, Gp] -> o [B, T, Hq, D], lse [B, Hq, T]."""
  b, t, hq, d = q_shape
  hkv = o.shape[2]
  g = hq // hkv
  o = o[:, :, :, :g, :d].reshape(b, t, hq, d)
  lse = lse[..., :g].transpose(0, 1, 3, 2).reshape(b, hq, t)
  return o, lse


def online_softmax_step(carry, s, v_weighted_sum):
  """One chunk of the online softmax (all float32).

  carry = (m [Gp], l [Gp], acc [Gp, D]); s [Gp, C] scores with -inf at unused slots;
  v_weighted_sum(p) -> [Gp, D] computes sum_c p[g, c] * v_row[g, c].
  """
  m, l, acc = carry
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m - m_use)
  p = jnp.exp(s - m_use[:, None])
  l = alpha * l + jnp.sum(p, axis=1)
  acc = alpha[:, None] * acc + v_weighted_sum(p)
  return m_new, l, acc


def finish(m, l, acc):
  """m, l [..., Gp], acc [..., Gp, D] -> o [..., Gp, D] float32 (0 for an empty set),
  lse [..., Gp] (-inf for an empty set); a NaN l stays NaN."""
  nonempty = l != 0
  l_safe = jnp.where(nonempty, l, 1.0)
  o = jnp.where(nonempty[..., None], acc / l_safe[..., None], 0.0)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  lse = jnp.where(nonempty, m_safe + jnp.log(l_safe), -jnp.inf)
  return o, lse
