"""Block-summary selection (DESIGN.md §4): selection="bounded" | "blocks" | "certified".

This module is the XLA specification of the fast path; the Pallas kernels
(pallas_kernels/block_sparse, wired in `condensate_jax.blocks_pallas`) are tested against it.

Block summaries: per block of P = spec.block_size keys and per KV head, the elementwise
min and max of the keys (`BlockSummaries`). For a query q the score bound
    U_b = scale * sum_d max(q_d * min_bd, q_d * max_bd)  >=  scale * q . k_j   (j in b)
is computed in the equivalent centre/radius form U_b = q.c_b + |q|.r_b (two matmuls over
the summaries), plus a relative slack that covers float32 rounding of both the bound and
the exact score (so U_b bounds every *computed* score, not only the real-valued one).

Selection is per query and per GQA group (the G query heads of one KV head share blocks,
so a kernel reads each block once per group). Each group orders the blocks that hold
middle keys of the query (keys that are neither anchor nor window) by the group score
max_g (U_gb - max_b' U_gb') (each head relative to its own best block; `group_score`),
ties to the lower block, and expands them in that order:
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

Scoring: the selection loop below scores only the anchor/window keys and the keys of the
blocks it expands (`keys_scored` counts exactly those; the summary reads, 2 rows per block,
are not counted). With return_stats=True the true captured/dropped mass is computed from
all scores, for the stats only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from condensate_jax import attention as _attention
from condensate_jax import selection as sel
from condensate_jax.selection import AttentionStats
from condensate_jax.spec import CondensateSpec, check_spec

BLOCK_SELECTIONS = ("bounded", "blocks", "certified")
NEG_INF = float("-inf")
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------- summaries


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kmin", "kmax"],
                   meta_fields=["block_size"])
@dataclasses.dataclass(frozen=True)
class BlockSummaries:
  """Elementwise min / max of the keys of each block, per KV head.

  kmin, kmax: [B, nb, Hkv, D] in the keys' dtype (min and max of key values are key
    values, so no rounding); a block with no key holds +inf / -inf.
  block_size: P, keys per block (static). Block b holds positions b*P .. b*P+P-1.
  """
  kmin: jax.Array
  kmax: jax.Array
  block_size: int

  @property
  def num_blocks(self) -> int:
    return self.kmin.shape[1]

  @property
  def capacity(self) -> int:
    return self.kmin.shape[1] * self.block_size


def num_blocks(num_keys: int, block_size: int) -> int:
  return -(-int(num_keys) // int(block_size))


def _check_block_size(block_size):
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or (
      block_size < 1):
    raise ValueError(f"block_size={block_size!r}: expected an int >= 1.")
  return int(block_size)


def _check_keys(k, name="k"):
  if not hasattr(k, "shape") or getattr(k, "ndim", 0) != 4:
    raise ValueError(f"{name}: expected an array [B, S, Hkv, D], got "
                     f"{getattr(k, 'shape', type(k).__name__)}.")
  if not jnp.issubdtype(k.dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={jnp.dtype(k.dtype).name}: expected a float dtype.")


def build_summaries(k, block_size: int, kv_lengths=None) -> BlockSummaries:
  """Summaries of k [B, S, Hkv, D]; keys at positions >= kv_lengths[b] are ignored."""
  _check_keys(k)
  p = _check_block_size(block_size)
  b, s, _, _ = k.shape
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)
  else:
    kv_lengths = _attention._check_int_array("kv_lengths", kv_lengths, (b,), 0, s)
  return _build(k, kv_lengths, p)


@functools.partial(jax.jit, static_argnames=("p",))
def _build(k, kv_lengths, p):
  b, s, hkv, d = k.shape
  nb = num_blocks(s, p)
  pad = nb * p - s
  valid = (jnp.arange(nb * p) < kv_lengths[:, None])[:, :, None, None]
  kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  inf = jnp.array(jnp.inf, k.dtype)
  kmin = jnp.where(valid, kp, inf).reshape(b, nb, p, hkv, d).min(axis=2)
  kmax = jnp.where(valid, kp, -inf).reshape(b, nb, p, hkv, d).max(axis=2)
  return BlockSummaries(kmin, kmax, p)


def empty_summaries(batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                    block_size: int, dtype=jnp.float32) -> BlockSummaries:
  """Summaries of an empty cache of `capacity` positions (every block empty)."""
  p = _check_block_size(block_size)
  shape = (batch, num_blocks(capacity, p), num_kv_heads, head_dim)
  return BlockSummaries(jnp.full(shape, jnp.inf, dtype), jnp.full(shape, -jnp.inf, dtype), p)


def append_summaries(summ: BlockSummaries, k_new, positions) -> BlockSummaries:
  """Summaries after writing keys k_new [B, T, Hkv, D] at positions [B, T].

  Equals `build_summaries` of the cache after the write (min/max are order-free), as long
  as no position is overwritten with a different key. Negative positions are skipped
  (padding); concrete positions >= capacity raise, traced ones are dropped.
  """
  if not isinstance(summ, BlockSummaries):
    raise ValueError(f"summ: expected BlockSummaries, got {type(summ).__name__}.")
  _check_keys(k_new, "k_new")
  b, t, hkv, d = k_new.shape
  if (b, hkv, d) != (summ.kmin.shape[0], summ.kmin.shape[2], summ.kmin.shape[3]):
    raise ValueError(f"k_new.shape={tuple(k_new.shape)}: expected [B, T, Hkv, D] with "
                     f"B, Hkv, D = {summ.kmin.shape[0]}, {summ.kmin.shape[2]}, "
                     f"{summ.kmin.shape[3]} (the summaries').")
  positions = _attention._check_int_array("positions", positions, (b, t), -(2**31 - 1),
                                          summ.capacity - 1)
  return _append(summ, k_new, positions)


@jax.jit
def _append(summ, k_new, positions):
  nb = summ.num_blocks
  blk = jnp.where(positions >= 0, positions // summ.block_size, nb)   # nb: dropped
  rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
  k_new = k_new.astype(summ.kmin.dtype)
  kmin = summ.kmin.at[rows, blk].min(k_new, mode="drop")
  kmax = summ.kmax.at[rows, blk].max(k_new, mode="drop")
  return BlockSummaries(kmin, kmax, summ.block_size)


# ------------------------------------------------------------------------------- bounds


def bound_slack(head_dim: int) -> float:
  """Relative slack of U_b: covers the float32 rounding of a D-term dot product (the
  exact score and the bound itself, gamma_D each, with truncating accumulation) and of the
  scale multiplication, with a factor 2 to spare. Applied to sum_d |q_d| |e_d| where e_d
  is the end of the box the bound picks (max where q_d >= 0, else min)."""
  return (8 * head_dim + 16) * 2.0**-24


def centre_radius(summ: BlockSummaries):
  """(c, r) float32 [B, nb, Hkv, D]: block centres (min + max) / 2 and radii
  (max - min) / 2; empty blocks get 0 (callers mask them)."""
  kmin = summ.kmin.astype(jnp.float32)
  kmax = summ.kmax.astype(jnp.float32)
  empty = ~(kmin <= kmax)
  return _centres(kmin, kmax), jnp.where(empty, 0.0, 0.5 * kmax - 0.5 * kmin)


def _centres(kmin, kmax):
  kmin = kmin.astype(jnp.float32)
  kmax = kmax.astype(jnp.float32)
  return jnp.where(~(kmin <= kmax), 0.0, 0.5 * kmin + 0.5 * kmax)


def block_bounds(q, summ: BlockSummaries, scale: float) -> jax.Array:
  """U [B, Hkv, G, T, nb] float32 for q [B, T, Hq, D] (empty blocks: meaningless):
  scale * (q+ . max + q- . min) + slack, the slack bound_slack(D) * scale *
  sum_d |q_d| |picked end_d| — the formula of the fast path's bounds kernel, so both
  rank blocks alike (a different slack would bias one toward blocks of large keys)."""
  return box_bounds(q, summ.kmin, summ.kmax, scale)


def box_bounds(q, kmin, kmax, scale: float) -> jax.Array:
  """`block_bounds` from the summary arrays kmin, kmax [B, nb, Hkv, D]."""
  b, t, hq, d = q.shape
  hkv = kmin.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
  qp, qn = jnp.maximum(qg, 0.0), jnp.minimum(qg, 0.0)
  kmin = kmin.astype(jnp.float32)
  kmax = kmax.astype(jnp.float32)

  def dot(a, k):
    return jnp.einsum("btkgd,bnkd->bkgtn", a, k, precision=_HIGHEST)

  u = dot(qp, kmax) + dot(qn, kmin)
  a = dot(qp, jnp.abs(kmax)) - dot(qn, jnp.abs(kmin))
  sc = jnp.float32(scale)
  return sc * u + (jnp.float32(bound_slack(d)) * sc) * a


def block_centres(q, summ: BlockSummaries, scale: float) -> jax.Array:
  """scale * q . c_b [B, Hkv, G, T, nb] with c_b = (min + max) / 2: a ranking score for
  block_rank="centre", not a bound."""
  return box_centres(q, summ.kmin, summ.kmax, scale)


def box_centres(q, kmin, kmax, scale: float) -> jax.Array:
  """`block_centres` from the summary arrays kmin, kmax [B, nb, Hkv, D]."""
  b, t, hq, d = q.shape
  hkv = kmin.shape[2]
  qs = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d) * jnp.float32(scale)
  return jnp.einsum("btkgd,bnkd->bkgtn", qs, _centres(kmin, kmax), precision=_HIGHEST)


def block_ranking(q, summ: BlockSummaries, scale: float, spec: CondensateSpec):
  """(u, rank): the bounds U [B, Hkv, G, T, nb] and the score blocks are ordered by (the
  bounds themselves unless spec.block_rank == "centre")."""
  u = block_bounds(q, summ, scale)
  return u, (block_centres(q, summ, scale) if spec.block_rank == "centre" else u)


def middle_counts(lo, hi, spec: CondensateSpec, nb: int, num_keys: int):
  """Middle keys of each query in each block, [B, T, nb] int32, and the middle range
  (mlo, mhi) [B, T]: middle keys are mlo..mhi inclusive."""
  p = spec.block_size
  mlo = lo + spec.anchor
  mhi = jnp.minimum(hi - spec.window, num_keys - 1)
  start = jnp.arange(nb, dtype=jnp.int32) * p
  n = jnp.minimum(mhi[..., None], start + p - 1) - jnp.maximum(mlo[..., None], start) + 1
  return jnp.maximum(n, 0), mlo, mhi


def _static_positions(lo, hi, spec, num_keys):
  """Anchor + window positions [B, T, N] and validity (as `selection.set_indices`)."""
  a = lo[..., None] + jnp.arange(min(spec.anchor, num_keys), dtype=jnp.int32)
  a_ok = a <= hi[..., None]
  w = hi[..., None] - jnp.arange(min(spec.window, num_keys), dtype=jnp.int32)
  w_ok = (w >= lo[..., None]) & (w >= lo[..., None] + spec.anchor)
  idx = jnp.concatenate([a, w], -1)
  return jnp.clip(idx, 0, num_keys - 1), jnp.concatenate([a_ok, w_ok], -1)


def _rows(x, idx):
  """x [B, S, K, D], idx [B, K, T, N] -> [B, K, T, N, D]."""
  b, _, hkv, d = x.shape
  _, _, t, n = idx.shape
  xt = x.transpose(0, 2, 1, 3)
  flat = jnp.broadcast_to(idx, (b, hkv, t, n)).reshape(b, hkv, t * n, 1)
  return jnp.take_along_axis(xt, flat, axis=2).reshape(b, hkv, t, n, d)


def _log_delta_to_eps(log_delta, lse):
  """eps = delta / (Z_C + delta) from log delta and lse = log Z_C (same reference)."""
  eps = jax.nn.sigmoid(log_delta - jnp.where(jnp.isneginf(lse), 0.0, lse))
  eps = jnp.where(jnp.isneginf(lse), 1.0, eps)
  return jnp.where(jnp.isneginf(log_delta), 0.0, eps)


# ------------------------------------------------------------------------------- orders


def group_score(u, head_axis, block_axis):
  """The score a GQA group ranks blocks by: max over its heads of U_gb - max_b' U_gb'.

  Each head's bounds are taken relative to its own best block (softmax is shift
  invariant per head), so a head whose query has a small norm still gets its best blocks
  chosen; a plain max over heads lets the head with the largest |q| take every slot.
  Blocks with no middle key keep -inf.
  """
  best = jnp.max(u, axis=block_axis, keepdims=True)
  rel = u - jnp.where(jnp.isneginf(best), 0.0, best)
  return jnp.max(rel, axis=head_axis)


def group_order(u, n_mid, rank=None):
  """Block order shared by a GQA group (by the bounds u, or by `rank` if given).

  u [B, K, G, T, nb], n_mid [B, T, nb] -> (order [B, K, T, nb] int32 (block ids, best
  first, ties to the lower block), u_sorted [B, K, G, T, nb] (-inf: no middle key),
  n_sorted [B, K, T, nb], tail [B, K, G, T, nb + 1] = log sum_{i >= r} n e^{U} over the
  blocks after position r of the order (the certificate of taking the first r),
  has [B, K, T, nb + 1] bool: position r holds a block with middle keys).
  """
  u = jnp.where(n_mid[:, None, None] > 0, u, NEG_INF)
  rank = u if rank is None else jnp.where(n_mid[:, None, None] > 0, rank, NEG_INF)
  ug = group_score(rank, head_axis=2, block_axis=4)                # [B, K, T, nb]
  order = jnp.argsort(-ug, axis=-1, stable=True).astype(jnp.int32)
  u_sorted = jnp.take_along_axis(u, order[:, :, None], axis=-1)
  n_b = jnp.broadcast_to(n_mid[:, None], ug.shape)
  n_sorted = jnp.take_along_axis(n_b, order, axis=-1)
  terms = jnp.where(n_sorted[:, :, None] > 0,
                    jnp.log(jnp.maximum(n_sorted, 1).astype(jnp.float32))[:, :, None]
                    + u_sorted, NEG_INF)
  tail = jax.lax.cumlogsumexp(terms, axis=terms.ndim - 1, reverse=True)
  pad = [(0, 0)] * (terms.ndim - 1) + [(0, 1)]
  tail = jnp.pad(tail, pad, constant_values=NEG_INF)
  has = jnp.pad(n_sorted > 0, [(0, 0)] * 3 + [(0, 1)])
  return order, u_sorted, n_sorted, tail, has


# ------------------------------------------------------------------- the specification


def _select_attend(q, k, v, summ, lo, hi, spec, scale, want_output=True):
  """Runs the selection loop and the attention over the selected set.

  Returns (out [B, K, G, T, D] float32, info dict) — see `_stats` for the info keys.
  want_output=False (mode "bounded" only): skip the final attention; out is None and
  info holds the set (st_idx/st_ok, topp/topv) and log_delta for a kernel to finish.
  """
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  p, nb = spec.block_size, summ.num_blocks
  mode = spec.selection
  kk = min(spec.top_k, s_len) if mode == "bounded" else 0

  qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)           # [B, K, G, T, D]

  def score(rows):   # rows [B, K, T, N, D] -> [B, K, G, T, N] float32
    s = jnp.einsum("bkgtd,bktnd->bkgtn", qg, rows.astype(q.dtype),
                   preferred_element_type=jnp.float32, precision=_HIGHEST)
    return s * jnp.float32(scale)

  n_mid, mlo, mhi = middle_counts(lo, hi, spec, nb, s_len)
  u, rank = block_ranking(q, summ, scale, spec)
  order, u_sorted, _, tail, has = group_order(u, n_mid, rank)
  sufmax = jnp.pad(jax.lax.cummax(u_sorted, axis=4, reverse=True),
                   [(0, 0)] * 4 + [(0, 1)], constant_values=NEG_INF)

  # Anchor and window: always in the set, scored once.
  st_idx, st_ok = _static_positions(lo, hi, spec, s_len)            # [B, T, N]
  st_idx4 = jnp.broadcast_to(st_idx[:, None], (b, hkv) + st_idx.shape[1:])
  v_st = _rows(v, st_idx4).astype(jnp.float32)
  s_st = jnp.where(st_ok[:, None, None], score(_rows(k, st_idx4)), NEG_INF)
  m0 = jnp.max(s_st, axis=-1, initial=NEG_INF)
  m0s = jnp.where(jnp.isneginf(m0), 0.0, m0)
  p0 = jnp.exp(s_st - m0s[..., None])
  l0 = jnp.sum(p0, -1)
  acc0 = jnp.einsum("bkgtn,bktnd->bkgtd", p0, v_st, precision=_HIGHEST)

  def lse_of(m, l):
    return jnp.where(l > 0, jnp.where(jnp.isneginf(m), 0.0, m) + jnp.log(
        jnp.where(l > 0, l, 1.0)), NEG_INF)

  def at(x, i):   # x[..., i] for a traced scalar i
    return jax.lax.dynamic_index_in_dim(x, i, axis=x.ndim - 1, keepdims=False)

  def done_now(i, st):
    _, m, l, _, _, _, topv, _, _ = st
    if mode == "blocks":
      return jnp.broadcast_to(i >= spec.top_blocks, (b, hkv, t))
    if mode == "certified":
      eps = _log_delta_to_eps(at(tail, i), lse_of(m, l))
      return jnp.all(eps <= spec.epsilon, axis=2)
    tau = topv[..., kk - 1] if kk else jnp.full((b, hkv, g, t), jnp.inf)
    suf = at(sufmax, i)
    return jnp.all((suf < tau) | jnp.isneginf(suf), axis=2)

  def active_now(i, st):
    alive = st[-1]
    return alive & at(has, jnp.minimum(i, nb)) & ~done_now(i, st) & (i < nb)

  def cond(st):
    i = st[0]
    return (i < nb) & jnp.any(active_now(i, st))

  def body(st):
    i, m, l, acc, r, n_exp, topv, topp, alive = st
    active = active_now(i, st)
    blk = at(order, jnp.minimum(i, nb - 1))                          # [B, K, T]
    pos = blk[..., None] * p + jnp.arange(p, dtype=jnp.int32)         # [B, K, T, P]
    ok = (active[..., None] & (pos < s_len) & (pos >= mlo[:, None, :, None])
          & (pos <= mhi[:, None, :, None]))
    pos_c = jnp.minimum(pos, s_len - 1)
    s = jnp.where(ok[:, :, None], score(_rows(k, pos_c)), NEG_INF)   # [B, K, G, T, P]
    n_exp = n_exp + jnp.sum(ok, -1, dtype=jnp.int32)
    r = r + active.astype(jnp.int32)
    if mode == "bounded":
      if kk:
        vals = jnp.concatenate([topv, s], -1)
        poss = jnp.concatenate(
            [topp, jnp.broadcast_to(jnp.where(ok, pos, s_len)[:, :, None], s.shape)], -1)
        neg, poss = jax.lax.sort((-vals, poss), dimension=vals.ndim - 1, num_keys=2)
        topv, topp = -neg[..., :kk], poss[..., :kk]
    else:
      m_new = jnp.maximum(m, jnp.max(s, -1))
      m_use = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      alpha = jnp.exp(jnp.where(jnp.isneginf(m), 0.0, m) - m_use)
      alpha = jnp.where(jnp.isneginf(m), 0.0, alpha)
      pr = jnp.exp(s - m_use[..., None])
      v_rows = _rows(v, pos_c).astype(jnp.float32)
      l = alpha * l + jnp.sum(pr, -1)
      acc = alpha[..., None] * acc + jnp.einsum("bkgtn,bktnd->bkgtd", pr, v_rows,
                                                precision=_HIGHEST)
      m = m_new
    return (i + 1, m, l, acc, r, n_exp, topv, topp, alive & active)

  zeros_kt = jnp.zeros((b, hkv, t), jnp.int32)
  st = (jnp.int32(0), m0, l0, acc0, zeros_kt, zeros_kt,
        jnp.full((b, hkv, g, t, kk), NEG_INF, jnp.float32),
        jnp.full((b, hkv, g, t, kk), s_len, jnp.int32),
        jnp.ones((b, hkv, t), bool))
  _, m, l, acc, r, n_exp, topv, topp, _ = jax.lax.while_loop(cond, body, st)

  log_delta = jnp.take_along_axis(tail, r[:, :, None, :, None], axis=-1)[..., 0]
  if mode == "bounded" and kk:
    n_drop = jnp.maximum(n_exp[:, :, None] - kk, 0).astype(jnp.float32)
    extra = jnp.where(n_drop > 0, jnp.log(jnp.maximum(n_drop, 1.0)) + topv[..., -1],
                      NEG_INF)
    log_delta = jnp.logaddexp(log_delta, extra)
  info = dict(order=order, r=r, n_exp=n_exp, topv=topv, topp=topp, st_ok=st_ok,
              st_idx=st_idx, log_delta=log_delta)
  if not want_output:
    assert mode == "bounded", mode
    return None, info
  if mode == "bounded":
    # Attention over anchor + window + the top-k positions.
    top_ok = ~jnp.isneginf(topv)
    v_top = _rows(v, jnp.minimum(topp, s_len - 1).transpose(0, 1, 3, 2, 4).reshape(
        b, hkv, t, g * kk)).reshape(b, hkv, t, g, kk, d).transpose(0, 1, 3, 2, 4, 5)
    m = jnp.maximum(m0, jnp.max(topv, -1, initial=NEG_INF))
    ms = jnp.where(jnp.isneginf(m), 0.0, m)[..., None]
    p_st, p_top = jnp.exp(s_st - ms), jnp.where(top_ok, jnp.exp(topv - ms), 0.0)
    l = jnp.sum(p_st, -1) + jnp.sum(p_top, -1)
    acc = (jnp.einsum("bkgtn,bktnd->bkgtd", p_st, v_st, precision=_HIGHEST)
           + jnp.einsum("bkgtn,bkgtnd->bkgtd", p_top, v_top.astype(jnp.float32),
                        precision=_HIGHEST))
  lse = lse_of(m, l)
  out = jnp.where((l > 0)[..., None], acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
  info.update(eps=_log_delta_to_eps(log_delta, lse), lse=lse)
  return out, info


def _set_mask(info, lo, hi, spec, s_len, shape):
  """The selected set as a [B, K, G, T, S] bool mask (for the stats)."""
  masks = sel.static_masks(lo, hi, s_len, spec)
  j = jnp.arange(s_len, dtype=jnp.int32)
  if spec.selection == "bounded":
    topp, ok = info["topp"], ~jnp.isneginf(info["topv"])
    chosen = jnp.zeros(shape, bool)
    if topp.shape[-1]:
      chosen = jnp.put_along_axis(chosen, jnp.minimum(topp, s_len - 1), ok, axis=-1,
                                  inplace=False)
  else:
    rank = jnp.argsort(info["order"], axis=-1)                          # [B, K, T, nb]
    blk_sel = rank < info["r"][..., None]
    chosen = jnp.take(blk_sel, j // spec.block_size, axis=-1)[:, :, None]
  return masks.anchor | masks.window | (masks.middle & chosen), masks.visible


def _stats(q, k, lo, hi, spec, scale, info):
  """AttentionStats [B, Hq, T]; the true masses read every score (stats only)."""
  scores = _attention._scores(q, k, scale)                               # [B,K,G,T,S]
  in_set, visible = _set_mask(info, lo, hi, spec, k.shape[1], scores.shape)
  n_static = jnp.sum(info["st_ok"], -1, dtype=jnp.int32)[:, None, None]
  scored = n_static + info["n_exp"][:, :, None]
  return _mass_stats(scores, in_set, visible, info["eps"], scored)


def _mass_stats(scores, in_set, visible, eps, scored):
  """AttentionStats [B, Hq, T] from scores [B, K, G, T, S], the set and visible masks,
  the certified eps [B, K, G, T] and the keys scored (broadcastable to [B, K, G, T])."""
  visible = jnp.broadcast_to(visible, scores.shape)
  m = jnp.max(jnp.where(visible, scores, NEG_INF), -1, keepdims=True)
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  e = jnp.where(visible, jnp.exp(scores - m), 0.0)
  z_all = jnp.sum(e, -1)
  safe = jnp.where(z_all > 0, z_all, 1.0)
  captured = jnp.where(z_all > 0, jnp.sum(jnp.where(in_set, e, 0.0), -1) / safe, 1.0)
  dropped = jnp.where(z_all > 0, jnp.sum(jnp.where(in_set, 0.0, e), -1) / safe, 0.0)
  set_size = jnp.sum(in_set & visible, -1, dtype=jnp.int32)
  n_visible = jnp.sum(visible, -1, dtype=jnp.int32)
  scored = jnp.broadcast_to(scored, set_size.shape)
  heads = _attention._heads_last
  return AttentionStats(heads(captured), heads(dropped), heads(eps), heads(set_size),
                        heads(n_visible), heads(scored))


def _query_block_prefill(q, k, v, q_positions, kv_lengths, lo, hi, summ, spec, scale,
                         return_stats):
  """selection="blocks" with spec.query_blocks, T > 1: the sets of the timed prefill
  (per block of query rows, `blocks_pallas.prefill_lists`) as a masked softmax, so a
  set that covers every visible key gives the dense output bit for bit."""
  from condensate_jax import blocks_pallas
  b, t, hq, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  p, nb = spec.block_size, summ.num_blocks
  kblocks, kflags = blocks_pallas.prefill_lists(
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
  masks = sel.static_masks(lo, hi, s_len, spec)
  blk = jnp.arange(s_len) // p
  in_set = masks.anchor | masks.window | (masks.middle & jnp.take(taken, blk, axis=-1))
  scores = _attention._scores(q, k, scale)                               # [B,K,G,T,S]
  out = _attention._masked_softmax(scores, in_set, v, q.dtype)
  if not return_stats:
    return out
  lse = jax.nn.logsumexp(jnp.where(in_set, scores, NEG_INF), axis=-1)
  n_mid, _, _ = middle_counts(lo, hi, spec, nb, s_len)                   # [B, T, nb]
  n_mid = n_mid[:, None, None]
  u = block_bounds(q, summ, scale)
  log_delta = jax.nn.logsumexp(
      jnp.where((n_mid > 0) & ~taken, u + jnp.log(jnp.maximum(n_mid, 1)), NEG_INF), -1)
  scored = jnp.sum(masks.visible & jnp.take(listed, blk, axis=-1), -1, dtype=jnp.int32)
  return out, _mass_stats(scores, in_set, masks.visible,
                          _log_delta_to_eps(log_delta, lse), scored)


def _check_block_spec(spec):
  check_spec(spec)
  if spec.selection not in BLOCK_SELECTIONS:
    raise ValueError(f"spec.selection={spec.selection!r}: expected one of "
                     f"{BLOCK_SELECTIONS} for block-summary selection.")


def _check_summaries(summ, k, spec):
  if not isinstance(summ, BlockSummaries):
    raise ValueError(f"summaries: expected BlockSummaries or None, got "
                     f"{type(summ).__name__}.")
  if summ.block_size != spec.block_size:
    raise ValueError(f"summaries.block_size={summ.block_size}: expected "
                     f"spec.block_size={spec.block_size}.")
  b, s, hkv, d = k.shape
  want = (b, num_blocks(s, spec.block_size), hkv, d)
  if tuple(summ.kmin.shape) != want or tuple(summ.kmax.shape) != want:
    raise ValueError(f"summaries.kmin.shape={tuple(summ.kmin.shape)}: expected {want} "
                     "([B, ceil(S / block_size), Hkv, D] for these keys).")


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats"))
def _xla_blocks(q, k, v, q_positions, kv_lengths, summaries, *, spec, causal,
                sliding_window, scale, return_stats):
  lo, hi = sel.visible_range(q_positions, kv_lengths, causal=causal,
                             sliding_window=sliding_window)
  if summaries is None:
    summaries = _build(k, kv_lengths, spec.block_size)
  if spec.query_blocks and q.shape[1] > 1:
    if not causal or sliding_window is not None:
      raise ValueError(f"spec.query_blocks=True with causal={causal}, sliding_window="
                       f"{sliding_window}: per-query-block lists are causal prefill "
                       "lists (causal=True, no sliding window).")
    return _query_block_prefill(q, k, v, q_positions, kv_lengths, lo, hi, summaries,
                                spec, scale, return_stats)
  out, info = _select_attend(q, k, v, summaries, lo, hi, spec, scale)
  b, hkv, g, t, d = out.shape
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d).astype(q.dtype)
  if not return_stats:
    return out
  return out, _stats(q, k, lo, hi, spec, scale, info)


def condensate_xla_blocks(q, k, v, q_positions, kv_lengths, *, spec, causal,
                          sliding_window, scale, return_stats):
  """`implementation="xla_blocks"`: the contract of `attention._condensate_masked`;
  summaries are built from k inside the call."""
  _check_block_spec(spec)
  return _xla_blocks(q, k, v, q_positions, kv_lengths, None, spec=spec, causal=causal,
                     sliding_window=sliding_window, scale=scale, return_stats=return_stats)


def block_condensate_attention(q, k, v, spec: CondensateSpec, *, summaries=None,
                               causal: bool = True, q_positions=None, kv_lengths=None,
                               sliding_window=None, scale=None, return_stats=False):
  """`cj.condensate_attention(..., implementation="xla")` for a block-selection spec,
  with optional precomputed `summaries` (a `BlockSummaries` of these keys)."""
  _check_block_spec(spec)
  kv_lengths, q_positions, scale = _attention._prepare(
      q, k, v, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  if summaries is not None:
    _check_summaries(summaries, k, spec)
  return _xla_blocks(q, k, v, q_positions, kv_lengths, summaries, spec=spec,
                     causal=bool(causal),
                     sliding_window=_attention._static_window(sliding_window),
                     scale=scale, return_stats=bool(return_stats))


_XLA_NAMES = ("xla", "xla_blocks")
_PALLAS_NAMES = ("pallas", "pallas_blocks")


def attend_with_summaries(q, k, v, spec: CondensateSpec, summaries: BlockSummaries, *,
                          implementation: str = "xla", causal: bool = True,
                          q_positions=None, kv_lengths=None, sliding_window=None,
                          scale=None, return_stats=False):
  """Block-selection attention with precomputed `summaries` of k (what a model layer
  calls with the summaries its KV cache keeps). implementation "xla" / "xla_blocks":
  the XLA specification (`block_condensate_attention`); "pallas" / "pallas_blocks": the
  Pallas kernels of `blocks_pallas` (same sets), fed the same summaries."""
  _check_block_spec(spec)
  if implementation in _XLA_NAMES:
    return block_condensate_attention(
        q, k, v, spec, summaries=summaries, causal=causal, q_positions=q_positions,
        kv_lengths=kv_lengths, sliding_window=sliding_window, scale=scale,
        return_stats=return_stats)
  if implementation not in _PALLAS_NAMES:
    raise ValueError(f"implementation={implementation!r} with spec.selection="
                     f"{spec.selection!r}: expected one of {_XLA_NAMES + _PALLAS_NAMES}.")
  from condensate_jax import blocks_pallas   # imports pallas
  kv_lengths, q_positions, scale = _attention._prepare(
      q, k, v, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  _check_summaries(summaries, k, spec)
  return blocks_pallas.pallas_blocks_attention(
      q, k, v, q_positions, kv_lengths, summaries, spec=spec, causal=bool(causal),
      sliding_window=_attention._static_window(sliding_window), scale=scale,
      return_stats=bool(return_stats))


_attention.register_implementation("xla_blocks", condensate_xla_blocks)


def _register_pallas():
  # The Pallas implementation lives in its own module (it imports pallas); importing
  # this module registers both names, as the core's lazy loader expects.
  from condensate_jax import blocks_pallas  # noqa: F401  (registers "pallas_blocks")


try:
  _register_pallas()
except ImportError as err:   # pallas unavailable: xla_blocks still works
  _PALLAS_IMPORT_ERROR = err
