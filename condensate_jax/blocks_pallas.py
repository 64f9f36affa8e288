"""`implementation="pallas"` for block-selection specs ("pallas_blocks"), and the fast
decode / prefill steps the benchmark times.

pallas_blocks (same contract and same sets as `blocks.condensate_xla_blocks`):
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

decode_step / prefill_step: the timed paths (precomputed summaries for decode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from condensate_jax import attention as _attention
from condensate_jax import blocks as _blocks
from condensate_jax import selection as sel
from pallas_kernels.block_sparse import api as _bs_api

NEG_INF = float("-inf")
# Which block-sparse kernel runs: None = the best for the platform (see
# pallas_kernels.block_sparse.api); tests may set "reference".
KERNEL_IMPLEMENTATION = None


def static_ranges(lo, hi, spec, num_keys):
  """[B, T, 6] int32: anchor a_lo..a_hi, window w_lo..w_hi, middle m_lo..m_hi (inclusive;
  empty when hi < lo). Same sets as `selection.static_masks`."""
  a_lo, a_hi = lo, jnp.minimum(lo + spec.anchor - 1, hi)
  w_lo = jnp.maximum(hi - spec.window + 1, lo + spec.anchor)
  m_lo, m_hi = lo + spec.anchor, jnp.minimum(hi - spec.window, num_keys - 1)
  return jnp.stack([a_lo, a_hi, w_lo, hi, m_lo, m_hi], -1).astype(jnp.int32)


def _decode(q, k, v, blocks, ranges, spec, scale, with_static=True):
  """Kernel call + reshape: partials o [B, K, G, T, NS, D], lse [B, K, G, T, NS]."""
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


def _merge(o_acc, lse_acc, o_j, lse_j, take):
  """Adds a partial (o_j, lse_j) to (o_acc, lse_acc) where `take` [.., G, T]."""
  lse_new = jnp.logaddexp(lse_acc, lse_j)
  ref = jnp.where(jnp.isneginf(lse_new), 0.0, lse_new)
  w_acc = jnp.where(jnp.isneginf(lse_acc), 0.0, jnp.exp(lse_acc - ref))
  w_j = jnp.where(jnp.isneginf(lse_j), 0.0, jnp.exp(lse_j - ref))
  o_new = w_acc[..., None] * o_acc + w_j[..., None] * o_j
  return (jnp.where(take[..., None], o_new, o_acc), jnp.where(take, lse_new, lse_acc))


def _select_blocks_mode(q, k, v, summ, lo, hi, spec, scale, num_splits):
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  nb = summ.num_blocks
  n_mid, _, _ = _blocks.middle_counts(lo, hi, spec, nb, s_len)
  u, rank = _blocks.block_ranking(q, summ, scale, spec)
  order, _, n_sorted, tail, has = _blocks.group_order(u, n_mid, rank)
  m = min(spec.top_blocks, nb)
  ranges = static_ranges(lo, hi, spec, s_len)
  ns = max(1, min(num_splits, m))
  bps = -(-m // ns) if m else 1
  ids = jnp.where(has[..., :m], order[..., :m], -1)
  ids = jnp.pad(ids, [(0, 0)] * 3 + [(0, ns * bps - m)], constant_values=-1)
  o, lse = _decode(q, k, v, ids.reshape(b, hkv, t, ns, bps), ranges, spec, scale)
  o, lse = _combine5(o, lse)
  r = jnp.sum(has[..., :m], -1, dtype=jnp.int32)
  n_exp = jnp.sum(jnp.where(has[..., :m], n_sorted[..., :m], 0), -1, dtype=jnp.int32)
  log_delta = jnp.take_along_axis(tail, r[:, :, None, :, None], axis=-1)[..., 0]
  return o, lse, dict(order=order, r=r, n_exp=n_exp, log_delta=log_delta)


def _combine5(o, lse):
  """Split merge on [B, K, G, T, NS(, D)] partials."""
  lse_tot = jax.nn.logsumexp(lse, axis=-1)
  lse_tot = jnp.where(jnp.isnan(lse_tot), NEG_INF, lse_tot)
  w = jnp.where(jnp.isneginf(lse), 0.0,
                jnp.exp(lse - jnp.where(jnp.isneginf(lse_tot), 0.0, lse_tot)[..., None]))
  return jnp.sum(w[..., None] * o, axis=-2), lse_tot


def _select_certified(q, k, v, summ, lo, hi, spec, scale):
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  nb = summ.num_blocks
  n_mid, _, _ = _blocks.middle_counts(lo, hi, spec, nb, s_len)
  u = _blocks.block_bounds(q, summ, scale)
  order, _, n_sorted, tail, has = _blocks.group_order(u, n_mid)
  ranges = static_ranges(lo, hi, spec, s_len)
  rr = max(1, min(spec.top_blocks, nb))
  n_rounds = -(-nb // rr)
  pad = n_rounds * rr - nb
  order_p = jnp.pad(order, [(0, 0)] * 3 + [(0, pad)], constant_values=-1)
  has_p = jnp.pad(has[..., :nb], [(0, 0)] * 3 + [(0, pad + 1)])
  n_p = jnp.pad(n_sorted, [(0, 0)] * 3 + [(0, pad)])
  tail_p = jnp.pad(tail, [(0, 0)] * 4 + [(0, pad)], constant_values=NEG_INF)

  none = jnp.full((b, hkv, t, 1, 1), -1, jnp.int32)
  o0, lse0 = _decode(q, k, v, none, ranges, spec, scale, with_static=True)
  o_acc, lse_acc = o0[..., 0, :], lse0[..., 0]

  def at(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, axis=x.ndim - 1, keepdims=False)

  def done(i, lse_acc):
    eps = _blocks._log_delta_to_eps(at(tail_p, i), lse_acc)
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
    o_j, lse_j = _decode(q, k, v, ids[..., None], ranges, spec, scale, with_static=False)
    n_read = n_read + jnp.sum(jnp.where(
        ids >= 0, jax.lax.dynamic_slice_in_dim(n_p, i0, rr, axis=3), 0), -1)
    for j in range(rr):
      i = i0 + j
      take = alive & at(has_p, i) & ~done(i, lse_acc)
      o_acc, lse_acc = _merge(o_acc, lse_acc, o_j[..., j, :], lse_j[..., j],
                              jnp.broadcast_to(take[:, :, None], lse_acc.shape))
      r = r + take.astype(jnp.int32)
      alive = take
    alive = alive & at(has_p, i0 + rr) & ~done(i0 + rr, lse_acc)
    return c + 1, o_acc, lse_acc, r, n_read, alive

  _, o_acc, lse_acc, r, n_read, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), o_acc, lse_acc, zeros, zeros, alive0))
  log_delta = jnp.take_along_axis(tail, r[:, :, None, :, None], axis=-1)[..., 0]
  return o_acc, lse_acc, dict(order=order, r=r, n_exp=n_read, log_delta=log_delta)


def _bounded(q, k, v, summ, lo, hi, spec, scale):
  from pallas_kernels.gather_attention import api as _gather_api
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  _, info = _blocks._select_attend(q, k, v, summ, lo, hi, spec, scale, want_output=False)
  st_idx = jnp.broadcast_to(info["st_idx"][:, None], (b, hkv) + info["st_idx"].shape[1:])
  st_ok = jnp.broadcast_to(info["st_ok"][:, None], st_idx.shape)
  topp, topv = info["topp"], info["topv"]
  kk = topp.shape[-1]
  h_idx = jnp.minimum(topp, k.shape[1] - 1).reshape(b, hq, t, kk)
  h_ok = (~jnp.isneginf(topv)).reshape(b, hq, t, kk)
  out, lse = _gather_api.gather_attention(q, k, v, h_idx, h_ok, scale=scale,
                                          shared_indices=st_idx, shared_valid=st_ok)
  g = hq // hkv
  lse = lse.reshape(b, hkv, g, t)
  o = out.astype(jnp.float32).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
  return o, lse, info


@functools.partial(jax.jit, static_argnames=("spec", "causal", "sliding_window", "scale",
                                             "return_stats", "num_splits"))
def pallas_blocks_attention(q, k, v, q_positions, kv_lengths, summaries, *, spec, causal,
                            sliding_window, scale, return_stats, num_splits=8):
  """Block-selection attention through the Pallas kernels on validated inputs, with
  optional precomputed `summaries` (None: built from k). Same sets as the XLA spec."""
  if spec.query_blocks and q.shape[1] > 1:
    # the prefill lists as a masked softmax (the same sets as prefill_step's kernel,
    # which assumes a full-length cache; see blocks._query_block_prefill)
    return _blocks._xla_blocks(q, k, v, q_positions, kv_lengths, summaries, spec=spec,
                               causal=causal, sliding_window=sliding_window, scale=scale,
                               return_stats=return_stats)
  lo, hi = sel.visible_range(q_positions, kv_lengths, causal=causal,
                             sliding_window=sliding_window)
  if summaries is None:
    summaries = _blocks._build(k, kv_lengths, spec.block_size)
  if spec.selection == "blocks":
    o, lse, info = _select_blocks_mode(q, k, v, summaries, lo, hi, spec, scale, num_splits)
  elif spec.selection == "certified":
    o, lse, info = _select_certified(q, k, v, summaries, lo, hi, spec, scale)
  else:
    o, lse, info = _bounded(q, k, v, summaries, lo, hi, spec, scale)
  b, hkv, g, t, d = o.shape
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d).astype(q.dtype)
  if not return_stats:
    return out
  info["eps"] = _blocks._log_delta_to_eps(info["log_delta"], lse)
  _, st_ok = _blocks._static_positions(lo, hi, spec, k.shape[1])
  info.setdefault("st_ok", st_ok)
  return out, _blocks._stats(q, k, lo, hi, spec, scale, info)


def condensate_pallas_blocks(q, k, v, q_positions, kv_lengths, *, spec, causal,
                             sliding_window, scale, return_stats):
  """`implementation="pallas_blocks"`: contract of `attention._condensate_masked`."""
  _blocks._check_block_spec(spec)
  return pallas_blocks_attention(q, k, v, q_positions, kv_lengths, None, spec=spec,
                                 causal=causal, sliding_window=sliding_window,
                                 scale=scale, return_stats=return_stats)


_attention.register_implementation("pallas_blocks", condensate_pallas_blocks)


# ------------------------------------------------------------------- timed fast paths


def fast_bounds(q, kmin, kmax, scale, *, bounds=None, with_centre=False):
  """U [B, K, G, nb] float32 for a decode query q [B, Hq, D] from min/max summaries
  [B, nb, K, D]: the bound of `blocks.block_bounds` (a rigorous upper bound on
  scale * q.k over each block's keys); with_centre also q.(min + max) / 2.

  bounds="triton": one Pallas kernel reading each summary row once (q+.max + q-.min as
  tensor-core matmuls); "xla": `blocks.box_bounds` / `blocks.box_centres`; None:
  Triton on a GPU where the kernel takes the shapes, else XLA.
  """
  if bounds not in (None, "triton", "xla"):
    raise ValueError(f"bounds={bounds!r}: expected None, 'triton' or 'xla'.")
  g = q.shape[1] // kmin.shape[2]
  if bounds == "triton" or (bounds is None and jax.default_backend() == "gpu"):
    from pallas_kernels.block_sparse import gpu_triton
    try:
      res = gpu_triton.block_bounds(q, kmin, kmax, scale=scale,
                                    slack=_blocks.bound_slack(q.shape[-1]),
                                    with_centre=with_centre,
                                    interpret=jax.default_backend() != "gpu")
      return tuple(x[:, :, :g] for x in res) if with_centre else res[:, :, :g]
    except NotImplementedError:
      if bounds == "triton":
        raise
  u = _blocks.box_bounds(q[:, None], kmin, kmax, scale)[:, :, :, 0]      # [B, K, G, nb]
  if not with_centre:
    return u
  return u, _blocks.box_centres(q[:, None], kmin, kmax, scale)[:, :, :, 0]


TOP_M_METHODS = ("top_k", "chunked", "superblock")


def top_m(x, m, method="top_k", chunk=256):
  """Exact top-m along the last axis (values, indices; ties to the lower index), the same
  result as `lax.top_k` by every method:

  "top_k":      one lax.top_k over the row;
  "chunked":    lax.top_k inside chunks of `chunk` entries, then over the m * n_chunks
                candidates (each of the row's top m is among its chunk's top m;
                candidates are laid out chunk by chunk, so ties still go to the lower
                index);
  "superblock": the max of each superblock of `chunk` entries, the top m superblocks by
                it (put back in index order), then the top m of their m * chunk entries.
                Exact: each of the row's top m lies in a superblock whose max is at least
                the m-th value, and at most m superblocks have such a max (ties: the
                lowest-index ones, which hold the lowest-index tied entries).
  Falls back to "top_k" where the row is too short for the method to help.
  """
  if method not in TOP_M_METHODS:
    raise ValueError(f"method={method!r}: expected one of {list(TOP_M_METHODS)}.")
  n = x.shape[-1]
  lead = x.shape[:-1]
  pad = -n % chunk
  n_chunks = (n + pad) // chunk
  if method == "top_k" or n <= chunk or (method == "chunked" and m > chunk) or (
      method == "superblock" and n_chunks <= m):
    return jax.lax.top_k(x, m)
  xp = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)], constant_values=NEG_INF)
  xc = xp.reshape(lead + (n_chunks, chunk))
  if method == "chunked":
    v1, i1 = jax.lax.top_k(xc, m)                                        # [..., C, m]
    i1 = i1 + (jnp.arange(n_chunks) * chunk)[:, None]
    v2, i2 = jax.lax.top_k(v1.reshape(lead + (-1,)), m)
    return v2, jnp.take_along_axis(i1.reshape(lead + (-1,)), i2, axis=-1)
  _, sb = jax.lax.top_k(jnp.max(xc, axis=-1), m)                         # [..., m]
  sb = jnp.sort(sb, axis=-1)                                             # index order
  cand = jnp.take_along_axis(xc, sb[..., None], axis=-2)                 # [..., m, chunk]
  v2, i2 = jax.lax.top_k(cand.reshape(lead + (-1,)), m)
  return v2, jnp.take_along_axis(sb, i2 // chunk, axis=-1) * chunk + i2 % chunk


def superblock_size(n, m):
  """Superblock size for `top_m(..., "superblock")` over n entries, top m: about 16 m
  superblocks (two small sorts of ~16 m entries each), a power of two >= 8."""
  return max(8, 1 << max(0, (n // (16 * max(m, 1))).bit_length() - 1))


def _decode_ranges(kv_lengths, spec, nb, s_len):
  """(lo, hi [B, 1], n_mid [B, 1, nb]) of the decode query at position kv_lengths - 1."""
  lo, hi = sel.visible_range(kv_lengths[:, None] - 1, kv_lengths, causal=True,
                             sliding_window=None)
  return lo, hi, _blocks.middle_counts(lo, hi, spec, nb, s_len)[0]


SELECT_METHODS = TOP_M_METHODS + ("rank",)


def _interpret_triton():
  """The lean step's Triton kernels: compiled on a GPU, interpreted on a CPU (tests);
  elsewhere (TPU) they raise NotImplementedError and the step falls back to the
  superblock top-M and the split path (whose kernel has a Mosaic TPU version)."""
  return jax.default_backend() == "cpu"


def _rank_select(q, kv_lengths, kmin, kmax, spec, scale, rank, m):
  """decode_select by method="rank": three Pallas kernels, no sort and no XLA between
  them. The bounds kernel masks blocks without middle keys and emits the max of the
  ranking score per superblock; `gpu_triton.superblock_select` picks the top-M
  superblocks by the group score of those maxima (exactly the superblock max of
  `blocks.group_score`: subtracting a head's best is monotone); `gpu_triton.rank_select`
  ranks the blocks of those superblocks by comparisons and writes each winner to its
  rank's slot. The same ids, in the same order, as `top_m` (an exact top-M by the
  superblock argument of `top_m`). Returns ids [B, K, next_pow2(M + 1)] (-1 beyond M,
  the width `gpu_triton.decode_step` takes as is) and u with the kernel's Gp rows."""
  from pallas_kernels.block_sparse import gpu_triton
  hq = q.shape[2]
  nb, hkv = kmin.shape[1], kmin.shape[2]
  g = hq // hkv
  x = min(superblock_size(nb, m), nb & -nb)
  interpret = _interpret_triton()
  res = gpu_triton.block_bounds(
      q[:, 0], kmin, kmax, scale=scale, slack=_blocks.bound_slack(q.shape[-1]),
      with_centre=rank == "centre", kv_lengths=kv_lengths, block_size=spec.block_size,
      anchor=spec.anchor, window=spec.window, superblock=x, interpret=interpret)
  u, score, sbmax = res if rank == "centre" else (res[0], res[0], res[1])
  n_sb = nb // x
  sbids, best = gpu_triton.superblock_select(sbmax, top=min(m, n_sb), heads=g,
                                             interpret=interpret)
  width = gpu_triton.next_pow2(m + 1)
  ids = gpu_triton.rank_select(sbids, score, best, top=m, superblock=x, heads=g,
                               width=width, interpret=interpret)
  return ids, u


def _select(q, kmin, kmax, kv_lengths, spec, scale, method, rank, bounds):
  """decode_select's (ids, u); u may carry padding rows beyond G (the rank path's)."""
  rank = spec.block_rank if rank is None else rank
  if rank not in ("bound", "centre"):
    raise ValueError(f"rank={rank!r}: expected 'bound' or 'centre'.")
  if method not in SELECT_METHODS:
    raise ValueError(f"method={method!r}: expected one of {list(SELECT_METHODS)}.")
  nb = kmin.shape[1]
  _, _, n_mid = _decode_ranges(kv_lengths, spec, nb, nb * spec.block_size)
  m = min(spec.top_blocks, nb)
  if method == "rank" and bounds != "xla":
    try:
      return _rank_select(q, kv_lengths, kmin, kmax, spec, scale, rank, m)
    except NotImplementedError:
      pass
  if method == "rank":
    method = "superblock"
  has = n_mid[:, :, None, :] > 0                                         # [B, 1, 1, nb]
  if rank == "bound":
    u = fast_bounds(q[:, 0], kmin, kmax, scale, bounds=bounds)           # [B, K, G, nb]
    u = r = jnp.where(has, u, NEG_INF)
  else:
    u, c = fast_bounds(q[:, 0], kmin, kmax, scale, bounds=bounds, with_centre=True)
    u, r = jnp.where(has, u, NEG_INF), jnp.where(has, c, NEG_INF)
  top_r, ids = top_m(_blocks.group_score(r, head_axis=2, block_axis=3), m, method,
                     superblock_size(nb, m) if method == "superblock" else 256)
  return jnp.where(jnp.isneginf(top_r), -1, ids), u


@functools.partial(jax.jit, static_argnames=("spec", "scale", "method", "rank", "bounds"))
def decode_select(q, kmin, kmax, kv_lengths, *, spec, scale, method="superblock",
                  rank=None, bounds=None):
  """Selection half of `decode_step`: (ids [B, Hkv, M] block ids, -1 = none;
  u [B, Hkv, G, nb] bounds with -inf where a block holds no middle key).

  rank="bound" (selection="blocks" as specified: the M highest bounds); rank="centre"
  ranks by q.c_b with c_b = (min + max) / 2 instead (blocks straddling two topics have
  loose boxes, see BENCHMARKS.md); eps still comes from the bounds u either way.
  bounds: see `fast_bounds` (the centre score comes from the same summary read).
  method: a `top_m` method over the group scores, or "rank": the Pallas rank selection
  (`_rank_select`; Triton kernels, interpreted on a CPU; where its kernels do not take
  the shapes, "superblock"). Every method picks the same ids in the same order from the
  same bounds: on a GPU all use the bounds kernel; on a CPU "rank" interprets it while
  the others (bounds=None) evaluate the bound in XLA, which can differ by an ulp in
  float32 and so break a near-tie the other way (bounds="triton" makes them agree).
  rank=None: spec.block_rank."""
  ids, u = _select(q, kmin, kmax, kv_lengths, spec, scale, method, rank, bounds)
  g = q.shape[2] // kmin.shape[2]
  return ids[..., :min(spec.top_blocks, kmin.shape[1])], u[:, :, :g]


def decode_eps(ids, u, n_mid, lse):
  """Certified eps [B, K, G] of a decode step: ids [B, K, M] chosen blocks (-1 = none),
  u [B, K, G, nb] bounds (-inf: no middle key), n_mid [B, nb] middle keys per block, lse
  [B, K, G] log-normaliser of the attended set."""
  b, hkv, nb = ids.shape[0], ids.shape[1], u.shape[-1]
  chosen = jnp.zeros((b, hkv, nb + 1), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None],
      jnp.where(ids >= 0, ids, nb)].set(True)[..., :nb]                  # [B, K, nb]
  logn = jnp.log(jnp.maximum(n_mid, 1).astype(jnp.float32))[:, None, None, :]
  terms = jnp.where(chosen[:, :, None, :] | (n_mid[:, None, None, :] == 0), NEG_INF,
                    u + logn)
  return _blocks._log_delta_to_eps(jax.nn.logsumexp(terms, axis=-1), lse)


