"""The block sets of the distributed call, one shard's part of each (`condensate_jax.distributed`
module docstring): "blocks" (per query and query_blocks) and the bound loop of "bounded" /
"certified" with bounds="blocks" across shards. Every function runs inside `jax.shard_map`
(seq_axis None: one shard)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from condensate_jax import geometry, softmax
from condensate_jax.distributed.sets import (SetCertificate, global_top, merged_logsumexp,
                                             pmax, psum, scored_keys)
from condensate_jax.selection import bounds, order as order_lib, summaries as summaries_lib
from condensate_jax.selection import prefill_lists as lists_lib
from condensate_jax.softmax import NEG_INF


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


def query_blocks_set(scores, q, k, q_positions, kv_lengths, lo, hi, offset, masks, spec,
                     scale, seq_axis, n_seq):
  """(in_set, certificate) of selection="blocks" with spec.query_blocks, T > 1, over the
  shards (`impl.xla_blocks.query_block_prefill`'s set): per block of block_size query
  rows, its centre query ranked against every shard's key-block boxes
  (`selection.prefill_lists`' ranking), the global top_blocks blocks holding middle keys
  of its rows (ties to the lower block); the anchor blocks and the window band are
  listed too (scored, their middle keys not attended). Each query's certificate from
  its own block bounds, merged over the shards."""
  b, t, hq, _ = q.shape
  s_loc, hkv, p = k.shape[1], k.shape[2], spec.block_size
  nb = s_loc // p
  summ = summaries_lib.build(k, jnp.clip(kv_lengths - offset, 0, s_loc), p)
  u = lists_lib.centre_ranking(lists_lib.query_block_centres(q, hkv, p),
                               lists_lib.key_block_features(summ.kmin, summ.kmax, q.dtype),
                               q.dtype)                                 # [B,Hq,nq,nb]
  nq = u.shape[2]
  j = offset // p + jnp.arange(nb)                                      # global blocks
  band0, last = lists_lib.query_block_rows(q_positions[:, :1, None], jnp.arange(nq)[:, None],
                                           p, t, kv_lengths[:, None, None], spec)  # [B,nq,1]
  has_mid = lists_lib.holds_middle(j, last, p, spec)                    # [B,nq,nb]
  # a block ranked -inf is not chosen (as prefill_lists drops it), even with slots left
  chosen, _ = global_top(u, has_mid[:, None] & ~jnp.isneginf(u), spec.top_blocks,
                         seq_axis, n_seq, n_seq * nb)
  n_anchor, n_band = lists_lib.static_block_counts(spec, p)
  band = (j >= band0) & (j < band0 + n_band) & (j <= last // p)
  listed = chosen | ((j < n_anchor) | band)[:, None]
  rows = jnp.arange(t) // p
  per_query = lambda x: x[:, :, rows].reshape(b, hkv, hq // hkv, t, nb)
  taken, listed = per_query(chosen), per_query(listed)                 # [B,K,G,T,nb]
  blk = jnp.arange(s_loc) // p
  in_set = masks.anchor | masks.window | (masks.middle & jnp.take(taken, blk, axis=-1))
  n_mid, _, _ = geometry.middle_counts(lo - offset, hi - offset, spec, nb, s_loc)
  n_mid = n_mid[:, None, None]                                          # [B,1,1,T,nb]
  terms = jnp.where((n_mid > 0) & ~taken, bounds.block_bounds(q, summ, scale)
                    + jnp.log(jnp.maximum(n_mid, 1).astype(jnp.float32)), NEG_INF)
  scored = psum(jnp.sum(masks.visible & jnp.take(listed, blk, axis=-1), -1,
                        dtype=jnp.int32), seq_axis)
  return in_set, SetCertificate(merged_logsumexp(terms, seq_axis), scored)


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
