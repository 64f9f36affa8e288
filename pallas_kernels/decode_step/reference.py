"""Fused decode step, reference (plain jnp): the spec of the op.

One decode query per batch row b, at position hi = kv_lengths[b] - 1 (0 <= kv_lengths[b]
<= S) of a cache of S keys in nb blocks of P (block n holds keys nP .. nP + P - 1). Query
head h of K/V head k = h // G (G = Hq / Hkv) attends the union of
  anchor:  keys 0 .. min(anchor, hi + 1) - 1,
  window:  keys max(hi - window + 1, anchor) .. hi,
  middle:  the keys anchor .. m_hi, m_hi = min(hi - window, S - 1), of the selected blocks
           ids[b, k, :top] (-1 = none; default top = W, the width of ids),
(disjoint; selected ids distinct, in 0 .. nb - 1, and, for W == next_pow2(top + 1), -1
beyond top) by softmax attention with scores scale * q . key:
  out = sum softmax(scores) v (0 for an empty set), lse = log sum exp(scores) (-inf for an
  empty set).
The certificate: with n_j the number of middle keys of block j (0 if none) and u [B, Hkv,
G or more, nb] per-block upper bounds on the scores (rows >= G ignored),
  log delta = logsumexp over the blocks j with n_j > 0 not selected of u_j + log n_j
  (-inf if none), eps = delta / (Z + delta) with Z = exp(lse): eps = 0 where delta = 0,
  else 1 where Z = 0.
Returns out [B, 1, Hq, D] (q's dtype), lse [B, Hq] and eps [B, Hq] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
NEG_INF = float("-inf")


def decode_step(q, k, v, ids, u, kv_lengths, *, block_size, scale, anchor, window,
                top=None):
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  if t != 1:
    raise ValueError(f"q.shape={tuple(q.shape)}: expected one decode query per row, "
                     "[B, 1, Hq, D].")
  g = hq // hkv
  p, nb = block_size, u.shape[-1]
  top = ids.shape[-1] if top is None else top
  sel = ids[..., :top].astype(jnp.int32)                                # [B, K, top]
  hi = jnp.asarray(kv_lengths, jnp.int32).reshape(b, 1) - 1             # [B, 1]
  m_hi = jnp.minimum(hi - window, s_len - 1)
  # the attended set [B, K, S]
  j = jnp.arange(s_len, dtype=jnp.int32)
  static = (j <= jnp.minimum(anchor - 1, hi)) | (
      (j >= jnp.maximum(hi - window + 1, anchor)) & (j <= hi))
  middle = (j >= anchor) & (j <= m_hi)
  chosen_key = jnp.any(sel[..., None] == (j // p), axis=-2)            # [B, K, S]
  mask = jnp.repeat(static[:, None] | (middle[:, None] & chosen_key), g, axis=1)
  kk, vv = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
  s = jnp.einsum("bhd,bshd->bhs", q[:, 0].astype(jnp.float32), kk,
                 precision=_HIGHEST) * jnp.float32(scale)
  s = jnp.where(mask, s, NEG_INF)                                       # [B, Hq, S]
  lse = jax.nn.logsumexp(s, axis=-1)
  lse = jnp.where(jnp.isnan(lse), NEG_INF, lse)
  w = jnp.exp(s - jnp.where(lse == NEG_INF, 0.0, lse)[..., None])
  out = jnp.einsum("bhs,bshd->bhd", w, vv, precision=_HIGHEST)
  out = out[:, None].astype(q.dtype)
  # the certificate
  start = jnp.arange(nb, dtype=jnp.int32) * p
  n_mid = jnp.minimum(m_hi, start + p - 1) - jnp.maximum(anchor, start) + 1   # [B, nb]
  chosen = jnp.any(sel[..., None] == jnp.arange(nb), axis=-2)          # [B, K, nb]
  drop = chosen[:, :, None] | (n_mid[:, None, None] <= 0)
  terms = jnp.where(drop, NEG_INF, u[:, :, :g].astype(jnp.float32)
                    + jnp.log(jnp.maximum(n_mid, 1).astype(jnp.float32))[:, None, None])
  log_delta = jax.nn.logsumexp(terms, axis=-1).reshape(b, hq)
  log_delta = jnp.where(jnp.isnan(log_delta), NEG_INF, log_delta)
  eps = jnp.where(lse == NEG_INF, 1.0, jax.nn.sigmoid(log_delta - lse))
  eps = jnp.where(log_delta == NEG_INF, 0.0, eps)
  return out, lse, eps
