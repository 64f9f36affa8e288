"""The sets of the distributed call, one shard's part of each (`condensate_jax.distributed`
module docstring): the exact global top-k, "indexed" and "certified" on the key index
across shards, the shared collectives (global top-k, merged log-sum-exp) and the merged
statistics; the block sets are in `distributed.block_sets`. Every function runs inside
`jax.shard_map` (seq_axis None: one shard)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from condensate_jax import softmax
from condensate_jax.impl.xla_indexed import LOG_MARGIN
from condensate_jax.selection import index as index_lib
from condensate_jax.softmax import NEG_INF, AttentionStats
from pallas_kernels.top_select import reference as top_reference


def psum(x, axis):
  """psum over a mesh axis (None: one shard, x itself)."""
  return x if axis is None else jax.lax.psum(x, axis)


def pmax(x, axis):
  """pmax over a mesh axis (None: x itself)."""
  return x if axis is None else jax.lax.pmax(x, axis)


def exact_set(scores, masks, spec, seq_axis, n_seq, s_len):
  """(in_set [B,K,G,T,S_l], (tau, n_dropped)) of the exact global top-k (module
  docstring)."""
  middle = jnp.broadcast_to(masks.middle, scores.shape)
  n_mid = psum(jnp.sum(masks.middle, axis=-1, dtype=jnp.int32), seq_axis)   # [B,1,1,T]
  n_dropped = jnp.maximum(n_mid - spec.top_k, 0)
  static = masks.anchor | masks.window
  if spec.top_k >= max(s_len - spec.anchor - spec.window, 0):
    # every middle key of every query is selected (as the single-device shortcut)
    return jnp.broadcast_to(masks.visible, scores.shape), (None, n_dropped)
  picked, tau = global_top(scores, middle, spec.top_k, seq_axis, n_seq, s_len)
  return static | picked, (tau, n_dropped)


def global_top(values, pool, k: int, seq_axis, n_seq, s_len):
  """(mask [..., S_l] of this shard's part of the global top-k of `values` over the keys in
  `pool`, ties to the lower global position; the k-th value, -inf-padded: tau)."""
  s_loc = values.shape[-1]
  masked = jnp.where(pool, values, NEG_INF)
  kk = min(k, s_loc)
  if kk == 0:
    return jnp.zeros(values.shape, bool), pmax(jnp.max(masked, axis=-1), seq_axis)
  top_values, idx = jax.lax.top_k(masked, kk)
  valid = jnp.take_along_axis(pool, idx, axis=-1)
  if seq_axis is None or n_seq == 1:
    chosen, tau = valid, jnp.min(top_values, axis=-1)
  else:
    # every shard's candidates in shard order (= global position order among equal
    # values): the global top-k is the top-k of these, ties to the lower position
    all_values = jax.lax.all_gather(top_values, seq_axis, axis=values.ndim - 1, tiled=True)
    all_valid = jax.lax.all_gather(valid, seq_axis, axis=values.ndim - 1, tiled=True)
    best, pick = jax.lax.top_k(all_values, min(k, s_len))
    picked = jnp.take_along_axis(all_valid, pick, axis=-1)
    flags = jnp.put_along_axis(jnp.zeros(all_valid.shape, bool), pick, picked, axis=-1,
                               inplace=False)
    me = jax.lax.axis_index(seq_axis)
    chosen = jax.lax.dynamic_slice_in_dim(flags, me * kk, kk, axis=flags.ndim - 1)
    tau = jnp.min(best, axis=-1)
  mask = jnp.put_along_axis(jnp.zeros(values.shape, bool), idx, chosen, axis=-1,
                            inplace=False)
  return mask & pool, tau


def indexed_set(scores, q, index, masks, spec, scale, seq_axis, n_seq, s_len):
  """(in_set, ("indexed", log delta, keys scored)) of selection="indexed" over the shards:
  the global top num_candidates middle keys by the index's estimate, the global exact
  top_k of those (`impl.xla_indexed.select`, across shards), and the certificate's delta
  over every shard's unselected middle keys (their exact score if a candidate, else the
  index's upper bound), merged by log-sum-exp."""
  middle = jnp.broadcast_to(masks.middle, scores.shape)
  est, slack = index_lib.index_bounds(q, index, scale)
  candidates, _ = global_top(est, middle, spec.num_candidates, seq_axis, n_seq, s_len)
  chosen, _ = global_top(scores, candidates, spec.top_k, seq_axis, n_seq, s_len)
  static = masks.anchor | masks.window
  in_set = static | chosen
  bound = jnp.where(middle & ~in_set, jnp.where(candidates, scores, est + slack), NEG_INF)
  log_delta = merged_logsumexp(bound, seq_axis) + jnp.float32(LOG_MARGIN)
  return in_set, SetCertificate(log_delta, scored_keys(masks, candidates, seq_axis))


