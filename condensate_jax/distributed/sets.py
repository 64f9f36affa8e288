"""The sets of the distributed call, one shard's part of each (`condensate_jax.distributed`
module docstring): the exact global top-k, "indexed" and "blocks" across shards, and the
merged statistics. Every function runs inside `jax.shard_map` (seq_axis None: one shard)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from condensate_jax import geometry, softmax
from condensate_jax.impl.xla_indexed import LOG_MARGIN
from condensate_jax.selection import bounds, order as order_lib, summaries as summaries_lib
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


def blocks_set(scores, q, k, kv_lengths, lo, hi, offset, masks, spec, scale, seq_axis,
                n_seq):
  """(in_set, certificate) of selection="blocks" over the shards (`impl.xla_blocks`'s
  set): every shard summarises its own blocks (a shard holds whole blocks), each GQA
  group takes the global top_blocks blocks holding middle keys by `order.group_score` (the
  heads' bounds relative to their best block over all shards; ties to the lower block),
  and the certificate's delta sums n_b e^{U_b} over the other such blocks of every
  shard."""
  s_loc, p = k.shape[1], spec.block_size
  nb = s_loc // p
  summ = summaries_lib.build(k, jnp.clip(kv_lengths - offset, 0, s_loc), p)
  u, rank = bounds.block_ranking(q, summ, scale, spec)                  # [B,K,G,T,nb]
  n_mid, _, _ = geometry.middle_counts(lo - offset, hi - offset, spec, nb, s_loc)
  has = n_mid[:, None, None] > 0                                        # [B,1,1,T,nb]
  u, rank = jnp.where(has, u, NEG_INF), jnp.where(has, rank, NEG_INF)
  best = pmax(jnp.max(rank, axis=-1, keepdims=True), seq_axis)
  ug = jnp.max(rank - jnp.where(jnp.isneginf(best), 0.0, best), axis=2)   # [B,K,T,nb]
  # the single-device order is a stable argsort of -ug: NaN last, -0 == +0; lax.top_k
  # would put NaN first and +0 before -0
  ug = jnp.where(jnp.isnan(ug), NEG_INF, jnp.where(ug == 0, 0.0, ug))
  chosen, _ = global_top(ug, jnp.broadcast_to(has[:, :, 0], ug.shape), spec.top_blocks,
                          seq_axis, n_seq, n_seq * nb)
  keys = jnp.take(chosen, jnp.arange(s_loc) // p, axis=-1)[:, :, None]   # [B,K,1,T,S_l]
  picked = jnp.broadcast_to(masks.middle, scores.shape) & keys
  terms = jnp.where(has & ~chosen[:, :, None],
                    jnp.log(jnp.maximum(n_mid, 1).astype(jnp.float32))[:, None, None] + u,
                    NEG_INF)
  in_set = masks.anchor | masks.window | picked
  return in_set, SetCertificate(merged_logsumexp(terms, seq_axis),
                                 scored_keys(masks, picked, seq_axis))


def gather_blocks(x, seq_axis, n_seq, axis=-1):
  """Every shard's per-block x, in shard order along the block axis (the global blocks)."""
  if seq_axis is None or n_seq == 1:
    return x
  return jax.lax.all_gather(x, seq_axis, axis=axis % x.ndim, tiled=True)


class _Order(NamedTuple):
  """The single-device block order of every (query, group), held by each shard."""
  n_sorted: jax.Array    # [B, K, T, NB] middle keys of the block at each position
  tail: jax.Array        # [B, K, G, T, NB + 1] log delta of taking the first r blocks
  has: jax.Array         # [B, K, T, NB + 1] position r holds a block with middle keys
  sufmax: jax.Array      # [B, K, G, T, NB + 1] max bound from position r on
  key_place: jax.Array   # [B, K, 1, T, S_l] position of each local key's block


def _global_order(q, k, kv_lengths, lo, hi, offset, spec, scale, seq_axis, n_seq):
  """Every shard's block bounds and middle counts gathered (a few numbers per block and
  head), ordered as one device orders them (`order.group_order` on the same values)."""
  s_loc, p = k.shape[1], spec.block_size
  nb = s_loc // p
  summ = summaries_lib.build(k, jnp.clip(kv_lengths - offset, 0, s_loc), p)
  u, rank = bounds.block_ranking(q, summ, scale, spec)                  # [B,K,G,T,nb]
  n_mid, _, _ = geometry.middle_counts(lo - offset, hi - offset, spec, nb, s_loc)
  u_all = gather_blocks(u, seq_axis, n_seq)
  rank_all = u_all if rank is u else gather_blocks(rank, seq_axis, n_seq)
  n_all = gather_blocks(n_mid, seq_axis, n_seq)                         # [B, T, NB]
  order, u_sorted, n_sorted, tail, has = order_lib.group_order(u_all, n_all, rank_all)
  sufmax = jnp.pad(jax.lax.cummax(u_sorted, axis=4, reverse=True),
                   [(0, 0)] * 4 + [(0, 1)], constant_values=NEG_INF)
  where_in = jnp.argsort(order, axis=-1).astype(jnp.int32)              # [B, K, T, NB]
  me = 0 if seq_axis is None else jax.lax.axis_index(seq_axis)
  mine = jax.lax.dynamic_slice_in_dim(where_in, me * nb, nb, axis=3)
  key_place = jnp.take(mine, jnp.arange(s_loc) // p, axis=-1)[:, :, None]
  return _Order(n_sorted, tail, has, sufmax, key_place)


def _expansion(order: _Order, stops):
  """The blocks the single-device loop expands, r [B, K, T]: the first position where
  stops(r) holds (it only turns true as r grows: the loop's stop rules are monotone for
  finite bounds), by bisection, at most the first position without middle keys (where the
  loop stops whatever the rule; taken apart so that the search stays monotone even when a
  bound overflows)."""
  nb_all = order.n_sorted.shape[-1]
  gap = jnp.argmax(~order.has, axis=-1).astype(jnp.int32)     # has[NB] is False

  def stop(r):
    return (r >= gap) | stops(r)

  def probe(_, lo_hi):
    lo_r, hi_r = lo_hi                      # stop(hi_r) holds; stop(r) fails below lo_r
    mid = (lo_r + hi_r) // 2
    ok = stop(mid)
    return jnp.where(ok, lo_r, mid + 1), jnp.where(ok, mid, hi_r)

  lo_hi = (jnp.zeros(gap.shape, jnp.int32), gap)
  _, r = jax.lax.fori_loop(0, max(1, nb_all).bit_length(), probe, lo_hi)
  return r


def _per_head(x, r):
  """x [B, K, G, T, NB + 1] at position r [B, K, T] -> [B, K, G, T]."""
  return jnp.take_along_axis(x, r[:, :, None, :, None], axis=-1)[..., 0]


def block_loop_set(scores, q, k, kv_lengths, lo, hi, offset, masks, spec, scale, seq_axis,
                   n_seq, s_len):
  """(in_set, certificate) of selection="bounded" or "certified" (bounds="blocks") over
  the shards (`impl.xla_blocks`'s sets): every shard holds the single-device block order
  (`_global_order`) and finds the number r of blocks the single-device loop expands by
  bisection (`_expansion`), each probe one global reduction over the expanded keys:
    "bounded"   stop when no bound from r on reaches any head's top_k-th best exact score
                among the first r blocks' keys (a global top-k, `global_top`); the set is
                anchor + window + the global top_k of those keys, the certificate the
                order's tail after r plus (n_expanded - top_k) e^{tau};
    "certified" stop when every head's eps of the first r blocks (the order's tail after
                r against the mass of anchor + window + those blocks, merged) is <=
                spec.epsilon; the set is anchor + window + the middle keys of those blocks,
                the certificate the tail after r."""
  order = _global_order(q, k, kv_lengths, lo, hi, offset, spec, scale, seq_axis, n_seq)
  middle = jnp.broadcast_to(masks.middle, scores.shape)
  static = masks.anchor | masks.window
  kk = min(spec.top_k, s_len)
  expanded = lambda r: middle & (order.key_place < r[:, :, None, :, None])

  def tau_of(r):
    if kk == 0:
      return jnp.full(scores.shape[:-1], jnp.inf, jnp.float32)
    return global_top(scores, expanded(r), kk, seq_axis, n_seq, s_len)[1]

  def bound_reached(r):
    suf = _per_head(order.sufmax, r)
    return jnp.all((suf < tau_of(r)) | jnp.isneginf(suf), axis=2)

  def eps_met(r):
    in_r = static | expanded(r)
    m = pmax(jnp.max(jnp.where(in_r, scores, NEG_INF), axis=-1), seq_axis)
    m_use = jnp.where(jnp.isneginf(m), 0.0, m)
    l = psum(jnp.sum(jnp.where(in_r, jnp.exp(scores - m_use[..., None]), 0.0), -1),
             seq_axis)
    eps = softmax.log_delta_to_eps(_per_head(order.tail, r), softmax.lse_of(m, l))
    return jnp.all(eps <= spec.epsilon, axis=2)

  bounded = spec.selection == "bounded"
  r = _expansion(order, bound_reached if bounded else eps_met)
  n_exp = jnp.sum(jnp.where(jnp.arange(order.n_sorted.shape[-1]) < r[..., None],
                            order.n_sorted, 0), axis=-1, dtype=jnp.int32)   # [B, K, T]
  log_delta = _per_head(order.tail, r)
  if not bounded:
    chosen = expanded(r)
  elif kk:
    chosen, tau = global_top(scores, expanded(r), kk, seq_axis, n_seq, s_len)
    n_drop = jnp.maximum(n_exp[:, :, None] - kk, 0).astype(jnp.float32)
    log_delta = jnp.logaddexp(log_delta, jnp.where(
        n_drop > 0, jnp.log(jnp.maximum(n_drop, 1.0)) + tau, NEG_INF))
  else:
    chosen = jnp.zeros(scores.shape, bool)
  n_static = psum(jnp.sum(static & masks.visible, -1, dtype=jnp.int32), seq_axis)
  return static | chosen, SetCertificate(log_delta, n_static + n_exp[:, :, None])


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


