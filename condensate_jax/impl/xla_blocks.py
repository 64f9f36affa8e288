"""Block-summary selection, the XLA specification of the fast path (DESIGN.md §4):
selection="bounded" | "blocks" | "certified" (`implementation="xla"` for these specs).

The Pallas kernels (`impl/pallas_blocks.py`, `fast/`) are tested against this module.

Selection is per query and per GQA group (the G query heads of one KV head share blocks,
so a kernel reads each block once per group). Each group orders the blocks that hold
middle keys of the query by `selection.order.group_score` of the bounds U_b
(`selection.bounds`), ties to the lower block, and expands them in that order:
  "blocks":    the first spec.top_blocks blocks;
  "certified": until every head's certified dropped mass is <= spec.epsilon;
  "bounded":   until, for every head, no unexpanded block's U_b reaches the top_k-th best
               exact middle score found so far; the set is then anchor + window + the exact
               top-k middle keys (ties to the lower position): the set of selection="exact".
The set is anchor ∪ window ∪ (middle keys of the expanded blocks) for "blocks" and
"certified", and anchor ∪ window ∪ top-k of the expanded middle keys for "bounded".

Certificate (every mode): with Z_C the set's softmax normaliser and
  delta = sum_{unexpanded b} n_b e^{U_b}  (+ (n_expanded - top_k) e^{tau} in "bounded",
  tau = the top_k-th exact score: every expanded-but-dropped key scores <= tau),
  eps = delta / (Z_C + delta) >= the true dropped probability.

Scoring: the selection loops score only the anchor/window keys and the keys of the
blocks they expand (`keys_scored` counts exactly those; the summary reads, 2 rows per
block, are not counted). With return_stats=True the true captured/dropped mass is
computed from all scores, for the stats only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from condensate_jax import geometry, softmax, validation
from condensate_jax.selection import bounds, order as order_lib, prefill_lists as lists_lib
from condensate_jax.selection import summaries as summaries_lib
from condensate_jax.softmax import HIGHEST, NEG_INF, gather_rows


class BlockSet(NamedTuple):
  """What a block selection chose; [B, K, T] per (batch, K/V head, query) unless noted."""
  order: jax.Array       # [B, K, T, nb] block ids in expansion order
  r: jax.Array           # blocks expanded (a prefix of `order`)
  n_exp: jax.Array       # middle keys scored in the expanded blocks
  st_idx: jax.Array      # [B, T, N] anchor + window positions (geometry.static_positions)
  st_ok: jax.Array       # [B, T, N] their validity
  log_delta: jax.Array   # [B, K, G, T] log of the certified dropped-mass bound delta
  topv: Optional[jax.Array] = None   # "bounded": [B, K, G, T, k'] top-k scores (-inf: none)
  topp: Optional[jax.Array] = None   # "bounded": [B, K, G, T, k'] their positions


class _Plan(NamedTuple):
  """The block order of every (query, group) and what the loops read of it."""
  order: jax.Array    # [B, K, T, nb]
  tail: jax.Array     # [B, K, G, T, nb + 1] log delta of taking the first r blocks
  has: jax.Array      # [B, K, T, nb + 1] position r holds a block with middle keys
  sufmax: jax.Array   # [B, K, G, T, nb + 1] max bound from position r on
  mlo: jax.Array      # [B, T] middle range
  mhi: jax.Array


class _Static(NamedTuple):
  """Anchor and window: always in the set, scored once."""
  s: jax.Array        # [B, K, G, T, N] scores (-inf: invalid slot)
  v: jax.Array        # [B, K, T, N, D] float32 values
  m: jax.Array        # [B, K, G, T] running max, sum and output of their softmax
  l: jax.Array
  acc: jax.Array      # [B, K, G, T, D]


def _group_queries(q, hkv):
  """q [B, T, Hq, D] -> [B, K, G, T, D]."""
  b, t, hq, d = q.shape
  return q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)


def _score(qg, dtype, scale, rows):
  """qg [B, K, G, T, D], rows [B, K, T, N, D] -> [B, K, G, T, N] float32."""
  s = jnp.einsum("bkgtd,bktnd->bkgtn", qg, rows.astype(dtype),
                 preferred_element_type=jnp.float32, precision=HIGHEST)
  return s * jnp.float32(scale)


def _at(x, i):
  """x[..., i] for a traced scalar i."""
  return jax.lax.dynamic_index_in_dim(x, i, axis=x.ndim - 1, keepdims=False)


def _plan(q, summ, lo, hi, spec, scale, s_len) -> _Plan:
  n_mid, mlo, mhi = geometry.middle_counts(lo, hi, spec, summ.num_blocks, s_len)
  u, rank = bounds.block_ranking(q, summ, scale, spec)
  order, u_sorted, _, tail, has = order_lib.group_order(u, n_mid, rank)
  sufmax = jnp.pad(jax.lax.cummax(u_sorted, axis=4, reverse=True),
                   [(0, 0)] * 4 + [(0, 1)], constant_values=NEG_INF)
  return _Plan(order, tail, has, sufmax, mlo, mhi)


def _attend_static(qg, dtype, k, v, st_idx, st_ok, scale) -> _Static:
  b, hkv = k.shape[0], k.shape[2]
  st_idx4 = jnp.broadcast_to(st_idx[:, None], (b, hkv) + st_idx.shape[1:])
  v_st = gather_rows(v, st_idx4).astype(jnp.float32)
  s_st = jnp.where(st_ok[:, None, None], _score(qg, dtype, scale, gather_rows(k, st_idx4)),
                   NEG_INF)
  m0 = jnp.max(s_st, axis=-1, initial=NEG_INF)
  m0s = jnp.where(jnp.isneginf(m0), 0.0, m0)
  p0 = jnp.exp(s_st - m0s[..., None])
  l0 = jnp.sum(p0, -1)
  acc0 = jnp.einsum("bkgtn,bktnd->bkgtd", p0, v_st, precision=HIGHEST)
  return _Static(s_st, v_st, m0, l0, acc0)


def _block_keys(plan, i, active, p, nb, s_len):
  """The middle keys of the block at position i of the order: (pos, ok, clipped pos),
  each [B, K, T, P]."""
  blk = _at(plan.order, jnp.minimum(i, nb - 1))                      # [B, K, T]
  pos = blk[..., None] * p + jnp.arange(p, dtype=jnp.int32)          # [B, K, T, P]
  ok = (active[..., None] & (pos < s_len) & (pos >= plan.mlo[:, None, :, None])
        & (pos <= plan.mhi[:, None, :, None]))
  return pos, ok, jnp.minimum(pos, s_len - 1)


def _taken_log_delta(plan, r):
  return jnp.take_along_axis(plan.tail, r[:, :, None, :, None], axis=-1)[..., 0]


def _expand_online(qg, dtype, k, v, plan, static, spec, scale):
  """"blocks" / "certified": expands blocks in order with an online softmax until the
  mode's stop rule holds. Returns (r, n_exp, m, l, acc)."""
  b, hkv, g, t = static.m.shape
  s_len, p, nb = k.shape[1], spec.block_size, plan.order.shape[-1]

  def done_now(i, m, l):
    if spec.selection == "blocks":
      return jnp.broadcast_to(i >= spec.top_blocks, (b, hkv, t))
    eps = softmax.log_delta_to_eps(_at(plan.tail, i), softmax.lse_of(m, l))
    return jnp.all(eps <= spec.epsilon, axis=2)

  def active_now(i, m, l, alive):
    return alive & _at(plan.has, jnp.minimum(i, nb)) & ~done_now(i, m, l) & (i < nb)

  def cond(st):
    i, m, l, _, _, _, alive = st
    return (i < nb) & jnp.any(active_now(i, m, l, alive))

  def body(st):
    i, m, l, acc, r, n_exp, alive = st
    active = active_now(i, m, l, alive)
    _, ok, pos_c = _block_keys(plan, i, active, p, nb, s_len)
    s = jnp.where(ok[:, :, None], _score(qg, dtype, scale, gather_rows(k, pos_c)), NEG_INF)
    n_exp = n_exp + jnp.sum(ok, -1, dtype=jnp.int32)
    r = r + active.astype(jnp.int32)
    m_new = jnp.maximum(m, jnp.max(s, -1))
    m_use = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    alpha = jnp.exp(jnp.where(jnp.isneginf(m), 0.0, m) - m_use)
    alpha = jnp.where(jnp.isneginf(m), 0.0, alpha)
    pr = jnp.exp(s - m_use[..., None])
    v_rows = gather_rows(v, pos_c).astype(jnp.float32)
    l = alpha * l + jnp.sum(pr, -1)
    acc = alpha[..., None] * acc + jnp.einsum("bkgtn,bktnd->bkgtd", pr, v_rows,
                                              precision=HIGHEST)
    return (i + 1, m_new, l, acc, r, n_exp, alive & active)

  zeros = jnp.zeros((b, hkv, t), jnp.int32)
  st = (jnp.int32(0), static.m, static.l, static.acc, zeros, zeros,
        jnp.ones((b, hkv, t), bool))
  _, m, l, acc, r, n_exp, _ = jax.lax.while_loop(cond, body, st)
  return r, n_exp, m, l, acc