# "certified" (bounds="index") chooses against this fraction of epsilon, as on one device
_CHOICE_MARGIN = 0.999
_INT_MAX = 2 ** 31 - 1


def certified_index_set(scores, q, index, masks, spec, scale, seq_axis, offset):
  """(in_set, certificate) of selection="certified" on the key index over the shards
  (`impl.xla_indexed.select_certified`'s set): anchor + window + the first n middle keys
  in the global order of their upper bound U_j (highest first, ties to the lower
  position; keys with a non-finite bound never counted), n the smallest with
  eps_n <= 0.999 epsilon and n >= min(top_k, keys with a finite bound). The n-th key is
  found by a bitwise search over the keys' (order key of U_j, reversed global position):
  the largest threshold whose set (the keys at or above it) meets the rule, each probe one
  merged count and two merged log-sum-exps (63 probes). Sums are per shard, then merged,
  where one device takes cumulative sums in order: an eps within rounding of the target
  can stop at another key."""
  middle = jnp.broadcast_to(masks.middle, scores.shape)
  static = jnp.broadcast_to(masks.anchor | masks.window, scores.shape)
  est, slack = index_lib.index_bounds(q, index, scale)
  ub = jnp.where(middle, est + slack, NEG_INF)
  live = middle & jnp.isfinite(ub)
  hi = top_reference.order_keys(jnp.where(ub == 0, 0.0, ub))   # -0 ties +0, as argsort
  lo = jnp.int32(_INT_MAX) - (offset + jnp.arange(scores.shape[-1], dtype=jnp.int32))
  m = pmax(jnp.maximum(jnp.max(jnp.where(static, scores, NEG_INF), axis=-1),
                       jnp.max(jnp.where(live, ub, NEG_INF), axis=-1)), seq_axis)
  m = jnp.where(jnp.isfinite(m), m, 0.0)[..., None]
  lz_static = merged_logsumexp(jnp.where(static, scores - m, NEG_INF), seq_axis)
  n_live = psum(jnp.sum(live, axis=-1, dtype=jnp.int32), seq_axis)
  need = jnp.minimum(spec.top_k, n_live)
  target = _CHOICE_MARGIN * spec.epsilon
  limit = jnp.float32(math.log(target / (1.0 - target)))

  def take(c_hi, c_lo):
    ch, cl = c_hi[..., None], c_lo[..., None]
    return live & ((hi > ch) | ((hi == ch) & (lo >= cl)))

  def holds(c_hi, c_lo):
    sel = take(c_hi, c_lo)
    n = psum(jnp.sum(sel, axis=-1, dtype=jnp.int32), seq_axis)
    lz_in = jnp.logaddexp(lz_static, merged_logsumexp(jnp.where(sel, scores - m, NEG_INF),
                                                      seq_axis))
    ld_out = merged_logsumexp(jnp.where(live & ~sel, ub - m, NEG_INF), seq_axis)
    return ((ld_out - lz_in <= limit) & (n >= need)) | (n >= n_live)

  shape = scores.shape[:-1]
  zero = jnp.zeros(shape, jnp.int32)
  c_hi = jnp.where(holds(zero, zero), zero, jnp.full(shape, -_INT_MAX - 1, jnp.int32))

  def bit_hi(i, c):
    cand = c | jnp.left_shift(jnp.int32(1), 30 - i)
    return jnp.where(holds(cand, zero), cand, c)

  def bit_lo(i, c):
    cand = c | jnp.left_shift(jnp.int32(1), 30 - i)
    return jnp.where(holds(c_hi, cand), cand, c)

  c_hi = jax.lax.fori_loop(0, 31, bit_hi, c_hi)
  c_lo = jax.lax.fori_loop(0, 31, bit_lo, zero)
  chosen = take(c_hi, c_lo)
  in_set = static | chosen
  log_delta = merged_logsumexp(jnp.where(in_set, NEG_INF, ub), seq_axis)
  log_delta = jnp.where(jnp.isneginf(log_delta), NEG_INF, log_delta + jnp.float32(LOG_MARGIN))
  return in_set, SetCertificate(log_delta, scored_keys(masks, chosen, seq_axis))


