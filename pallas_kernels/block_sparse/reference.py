"""Block-sparse attention, reference (plain jnp): the spec of the two ops.

block_decode (one query per (b, t), T queries handled independently)
  Each query (b, t, h) is split into NS partial sets, one per split s:
    split 0 (if with_static):  the anchor range a_lo..a_hi and window range w_lo..w_hi;
    every split:               for each block id j >= 0 in blocks[b, h // G, t, s, :],
                               the keys of block j (positions j*P .. j*P+P-1) that lie in
                               the middle range m_lo..m_hi and below S.
  (all ranges inclusive, from ranges[b, t] = (a_lo, a_hi, w_lo, w_hi, m_lo, m_hi, *, *)).
  Per split: o_s = softmax-weighted sum of v over the partial set (float32, 0 if empty)
  and lse_s = log sum exp(scale * q.k) (-inf if empty). `combine` merges the splits.
  Callers keep the partial sets disjoint (distinct blocks; windows outside the middle).

block_prefill (causal prefill; query t sits at position S - T + t)
  Query block I (queries I*P .. I*P+P-1) attends the key blocks listed in
  kblocks[b, h, I, :] (-1 = none); in a listed block, query i sees key j iff j <= pos_i and
    j < anchor  or  j > pos_i - window  or  (kflags[b, h, I, entry] and j is a middle key).
  The list must contain every block holding an anchor or window key of its queries (the
  caller builds such lists); then the set of query i is
  anchor ∪ window ∪ (middle ∩ flagged blocks). Returns o [B, T, H, D] (q.dtype) and lse.

Shapes: q [B, T, Hq, D]; k, v [B, S, Hkv, D]; Hq a multiple of Hkv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
NEG_INF = float("-inf")


def _scores(q, k, scale):
  """[B, T, Hq, D] x [B, S, Hkv, D] -> [B, Hq, T, S] float32."""
  hq, hkv = q.shape[2], k.shape[2]
  kk = jnp.repeat(k, hq // hkv, axis=2)
  return jnp.einsum("bthd,bshd->bhts", q, kk, preferred_element_type=jnp.float32,
                    precision=_HIGHEST) * jnp.float32(scale)


def _softmax_parts(s, mask, v, hq):
  """s [B, Hq, T, ..., S] masked softmax over S -> (o [..., D], lse) float32."""
  s = jnp.where(mask, s, NEG_INF)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.exp(s - m)
  l = jnp.sum(p, -1)
  vv = jnp.repeat(v, hq // v.shape[2], axis=2).astype(jnp.float32)     # [B, S, Hq, D]
  o = jnp.einsum("bht...s,bshd->bht...d", p, vv, precision=_HIGHEST)
  ok = l != 0            # a NaN l stays NaN (the kernels' convention)
  o = jnp.where(ok[..., None], o / jnp.where(ok, l, 1.0)[..., None], 0.0)
  lse = jnp.where(ok, m[..., 0] + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  return o, lse


def block_decode(q, k, v, blocks, ranges, *, block_size, scale, with_static=True):
  """Returns o_parts [B, T, Hq, NS, D] float32, lse_parts [B, Hq, T, NS] float32."""
  b, t, hq, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  ns = blocks.shape[3]
  j = jnp.arange(s_len, dtype=jnp.int32)
  r = ranges[..., None]                                             # [B, T, 8, 1]
  in_range = lambda a, c: (j >= r[:, :, a]) & (j <= r[:, :, c])      # [B, T, S]
  static = in_range(0, 1) | in_range(2, 3)
  middle = in_range(4, 5)
  blk_of = (j // block_size)
  hit = jnp.any(blocks[..., None] == blk_of, axis=-2)                 # [B, K, T, NS, S]
  mask = hit & middle[:, None, :, None]
  if with_static:
    first = jnp.arange(ns) == 0
    mask = mask | (first[:, None] & static[:, None, :, None])
  mask = jnp.repeat(mask, g, axis=1)                                  # [B, Hq, T, NS, S]
  s = _scores(q, k, scale)[:, :, :, None, :]
  o, lse = _softmax_parts(s, mask, v, hq)
  return o.transpose(0, 2, 1, 3, 4), lse


def combine(o_parts, lse_parts):
  """Merges splits: o_parts [B, T, Hq, NS, D], lse_parts [B, Hq, T, NS] ->
  o [B, T, Hq, D] float32, lse [B, Hq, T]."""
  lse = jax.nn.logsumexp(lse_parts, axis=-1)
  lse = jnp.where(jnp.isnan(lse), NEG_INF, lse)
  w = jnp.exp(lse_parts - jnp.where(jnp.isneginf(lse), 0.0, lse)[..., None])
  w = jnp.where(jnp.isneginf(lse_parts), 0.0, w)
  o = jnp.einsum("bhtn,bthnd->bthd", w, o_parts, precision=_HIGHEST)
  return o, lse


def prefill_mask(t_len, s_len, kblocks, kflags, *, block_size, anchor, window):
  """The prefill op's key mask [B, H, T, S] bool."""
  pos = s_len - t_len + jnp.arange(t_len, dtype=jnp.int32)[:, None]   # [T, 1]
  j = jnp.arange(s_len, dtype=jnp.int32)
  qblk = jnp.arange(t_len) // block_size
  lists, flags = kblocks[:, :, qblk], kflags[:, :, qblk]                # [B, H, T, L]
  hit = lists[..., None] == (j // block_size)                           # [B, H, T, L, S]
  listed = jnp.any(hit, -2)
  flagged = jnp.any(hit & (flags[..., None] > 0), -2)
  static = (j < anchor) | (j > pos - window)
  middle = (j >= anchor) & (j <= pos - window)
  return listed & (j <= pos) & (static | (flagged & middle))


def block_prefill(q, k, v, kblocks, kflags, *, block_size, anchor, window, scale):
  """Returns o [B, T, Hq, D] (q.dtype), lse [B, Hq, T] float32."""
  b, t, hq, _ = q.shape
  mask = prefill_mask(t, k.shape[1], kblocks, kflags, block_size=block_size,
                      anchor=anchor, window=window)
  o, lse = _softmax_parts(_scores(q, k, scale), mask, v, hq)
  return o.transpose(0, 2, 1, 3).astype(q.dtype), lse