ATTEND_KERNELS = ("split", "fused")


@functools.partial(jax.jit, static_argnames=("spec", "scale", "num_splits", "kernel"))
def decode_attend(q, k, v, ids, u, kv_lengths, *, spec, scale, num_splits=None,
                  kernel="split"):
  """Kernel half of `decode_step`: attention over the anchor, the window and the blocks
  `ids`, and eps from the unselected blocks' bounds `u` ([B, K, G or more, nb]).

  kernel="split": the split-K kernel over the blocks (num_splits programs per K/V head;
  None = one block per program) plus one program for the anchor and window, then XLA
  merges the splits and computes eps. kernel="fused": `gpu_triton.decode_step`, two
  Pallas kernels and nothing else (one program per block plus the anchor/window one,
  each also summing a share of eps; a merge kernel). The same sets either way."""
  if kernel not in ATTEND_KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected one of {list(ATTEND_KERNELS)}.")
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  m = min(spec.top_blocks, u.shape[-1])     # ids may be wider (-1 padded, rank path)
  if kernel == "fused":
    from pallas_kernels.block_sparse import gpu_triton
    try:
      return gpu_triton.decode_step(
          q, k, v, ids, u, kv_lengths, block_size=spec.block_size, scale=scale,
          anchor=min(spec.anchor, s_len), window=min(spec.window, s_len), top=m,
          interpret=_interpret_triton())
    except NotImplementedError:
      pass
  u, ids = u[:, :, :g], ids[..., :m]
  lo, hi, n_mid = _decode_ranges(kv_lengths, spec, u.shape[-1], s_len)
  ns = max(1, min(num_splits or m, m))
  bps = -(-m // ns)
  # split 0 gets no blocks: it reads only the anchor and window ranges, in parallel with
  # the block splits (not before them on the same program)
  ids_p = jnp.pad(ids, ((0, 0), (0, 0), (bps, ns * bps - m)), constant_values=-1)
  ranges = static_ranges(lo, hi, spec, s_len)
  o, lse = _decode(q, k, v, ids_p.reshape(b, hkv, 1, ns + 1, bps), ranges, spec, scale)
  o, lse = _combine5(o, lse)                                             # [B,K,G,1,(D)]
  eps = decode_eps(ids, u, n_mid[:, 0], lse[..., 0])
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, 1, hq, d).astype(q.dtype)
  return out, lse.reshape(b, hq), eps.reshape(b, hq)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "num_splits", "method",
                                             "rank", "bounds", "return_blocks", "kernel"))