def _expand_topk(qg, dtype, k, plan, spec, scale):
  """"bounded": expands blocks in order, keeping each head's exact top-k of the scored
  middle keys, until no unexpanded bound reaches the k-th best. Returns
  (r, n_exp, topv, topp)."""
  b, hkv, g, t = qg.shape[:4]
  s_len, p, nb = k.shape[1], spec.block_size, plan.order.shape[-1]
  kk = min(spec.top_k, s_len)

  def active_now(i, topv, alive):
    tau = topv[..., kk - 1] if kk else jnp.full((b, hkv, g, t), jnp.inf)
    suf = _at(plan.sufmax, i)
    done = jnp.all((suf < tau) | jnp.isneginf(suf), axis=2)
    return alive & _at(plan.has, jnp.minimum(i, nb)) & ~done & (i < nb)

  def cond(st):
    i, _, _, topv, _, alive = st
    return (i < nb) & jnp.any(active_now(i, topv, alive))

  def body(st):
    i, r, n_exp, topv, topp, alive = st
    active = active_now(i, topv, alive)
    pos, ok, pos_c = _block_keys(plan, i, active, p, nb, s_len)
    s = jnp.where(ok[:, :, None], _score(qg, dtype, scale, gather_rows(k, pos_c)), NEG_INF)
    n_exp = n_exp + jnp.sum(ok, -1, dtype=jnp.int32)
    r = r + active.astype(jnp.int32)
    if kk:
      vals = jnp.concatenate([topv, s], -1)
      poss = jnp.concatenate(
          [topp, jnp.broadcast_to(jnp.where(ok, pos, s_len)[:, :, None], s.shape)], -1)
      neg, poss = jax.lax.sort((-vals, poss), dimension=vals.ndim - 1, num_keys=2)
      topv, topp = -neg[..., :kk], poss[..., :kk]
    return (i + 1, r, n_exp, topv, topp, alive & active)

  zeros = jnp.zeros((b, hkv, t), jnp.int32)
  st = (jnp.int32(0), zeros, zeros, jnp.full((b, hkv, g, t, kk), NEG_INF, jnp.float32),
        jnp.full((b, hkv, g, t, kk), s_len, jnp.int32), jnp.ones((b, hkv, t), bool))
  _, r, n_exp, topv, topp, _ = jax.lax.while_loop(cond, body, st)
  return r, n_exp, topv, topp