def merged_logsumexp(x, seq_axis):
  """log sum exp over the last axis of every shard's x (-inf when all are; NaN when one
  is: the NaN flag merges on its own, pmax on a CPU skips NaN)."""
  nan = pmax(jnp.any(jnp.isnan(x), axis=-1).astype(jnp.int32), seq_axis) > 0
  x = jnp.where(jnp.isnan(x), NEG_INF, x)
  m = pmax(jnp.max(x, axis=-1), seq_axis)
  m_s = jnp.where(jnp.isfinite(m), m, 0.0)
  z = psum(jnp.sum(jnp.exp(x - m_s[..., None]), axis=-1), seq_axis)
  out = jnp.where(jnp.isneginf(m), NEG_INF, m_s + jnp.log(z))
  return jnp.where(nan, jnp.nan, out)


def scored_keys(masks, extra, seq_axis):
  """Keys scored exactly, all shards: the visible anchor + window keys and `extra`."""
  static = (masks.anchor | masks.window) & masks.visible
  return psum(jnp.sum(static, -1, dtype=jnp.int32) + jnp.sum(extra, -1, dtype=jnp.int32),
               seq_axis)


class SetCertificate(NamedTuple):
  """The certificate of an "indexed" or "blocks" set, merged over the shards."""
  log_delta: jax.Array   # [B, K, G, T] log of the certificate's delta
  scored: jax.Array      # [B, K, G, T] int32 keys scored exactly


def stats(scores, masks, in_set, topk, m_c, z_c, seq_axis) -> AttentionStats:
  """AttentionStats [B, Hq, T] of the merged set (`exact.certificate`, across shards)."""
  visible = jnp.broadcast_to(masks.visible, scores.shape)
  m_vis = pmax(jnp.max(jnp.where(visible, scores, NEG_INF), axis=-1), seq_axis)
  m_vis = jnp.where(jnp.isneginf(m_vis), 0.0, m_vis)
  e = jnp.where(visible, jnp.exp(jnp.minimum(scores - m_vis[..., None], 0.0)), 0.0)
  z_set = psum(jnp.sum(jnp.where(in_set, e, 0.0), -1), seq_axis)
  z_drop = psum(jnp.sum(jnp.where(in_set, 0.0, e), -1), seq_axis)
  z_all = z_set + z_drop
  safe = jnp.where(z_all > 0, z_all, 1.0)
  captured = jnp.where(z_all > 0, z_set / safe, 1.0)
  dropped = jnp.where(z_all > 0, z_drop / safe, 0.0)
  n_visible = psum(jnp.sum(visible, axis=-1, dtype=jnp.int32), seq_axis)
  set_size = psum(jnp.sum(in_set, axis=-1, dtype=jnp.int32), seq_axis)
  bound = jnp.zeros_like(captured)
  scored = n_visible
  if isinstance(topk, SetCertificate):
    lse = jnp.where(z_c > 0, m_c + jnp.log(jnp.where(z_c > 0, z_c, 1.0)), NEG_INF)
    bound, scored = softmax.log_delta_to_eps(topk.log_delta, lse), topk.scored
  elif topk is not None:
    tau, n_dropped = topk
    n_drop = n_dropped.astype(jnp.float32)
    if tau is not None:
      log_delta = jnp.where(n_drop > 0, jnp.log(n_drop) + (tau - m_c), NEG_INF)
      bound = jax.nn.sigmoid(log_delta - jnp.log(jnp.where(z_c > 0, z_c, 1.0)))
      bound = jnp.where(z_c > 0, bound, 1.0)
      bound = jnp.where(n_drop > 0, bound, 0.0)
  fields = (captured, dropped, bound, set_size, n_visible, scored)
  shape = captured.shape
  return AttentionStats(*[softmax.heads_last(jnp.broadcast_to(x, shape)) for x in fields])


