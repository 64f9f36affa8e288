"""`implementation="pallas"` for block-selection specs: the same sets as the XLA
specification (`impl/xla_blocks.py`), attended by the Pallas kernels.

  "blocks":    bounds over the summaries (XLA), top-M blocks per (query, GQA group),
               then the split-K block decode kernel reads only those blocks plus the
               anchor and window ranges;
  "certified": the kernel reads the bound order in rounds of R = max(top_blocks, 1)
               blocks (one split per block); XLA merges the partials block by block in
               bound order and stops each group as soon as its certificate is <= epsilon
               (so the set equals the XLA specification's); keys_scored counts every
               block the kernel read, including the tail of the last round;
  "bounded":   the selection loop of the XLA specification (it must score expanded
               blocks to know when to stop), then the gather-attention kernel
               (pallas_kernels/gather_attention) over anchor + window + top-k.
On CPU the kernels run in Pallas interpret mode (slow; tests use small shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from condensate_jax import geometry, softmax, validation
from condensate_jax.impl import xla_blocks
from condensate_jax.selection import bounds, order as order_lib
from condensate_jax.selection import summaries as summaries_lib
from condensate_jax.softmax import NEG_INF
from pallas_kernels.block_sparse import api as _bs_api
from pallas_kernels.gather_attention import api as _gather_api

# Which block-sparse kernel runs: None = the best for the platform (see
# pallas_kernels.block_sparse.api); tests may set "reference" or "mosaic_tpu".
KERNEL_IMPLEMENTATION = None


def decode_parts(q, k, v, blocks, ranges, spec, scale, with_static=True):
  """Block decode kernel call + reshape: partials o [B, K, G, T, NS, D],
  lse [B, K, G, T, NS]."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  o, lse = _bs_api.block_decode(
      q, k, v, blocks, ranges, block_size=spec.block_size, scale=scale,
      anchor=min(spec.anchor, k.shape[1]), window=min(spec.window, k.shape[1]),
      with_static=with_static, implementation=KERNEL_IMPLEMENTATION)
  ns = o.shape[3]
  o = o.reshape(b, t, hkv, g, ns, d).transpose(0, 2, 3, 1, 4, 5)
  return o, lse.reshape(b, hkv, g, t, ns)


def select_blocks_mode(q, k, v, summ, lo, hi, spec, scale, num_splits):
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  nb = summ.num_blocks
  n_mid, _, _ = geometry.middle_counts(lo, hi, spec, nb, s_len)
  u, rank = bounds.block_ranking(q, summ, scale, spec)
  order, _, n_sorted, tail, has = order_lib.group_order(u, n_mid, rank)
  m = min(spec.top_blocks, nb)
  ranges = geometry.static_ranges(lo, hi, spec, s_len)
  ns = max(1, min(num_splits, m))
  bps = -(-m // ns) if m else 1
  ids = jnp.where(has[..., :m], order[..., :m], -1)
  ids = jnp.pad(ids, [(0, 0)] * 3 + [(0, ns * bps - m)], constant_values=-1)
  o, lse = decode_parts(q, k, v, ids.reshape(b, hkv, t, ns, bps), ranges, spec, scale)
  o, lse = softmax.combine_splits(o, lse)
  r = jnp.sum(has[..., :m], -1, dtype=jnp.int32)
  n_exp = jnp.sum(jnp.where(has[..., :m], n_sorted[..., :m], 0), -1, dtype=jnp.int32)
  log_delta = jnp.take_along_axis(tail, r[:, :, None, :, None], axis=-1)[..., 0]
  st_idx, st_ok = geometry.static_positions(lo, hi, spec, s_len)
  return o, lse, xla_blocks.BlockSet(order, r, n_exp, st_idx, st_ok, log_delta)


def select_certified(q, k, v, summ, lo, hi, spec, scale):
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  nb = summ.num_blocks
  n_mid, _, _ = geometry.middle_counts(lo, hi, spec, nb, s_len)
  u = bounds.block_bounds(q, summ, scale)
  order, _, n_sorted, tail, has = order_lib.group_order(u, n_mid)
  ranges = geometry.static_ranges(lo, hi, spec, s_len)
  rr = max(1, min(spec.top_blocks, nb))
  n_rounds = -(-nb // rr)
  pad = n_rounds * rr - nb
  order_p = jnp.pad(order, [(0, 0)] * 3 + [(0, pad)], constant_values=-1)
  has_p = jnp.pad(has[..., :nb], [(0, 0)] * 3 + [(0, pad + 1)])
  n_p = jnp.pad(n_sorted, [(0, 0)] * 3 + [(0, pad)])
  tail_p = jnp.pad(tail, [(0, 0)] * 4 + [(0, pad)], constant_values=NEG_INF)

  none = jnp.full((b, hkv, t, 1, 1), -1, jnp.int32)
  o0, lse0 = decode_parts(q, k, v, none, ranges, spec, scale, with_static=True)
  o_acc, lse_acc = o0[..., 0, :], lse0[..., 0]

  def at(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, axis=x.ndim - 1, keepdims=False)

  def done(i, lse_acc):
    eps = softmax.log_delta_to_eps(at(tail_p, i), lse_acc)
    return jnp.all(eps <= spec.epsilon, axis=2)

  alive0 = has_p[..., 0] & ~done(0, lse_acc)
  zeros = jnp.zeros((b, hkv, t), jnp.int32)

  def cond(st):
    c, _, _, _, _, alive = st
    return (c < n_rounds) & jnp.any(alive)

  def body(st):
    c, o_acc, lse_acc, r, n_read, alive = st
    i0 = c * rr
    ids = jax.lax.dynamic_slice_in_dim(order_p, i0, rr, axis=3)
    ids = jnp.where(alive[..., None], ids, -1)
    o_j, lse_j = decode_parts(q, k, v, ids[..., None], ranges, spec, scale,
                              with_static=False)
    n_read = n_read + jnp.sum(jnp.where(
        ids >= 0, jax.lax.dynamic_slice_in_dim(n_p, i0, rr, axis=3), 0), -1)
    for j in range(rr):
      i = i0 + j
      take = alive & at(has_p, i) & ~done(i, lse_acc)
      o_acc, lse_acc = softmax.merge_partial(
          o_acc, lse_acc, o_j[..., j, :], lse_j[..., j],
          jnp.broadcast_to(take[:, :, None], lse_acc.shape))
      r = r + take.astype(jnp.int32)
      alive = take
    alive = alive & at(has_p, i0 + rr) & ~done(i0 + rr, lse_acc)
    return c + 1, o_acc, lse_acc, r, n_read, alive

  _, o_acc, lse_acc, r, n_read, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), o_acc, lse_acc, zeros, zeros, alive0))
  log_delta = jnp.take_along_axis(tail, r[:, :, None, :, None], axis=-1)[..., 0]
  st_idx, st_ok = geometry.static_positions(lo, hi, spec, s_len)
  return o_acc, lse_acc, xla_blocks.BlockSet(order, r, n_read, st_idx, st_ok, log_delta)