def decode_step(q, k, v, kmin, kmax, kv_lengths, *, spec, scale, num_splits=None,
                method="rank", rank=None, bounds=None, return_blocks=False,
                kernel="fused"):
  """One decode step of selection="blocks" (the timed path).

  q [B, 1, Hq, D]; k, v [B, S, Hkv, D]; kmin, kmax [B, nb, Hkv, D] precomputed summaries
  (kept beside the cache, updated by `blocks.append_summaries`); kv_lengths [B].
  Reads the summaries once (`fast_bounds`), selects spec.top_blocks blocks per GQA group
  by `blocks.group_score` (exact top-M by `method`, the same blocks by every method;
  `rank`: see `decode_select`), attends them plus anchor and window (`decode_attend`
  with `kernel`). The defaults method="rank", kernel="fused" are the leanest: five
  Pallas kernels per step and nothing between them (bounds, superblock and block
  ranking, attention with eps shares, merge); where a kernel does not take the shapes
  (e.g. fewer than 16 blocks) the step falls back to "superblock" / "split".
  Returns out [B, 1, Hq, D], lse [B, Hq] and the certified eps [B, Hq] (from the
  unselected blocks' U_b); with return_blocks also the block ids [B, Hkv, M].
  """
  if k.shape[1] != kmin.shape[1] * spec.block_size:
    raise ValueError(f"k.shape[1]={k.shape[1]}: decode_step needs S = nb * block_size "
                     f"= {kmin.shape[1] * spec.block_size} (a whole-block cache).")
  ids, u = _select(q, kmin, kmax, kv_lengths, spec, scale, method, rank, bounds)
  out, lse, eps = decode_attend(q, k, v, ids, u, kv_lengths, spec=spec, scale=scale,
                                num_splits=num_splits, kernel=kernel)
  ids = ids[..., :min(spec.top_blocks, kmin.shape[1])]
  return (out, lse, eps, ids) if return_blocks else (out, lse, eps)