def select_topk(q, k, summ, lo, hi, spec, scale) -> BlockSet:
  """selection="bounded" without the attention: the set (anchor + window + the exact
  top-k of the expanded middle keys) and its log delta, for a kernel to attend."""
  s_len, hkv = k.shape[1], k.shape[2]
  plan = _plan(q, summ, lo, hi, spec, scale, s_len)
  st_idx, st_ok = geometry.static_positions(lo, hi, spec, s_len)
  r, n_exp, topv, topp = _expand_topk(_group_queries(q, hkv), q.dtype, k, plan, spec,
                                      scale)
  log_delta = _taken_log_delta(plan, r)
  kk = topv.shape[-1]
  if kk:
    n_drop = jnp.maximum(n_exp[:, :, None] - kk, 0).astype(jnp.float32)
    extra = jnp.where(n_drop > 0, jnp.log(jnp.maximum(n_drop, 1.0)) + topv[..., -1],
                      NEG_INF)
    log_delta = jnp.logaddexp(log_delta, extra)
  return BlockSet(plan.order, r, n_exp, st_idx, st_ok, log_delta, topv, topp)


def _finish_bounded(v, static, bset):
  """Attention over anchor + window + the top-k positions: (m, l, acc)."""
  b, hkv, g, t = static.m.shape
  s_len, d = v.shape[1], v.shape[3]
  topv, topp = bset.topv, bset.topp
  kk = topv.shape[-1]
  top_ok = ~jnp.isneginf(topv)
  v_top = gather_rows(v, jnp.minimum(topp, s_len - 1).transpose(0, 1, 3, 2, 4).reshape(
      b, hkv, t, g * kk)).reshape(b, hkv, t, g, kk, d).transpose(0, 1, 3, 2, 4, 5)
  m = jnp.maximum(static.m, jnp.max(topv, -1, initial=NEG_INF))
  ms = jnp.where(jnp.isneginf(m), 0.0, m)[..., None]
  p_st, p_top = jnp.exp(static.s - ms), jnp.where(top_ok, jnp.exp(topv - ms), 0.0)
  l = jnp.sum(p_st, -1) + jnp.sum(p_top, -1)
  acc = (jnp.einsum("bkgtn,bktnd->bkgtd", p_st, static.v, precision=HIGHEST)
         + jnp.einsum("bkgtn,bkgtnd->bkgtd", p_top, v_top.astype(jnp.float32),
                      precision=HIGHEST))
  return m, l, acc