def bounded(q, k, v, summ, lo, hi, spec, scale):
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  bset = xla_blocks.select_topk(q, k, summ, lo, hi, spec, scale)
  st_idx = jnp.broadcast_to(bset.st_idx[:, None], (b, hkv) + bset.st_idx.shape[1:])
  st_ok = jnp.broadcast_to(bset.st_ok[:, None], st_idx.shape)
  topp, topv = bset.topp, bset.topv
  kk = topp.shape[-1]
  h_idx = jnp.minimum(topp, k.shape[1] - 1).reshape(b, hq, t, kk)
  h_ok = (~jnp.isneginf(topv)).reshape(b, hq, t, kk)
  out, lse = _gather_api.gather_attention(q, k, v, h_idx, h_ok, scale=scale,
                                          shared_indices=st_idx, shared_valid=st_ok)
  g = hq // hkv
  lse = lse.reshape(b, hkv, g, t)
  o = out.astype(jnp.float32).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
  return o, lse, bset


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats", "num_splits"))
def condensate_pallas_blocks(q, k, v, q_positions, kv_lengths, *, spec, causal,
                             sliding_window, scale, return_stats, summaries=None,
                             num_splits=8):
  """`implementation="pallas"` for a block-selection spec on validated inputs, with
  optional precomputed `summaries` (None: built from k). Same sets as the XLA spec."""
  validation.check_block_spec(spec)   # at trace time: spec is static
  if spec.query_blocks and q.shape[1] > 1:
    # the prefill lists as a masked softmax (the same sets as prefill_step's kernel,
    # which assumes a full-length cache; see xla_blocks.query_block_prefill)
    return xla_blocks.condensate_xla_blocks(
        q, k, v, q_positions, kv_lengths, spec=spec, causal=causal,
        sliding_window=sliding_window, scale=scale, return_stats=return_stats,
        summaries=summaries)
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=causal,
                                  sliding_window=sliding_window)
  if summaries is None:
    summaries = summaries_lib.build(k, kv_lengths, spec.block_size)
  if spec.selection == "blocks":
    o, lse, bset = select_blocks_mode(q, k, v, summaries, lo, hi, spec, scale, num_splits)
  elif spec.selection == "certified":
    o, lse, bset = select_certified(q, k, v, summaries, lo, hi, spec, scale)
  else:
    o, lse, bset = bounded(q, k, v, summaries, lo, hi, spec, scale)
  out = softmax.heads_to_tokens(o).astype(q.dtype)
  if not return_stats:
    return out
  eps = softmax.log_delta_to_eps(bset.log_delta, lse)
  return out, xla_blocks.block_stats(q, k, lo, hi, spec, scale, bset, eps)