# Query blocks ranked per pass of `prefill_lists`: the [Hq, chunk, nk] ranking matrix of a
# pass holds at most this many float32 entries (1M keys: passes of 256 query blocks).
PREFILL_RANK_ENTRIES = 1 << 27


@functools.partial(jax.jit, static_argnames=("spec", "method", "chunk", "max_entries"))
def prefill_lists(q, k, spec, *, kmin=None, kmax=None, method="superblock", chunk=16,
                  max_entries=PREFILL_RANK_ENTRIES, q_offset=None, kv_lengths=None):
  """Key-block lists of the block-sparse prefill (causal, queries = the last T keys).

  Each query block is ranked against the key-block summaries by the bound of its centre
  query c = (min + max) / 2 over the block's queries: U_IJ = c.c_J + |c|.r_J (one
  matmul). This is a ranking heuristic, not a bound for every query of the block: the
  full box bound (adding r_q terms) overshoots by ~scale * sum_d r_qd |c_kd| and then
  ranks by key norm rather than alignment (measured: captured mass fell). Each query
  block takes its spec.top_blocks best blocks among those holding middle keys of its
  queries, plus the anchor blocks and the window band (`top_m` with `method` / `chunk`:
  the same lists by every method). Query blocks are ranked in passes of at most
  `max_entries` ranking entries (long prompts: the full matrix would not fit).
  q_offset [B] (default S - T): query row t sits at position q_offset + t; kv_lengths [B]
  (default S): keys at or beyond it are ignored (a cache with room to spare).
  Certificates come per query from the per-query bounds (see the benchmark's parity).
  Returns kblocks, kflags [B, Hq, nq, L] int32 (deduplicated; flag 1 = the block's middle
  keys are attended).
  """
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  p = spec.block_size
  nq, nk = -(-t // p), -(-s_len // p)
  off = jnp.broadcast_to(jnp.asarray(s_len - t if q_offset is None else q_offset,
                                     jnp.int32), (b,))[:, None, None]      # [B, 1, 1]
  n_keys = jnp.broadcast_to(jnp.asarray(s_len if kv_lengths is None else kv_lengths,
                                        jnp.int32), (b,))
  if kmin is None:
    summ = _blocks._build(k, n_keys, p)
    kmin, kmax = summ.kmin, summ.kmax
  n_keys = n_keys[:, None, None]
  qq = jnp.pad(q, ((0, 0), (0, nq * p - t), (0, 0), (0, 0))).reshape(b, nq, p, hq, d)
  q_ok = (jnp.arange(nq * p) < t).reshape(1, nq, p, 1, 1)
  qmin = jnp.min(jnp.where(q_ok, qq, jnp.inf), axis=2).astype(jnp.float32)
  qmax = jnp.max(jnp.where(q_ok, qq, -jnp.inf), axis=2).astype(jnp.float32)
  cq = 0.5 * (qmin + qmax)   # [B, nq, Hq, D]; the box over the block's queries is loose
  kmn, kmx = kmin.astype(jnp.float32), kmax.astype(jnp.float32)
  empty = ~(kmn <= kmx)
  ck = jnp.where(empty, 0.0, 0.5 * (kmn + kmx))
  rk = jnp.where(empty, 0.0, 0.5 * (kmx - kmn))
  qf = jnp.concatenate([cq, jnp.abs(cq)], -1).reshape(b, nq, hkv, hq // hkv, 2 * d)
  kf = jnp.concatenate([ck, rk], -1).astype(q.dtype)                    # [B, nk, K, 2D]
  m = min(spec.top_blocks, nk)
  n_anchor = -(-spec.anchor // p) if spec.anchor else 0
  n_band = (p + max(spec.window, 1) - 2) // p + 2 if spec.window else 0
  j = jnp.arange(nk)[None, :]

  def lists(qf_c, i0):
    """Lists of query blocks i0 .. i0 + nc - 1 (qf_c [B, nc, K, G, 2D])."""
    nc = qf_c.shape[1]
    u = jnp.einsum("bikgc,bjkc->bkgij", qf_c.astype(q.dtype), kf,
                   preferred_element_type=jnp.float32).reshape(b, hq, nc, nk)
    i = i0 + jnp.arange(nc)[:, None]                                      # [nc, 1]
    last = jnp.minimum(off + jnp.minimum(i * p + p, t) - 1, n_keys - 1)   # [B, nc, 1]
    first = off + i * p
    has_mid = (j * p <= last - spec.window) & (j * p + p - 1 >= spec.anchor)
    top_u, top = top_m(jnp.where(has_mid[:, None], u, NEG_INF), m, method, chunk)
    top = jnp.where(jnp.isneginf(top_u), -1, top)
    anchor = jnp.broadcast_to(jnp.arange(n_anchor), (b, nc, n_anchor))
    band = jnp.maximum(first - spec.window + 1, 0) // p + jnp.arange(n_band)
    band = jnp.where(band <= last // p, band, -1)                         # [B, nc, nbd]
    static = jnp.concatenate([anchor, band], -1)
    static = jnp.broadcast_to(static[:, None], (b, hq) + static.shape[1:]).astype(jnp.int32)
    ids = jnp.concatenate([static, top.astype(jnp.int32)], -1)          # [B, H, nc, L]
    flags = jnp.concatenate([jnp.zeros_like(static), jnp.ones_like(top)], -1)
    same = (ids[..., :, None] == ids[..., None, :]) & (ids[..., :, None] >= 0)
    n_ent = ids.shape[-1]
    earlier = jnp.tril(jnp.ones((n_ent, n_ent), bool), -1)
    dup = jnp.any(same & earlier, -1)
    flag = jnp.any(same & (flags[..., None, :] > 0), -1)
    ids = jnp.where(dup, -1, ids)
    return ids, jnp.where(ids >= 0, flag, False).astype(jnp.int32)

  nc = max(1, min(nq, max_entries // max(1, hq * nk)))
  if nc >= nq:
    return lists(qf, 0)
  n_pass = -(-nq // nc)
  qf = jnp.pad(qf, ((0, 0), (0, n_pass * nc - nq), (0, 0), (0, 0), (0, 0)))
  qf = qf.reshape(b, n_pass, nc, hkv, hq // hkv, 2 * d).transpose(1, 0, 2, 3, 4, 5)
  ids, flags = jax.lax.map(lambda x: lists(x[0], x[1] * nc), (qf, jnp.arange(n_pass)))
  # [n_pass, B, H, nc, L] -> [B, H, nq, L]
  fix = lambda x: x.transpose(1, 2, 0, 3, 4).reshape(b, hq, n_pass * nc, -1)[:, :, :nq]
  return fix(ids), fix(flags)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "kernel_kw"))
def prefill_attend(q, k, v, kblocks, kflags, *, spec, scale, kernel_kw=()):
  """The prefill kernel alone on given lists (kernel_kw: a tuple of (name, value) pairs
  for the Triton kernel, e.g. (("skip", "mask"), ("num_stages", 3))). Returns (o, lse)."""
  return _bs_api.block_prefill(q, k, v, kblocks, kflags, block_size=spec.block_size,
                               anchor=spec.anchor, window=spec.window, scale=scale,
                               implementation=KERNEL_IMPLEMENTATION, **dict(kernel_kw))


@functools.partial(jax.jit, static_argnames=("spec", "scale", "method", "kernel_kw"))
def prefill_step(q, k, v, *, spec, scale, method="superblock", kernel_kw=()):
  """Block-sparse causal prefill (the timed path): lists + kernel. Returns (o, lse)."""
  kblocks, kflags = prefill_lists(q, k, spec, method=method)
  return prefill_attend(q, k, v, kblocks, kflags, spec=spec, scale=scale,
                        kernel_kw=kernel_kw)