def select_attend(q, k, v, summ, lo, hi, spec, scale):
  """The selection and the attention over the selected set.

  Returns (out [B, K, G, T, D] float32, lse [B, K, G, T], BlockSet)."""
  s_len, hkv = k.shape[1], k.shape[2]
  qg = _group_queries(q, hkv)                                        # [B, K, G, T, D]
  st_idx, st_ok = geometry.static_positions(lo, hi, spec, s_len)     # [B, T, N]
  static = _attend_static(qg, q.dtype, k, v, st_idx, st_ok, scale)
  if spec.selection == "bounded":
    bset = select_topk(q, k, summ, lo, hi, spec, scale)
    m, l, acc = _finish_bounded(v, static, bset)
  else:
    plan = _plan(q, summ, lo, hi, spec, scale, s_len)
    r, n_exp, m, l, acc = _expand_online(qg, q.dtype, k, v, plan, static, spec, scale)
    bset = BlockSet(plan.order, r, n_exp, st_idx, st_ok, _taken_log_delta(plan, r))
  lse = softmax.lse_of(m, l)
  out = jnp.where((l > 0)[..., None], acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
  return out, lse, bset


def set_mask(bset: BlockSet, lo, hi, spec, s_len, shape):
  """The selected set as a [B, K, G, T, S] bool mask, and the visible mask."""
  masks = geometry.static_masks(lo, hi, s_len, spec)
  j = jnp.arange(s_len, dtype=jnp.int32)
  if spec.selection == "bounded":
    topp, ok = bset.topp, ~jnp.isneginf(bset.topv)
    chosen = jnp.zeros(shape, bool)
    if topp.shape[-1]:
      chosen = jnp.put_along_axis(chosen, jnp.minimum(topp, s_len - 1), ok, axis=-1,
                                  inplace=False)
  else:
    rank = jnp.argsort(bset.order, axis=-1)                             # [B, K, T, nb]
    blk_sel = rank < bset.r[..., None]
    chosen = jnp.take(blk_sel, j // spec.block_size, axis=-1)[:, :, None]
  return masks.anchor | masks.window | (masks.middle & chosen), masks.visible


def block_stats(q, k, lo, hi, spec, scale, bset: BlockSet, eps):
  """AttentionStats [B, Hq, T]; the true masses read every score (stats only)."""
  scores = softmax.scores(q, k, scale)                                 # [B,K,G,T,S]
  in_set, visible = set_mask(bset, lo, hi, spec, k.shape[1], scores.shape)
  n_static = jnp.sum(bset.st_ok, -1, dtype=jnp.int32)[:, None, None]
  scored = n_static + bset.n_exp[:, :, None]
  return softmax.mass_stats(scores, in_set, visible, eps, scored)


def query_block_prefill(q, k, v, q_positions, kv_lengths, lo, hi, summ, spec, scale,
                        return_stats):
  """selection="blocks" with spec.query_blocks, T > 1: the sets of the timed prefill
  (per block of query rows, `selection.prefill_lists`) as a masked softmax, so a set
  that covers every visible key gives the dense output bit for bit."""
  b, t, hq, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  p, nb = spec.block_size, summ.num_blocks
  kblocks, kflags = lists_lib.prefill_lists(
      q, k, spec, kmin=summ.kmin, kmax=summ.kmax, q_offset=q_positions[:, 0],
      kv_lengths=kv_lengths)                                            # [B, Hq, nq, L]
  rows = jnp.arange(t) // p
  lists, flags = kblocks[:, :, rows], kflags[:, :, rows]                # [B, Hq, T, L]
  bi = jnp.arange(b)[:, None, None, None]
  hi_ = jnp.arange(hq)[None, :, None, None]
  ti = jnp.arange(t)[None, None, :, None]

  def blocks_of(ok):   # [B, Hq, T, L] entries -> [B, K, G, T, nb] bool
    m = jnp.zeros((b, hq, t, nb + 1), bool).at[bi, hi_, ti,
                                               jnp.where(ok, lists, nb)].set(True)
    return m[..., :nb].reshape(b, hkv, hq // hkv, t, nb)

  taken = blocks_of((lists >= 0) & (flags > 0))
  listed = blocks_of(lists >= 0)
  masks = geometry.static_masks(lo, hi, s_len, spec)
  blk = jnp.arange(s_len) // p
  in_set = masks.anchor | masks.window | (masks.middle & jnp.take(taken, blk, axis=-1))
  scores = softmax.scores(q, k, scale)                                 # [B,K,G,T,S]
  out = softmax.masked_softmax(scores, in_set, v, q.dtype)
  if not return_stats:
    return out
  lse = jax.nn.logsumexp(jnp.where(in_set, scores, NEG_INF), axis=-1)
  n_mid, _, _ = geometry.middle_counts(lo, hi, spec, nb, s_len)        # [B, T, nb]
  n_mid = n_mid[:, None, None]
  u = bounds.block_bounds(q, summ, scale)
  log_delta = jax.nn.logsumexp(
      jnp.where((n_mid > 0) & ~taken, u + jnp.log(jnp.maximum(n_mid, 1)), NEG_INF), -1)
  scored = jnp.sum(masks.visible & jnp.take(listed, blk, axis=-1), -1, dtype=jnp.int32)
  return out, softmax.mass_stats(scores, in_set, masks.visible,
                                 softmax.log_delta_to_eps(log_delta, lse), scored)


def check_query_blocks(causal, sliding_window):
  if not causal or sliding_window is not None:
    raise ValueError(f"spec.query_blocks=True with causal={causal}, sliding_window="
                     f"{sliding_window}: per-query-block lists are causal prefill "
                     "lists (causal=True, no sliding window).")


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def condensate_xla_blocks(q, k, v, q_positions, kv_lengths, *, spec, causal,
                          sliding_window, scale, return_stats, summaries=None):
  """`implementation="xla"` for a block-selection spec on validated inputs; `summaries`
  (None: built from k) are the BlockSummaries of k at spec.block_size."""
  validation.check_block_spec(spec)   # at trace time: spec is static
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=causal,
                                  sliding_window=sliding_window)
  if summaries is None:
    summaries = summaries_lib.build(k, kv_lengths, spec.block_size)
  if spec.query_blocks and q.shape[1] > 1:
    check_query_blocks(causal, sliding_window)
    return query_block_prefill(q, k, v, q_positions, kv_lengths, lo, hi, summaries,
                               spec, scale, return_stats)
  sg = jax.lax.stop_gradient
  out, lse, bset = select_attend(sg(q), sg(k), sg(v), sg(summaries), lo, hi, spec, scale)
  out = softmax.heads_to_tokens(out).astype(q.dtype)
  out = _over_fixed_set(q, k, v, out, (bset.order, bset.r, bset.topv, bset.topp, lo, hi),
                        spec, scale)
  if not return_stats:
    return out
  eps = softmax.log_delta_to_eps(bset.log_delta, lse)
  return out, block_stats(sg(q), sg(k), lo, hi, spec, scale, bset, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _over_fixed_set(q, k, v, out, chosen, spec, scale):
  """`out` (the selection loops' attention, whose while loops reverse-mode autodiff
  cannot transpose) with the gradient of attention over the set it chose, held fixed:
  softmax.masked_softmax over `set_mask` of the chosen blocks (or top-k). The selection
  passes no gradient, as for any top-k; the mask [B, K, G, T, S] exists only in the
  backward pass."""
  del q, k, v, chosen, spec, scale
  return out


def _fixed_set_fwd(q, k, v, out, chosen, spec, scale):
  del spec, scale
  return out, (q, k, v, chosen)


def _fixed_set_bwd(spec, scale, res, g):
  q, k, v, (order, r, topv, topp, lo, hi) = res
  bset = BlockSet(order, r, None, None, None, None, topv, topp)

  def masked(q, k, v):
    scores = softmax.scores(q, k, scale)
    in_set, _ = set_mask(bset, lo, hi, spec, k.shape[1], scores.shape)
    return softmax.masked_softmax(scores, in_set, v, q.dtype)

  _, vjp = jax.vjp(masked, q, k, v)
  return (*vjp(g), None, None)


_over_fixed_set.defvjp(_fixed_set_fwd, _fixed_set_bwd)
