"""The timed decode step of selection="blocks" (DESIGN.md §4): summaries read once,
top-M blocks per GQA group, attention over anchor + window + those blocks, and the
certified eps from the unselected blocks' bounds.

The kernels come through each op's api in pallas_kernels (block_bounds, block_rank,
decode_step, block_sparse); where a kernel does not take the shapes (NotImplementedError)
the step falls back to XLA selection and the split-K path. Same sets as the XLA
specification (`impl/xla_blocks.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import numpy as np

from condensate_jax import finite, geometry, softmax, validation
from condensate_jax.impl import pallas_blocks
from condensate_jax.selection import bounds as bounds_lib
from condensate_jax.selection import order as order_lib
from condensate_jax.softmax import NEG_INF
from condensate_jax.spec import INT32_MAX
from pallas_kernels import util
from pallas_kernels.block_bounds import api as bounds_api
from pallas_kernels.block_rank import api as rank_api
from pallas_kernels.decode_step import api as step_api

def fast_bounds(q, kmin, kmax, scale, *, bounds=None, with_centre=False):
  """U [B, K, G, nb] float32 for a decode query q [B, Hq, D] from min/max summaries
  [B, nb, K, D]: the bound of `selection.bounds.block_bounds` (a rigorous upper bound on
  scale * q.k over each block's keys); with_centre also q.(min + max) / 2.

  bounds="triton": one Pallas kernel reading each summary row once (q+.max + q-.min as
  tensor-core matmuls); "xla": `selection.bounds.box_bounds` / `box_centres`; None:
  Triton on a GPU where the kernel takes the shapes, else XLA.
  """
  if bounds not in (None, "triton", "xla"):
    raise ValueError(f"bounds={bounds!r}: expected None, 'triton' or 'xla'.")
  g = q.shape[1] // kmin.shape[2]
  if bounds == "triton" or (bounds is None and jax.default_backend() == "gpu"):
    try:
      res = bounds_api.block_bounds(q, kmin, kmax, scale=scale,
                                    slack=bounds_lib.bound_slack(q.shape[-1]),
                                    with_centre=with_centre, implementation="triton",
                                    interpret=jax.default_backend() != "gpu")
      return tuple(x[:, :, :g] for x in res) if with_centre else res[:, :, :g]
    except NotImplementedError:
      if bounds == "triton":
        raise
  u = bounds_lib.box_bounds(q[:, None], kmin, kmax, scale)[:, :, :, 0]      # [B, K, G, nb]
  if not with_centre:
    return u
  return u, bounds_lib.box_centres(q[:, None], kmin, kmax, scale)[:, :, :, 0]



SELECT_METHODS = order_lib.TOP_M_METHODS + ("rank",)


def _interpret_triton():
  """The lean step's Triton kernels: compiled on a GPU, interpreted on a CPU (tests);
  elsewhere (TPU) they raise NotImplementedError and the step falls back to the
  superblock top-M and the split path (whose kernel has a Mosaic TPU version)."""
  return jax.default_backend() == "cpu"


def _rank_select(q, kv_lengths, kmin, kmax, spec, scale, rank, m):
  """decode_select by method="rank": three Pallas kernels, no sort and no XLA between
  them. The bounds kernel masks blocks without middle keys and emits the max of the
  ranking score per superblock; `block_rank.api.superblock_select` picks the top-M
  superblocks by the group score of those maxima (exactly the superblock max of
  `order.group_score`: subtracting a head's best is monotone); `block_rank.api.rank_select`
  ranks the blocks of those superblocks by comparisons and writes each winner to its
  rank's slot. The same ids, in the same order, as `top_m` (an exact top-M by the
  superblock argument of `top_m`). Returns ids [B, K, next_pow2(M + 1)] (-1 beyond M,
  the width `decode_step.api.decode_step` takes as is) and u with the kernel's Gp rows."""
  hq = q.shape[2]
  nb, hkv = kmin.shape[1], kmin.shape[2]
  g = hq // hkv
  x = min(order_lib.superblock_size(nb, m), nb & -nb)
  interpret = _interpret_triton()
  res = bounds_api.block_bounds(
      q[:, 0], kmin, kmax, scale=scale, slack=bounds_lib.bound_slack(q.shape[-1]),
      with_centre=rank == "centre", kv_lengths=kv_lengths, block_size=spec.block_size,
      anchor=spec.anchor, window=spec.window, superblock=x, implementation="triton",
      interpret=interpret)
  u, score, sbmax = res if rank == "centre" else (res[0], res[0], res[1])
  # a non-finite q or summary entry gives a NaN / +inf score: ranked as a block without
  # middle keys, so the rank kernels see no NaN and write valid ids, while its bound
  # (NaN) keeps eps NaN
  u, score, sbmax = _nan_if_posinf(u), _rankable(score), _rankable(sbmax)
  n_sb = nb // x
  sbids, best = rank_api.superblock_select(sbmax, top=min(m, n_sb), heads=g,
                                           implementation="triton", interpret=interpret)
  width = util.next_pow2(m + 1)
  ids = rank_api.rank_select(sbids, score, best, top=m, superblock=x, heads=g,
                             width=width, implementation="triton", interpret=interpret)
  return ids, u


def _rankable(score):
  """-inf (no middle key) where a ranking score is NaN or +inf (non-finite summaries)."""
  return jnp.where(jnp.isnan(score) | jnp.isposinf(score), NEG_INF, score)


def _nan_if_posinf(u):
  """NaN where a bound is +inf: eps = sigmoid(log delta - lse) would read 1, a clean
  number, where the block holds a key of infinite score. (A bound that overflows from
  finite summaries, keys or queries near float32's limit, is reported NaN too: the step
  cannot tell the two apart without scanning the summaries.)"""
  return jnp.where(jnp.isposinf(u), jnp.nan, u)


def _select(q, kmin, kmax, kv_lengths, spec, scale, method, rank, bounds):
  """decode_select's (ids, u); u may carry padding rows beyond G (the rank path's)."""
  rank = spec.block_rank if rank is None else rank
  if rank not in ("bound", "centre"):
    raise ValueError(f"rank={rank!r}: expected 'bound' or 'centre'.")
  if method not in SELECT_METHODS:
    raise ValueError(f"method={method!r}: expected one of {list(SELECT_METHODS)}.")
  nb = kmin.shape[1]
  _, _, n_mid = geometry.decode_ranges(kv_lengths, spec, nb, nb * spec.block_size)
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
  u = _nan_if_posinf(u)
  top_r, ids = order_lib.top_m(
      order_lib.group_score(_rankable(r), head_axis=2, block_axis=3), m, method,
      order_lib.superblock_size(nb, m) if method == "superblock" else 256)
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
  return softmax.log_delta_to_eps(jax.nn.logsumexp(terms, axis=-1), lse)


ATTEND_KERNELS = ("split", "fused")


@functools.partial(jax.jit, static_argnames=("spec", "scale", "num_splits", "kernel"))
def decode_attend(q, k, v, ids, u, kv_lengths, *, spec, scale, num_splits=None,
                  kernel="split"):
  """Kernel half of `decode_step`: attention over the anchor, the window and the blocks
  `ids`, and eps from the unselected blocks' bounds `u` ([B, K, G or more, nb]).

  kernel="split": the split-K kernel over the blocks (num_splits programs per K/V head;
  None = one block per program) plus one program for the anchor and window, then XLA
  merges the splits and computes eps. kernel="fused": `decode_step.api.decode_step`, two
  Pallas kernels and nothing else (one program per block plus the anchor/window one,
  each also summing a share of eps; a merge kernel). The same sets either way."""
  if kernel not in ATTEND_KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected one of {list(ATTEND_KERNELS)}.")
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  m = min(spec.top_blocks, u.shape[-1])     # ids may be wider (-1 padded, rank path)
  if kernel == "fused":
    try:
      return step_api.decode_step(
          q, k, v, ids, u, kv_lengths, block_size=spec.block_size, scale=scale,
          anchor=min(spec.anchor, s_len), window=min(spec.window, s_len), top=m,
          implementation="triton", interpret=_interpret_triton())
    except NotImplementedError:
      pass
  u, ids = u[:, :, :g], ids[..., :m]
  lo, hi, n_mid = geometry.decode_ranges(kv_lengths, spec, u.shape[-1], s_len)
  ns = max(1, min(num_splits or m, m))
  bps = -(-m // ns)
  # split 0 gets no blocks: it reads only the anchor and window ranges, in parallel with
  # the block splits (not before them on the same program)
  ids_p = jnp.pad(ids, ((0, 0), (0, 0), (bps, ns * bps - m)), constant_values=-1)
  ranges = geometry.static_ranges(lo, hi, spec, s_len)
  o, lse = pallas_blocks.decode_parts(q, k, v, ids_p.reshape(b, hkv, 1, ns + 1, bps),
                                     ranges, spec, scale)
  o, lse = softmax.combine_splits(o, lse)                                             # [B,K,G,1,(D)]
  eps = decode_eps(ids, u, n_mid[:, 0], lse[..., 0])
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, 1, hq, d).astype(q.dtype)
  return out, lse.reshape(b, hq), eps.reshape(b, hq)


def check_decode_inputs(q, k, v, kmin, kmax, kv_lengths, spec, scale, *, method="rank",
                        rank=None, bounds=None, kernel="fused", num_splits=None):
  """Validates `decode_step`'s inputs (ValueError naming the argument); returns
  (kv_lengths int32 [B], scale). Values are checked where concrete (outside jit)."""
  validation.check_fast_spec(spec, "decode_step")
  validation.check_decode_qkv(q, k, v, "decode_step")
  b, _, _, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  for name, x in (("kmin", kmin), ("kmax", kmax)):
    validation.check_keys(x, name)
    if x.shape[0] != b or x.shape[2:] != (hkv, d):
      raise ValueError(f"{name}.shape={tuple(x.shape)}: expected [B, nb, Hkv, D] = "
                       f"[{b}, nb, {hkv}, {d}] (the summaries of k).")
    if x.dtype != k.dtype:
      raise ValueError(f"{name}.dtype={x.dtype.name}: expected k's dtype {k.dtype.name}.")
  if kmin.shape != kmax.shape:
    raise ValueError(f"kmin.shape={tuple(kmin.shape)}, kmax.shape={tuple(kmax.shape)}: "
                     "expected equal shapes.")
  if s_len != kmin.shape[1] * spec.block_size:
    raise ValueError(f"k.shape[1]={s_len}: decode_step needs S = nb * block_size "
                     f"= {kmin.shape[1] * spec.block_size} (a whole-block cache).")
  kv_lengths = validation.check_int_array("kv_lengths", kv_lengths, (b,), 1, s_len)
  scale = validation.check_scale(scale, d, optional=False)
  if method not in SELECT_METHODS:
    raise ValueError(f"method={method!r}: expected one of {list(SELECT_METHODS)}.")
  if rank not in (None, "bound", "centre"):
    raise ValueError(f"rank={rank!r}: expected None, 'bound' or 'centre'.")
  if bounds not in (None, "triton", "xla"):
    raise ValueError(f"bounds={bounds!r}: expected None, 'triton' or 'xla'.")
  if kernel not in ATTEND_KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected one of {list(ATTEND_KERNELS)}.")
  if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(
      num_splits, (int, np.integer)) or not 1 <= num_splits <= INT32_MAX):
    raise ValueError(f"num_splits={num_splits!r}: expected None or an int >= 1.")
  if validation.is_concrete(kmin) and validation.is_concrete(kmax) and validation.is_concrete(
      kv_lengths):
    swapped = int(_swapped_entries(kmin, kmax, kv_lengths, spec.block_size))
    if swapped:
      raise ValueError(f"kmin, kmax: {swapped} entries of blocks holding keys have kmin > "
                       "kmax: not the summaries of a cache (swapped?).")
  return kv_lengths, scale


@functools.partial(jax.jit, static_argnames=("p",))
def _swapped_entries(kmin, kmax, kv_lengths, p):
  used = (jnp.arange(kmin.shape[1]) * p < kv_lengths[:, None])[:, :, None, None]
  return jnp.sum(used & (kmin > kmax))


def decode_step(q, k, v, kmin, kmax, kv_lengths, *, spec, scale, num_splits=None,
                method="rank", rank=None, bounds=None, return_blocks=False,
                kernel="fused"):
  """One decode step of selection="blocks" (the timed path).

  q [B, 1, Hq, D]; k, v [B, S, Hkv, D]; kmin, kmax [B, nb, Hkv, D] precomputed summaries
  (kept beside the cache, updated by `selection.summaries.append_summaries`); kv_lengths [B].
  Reads the summaries once (`fast_bounds`), selects spec.top_blocks blocks per GQA group
  by `order.group_score` (exact top-M by `method`, the same blocks by every method;
  `rank`: see `decode_select`), attends them plus anchor and window (`decode_attend`
  with `kernel`). The defaults method="rank", kernel="fused" are the leanest: five
  Pallas kernels per step and nothing between them (bounds, superblock and block
  ranking, attention with eps shares, merge); where a kernel does not take the shapes
  (e.g. fewer than 16 blocks) the step falls back to "superblock" / "split".
  Returns out [B, 1, Hq, D], lse [B, Hq] and the certified eps [B, Hq] (from the
  unselected blocks' U_b); with return_blocks also the block ids [B, Hkv, M].
  Inputs are validated first (`check_decode_inputs`). Non-finite values: a head whose q
  row is not finite, whose bound over a block is NaN or +inf (a non-finite summary entry
  of a block with middle keys: ranked as a block without any, its bound kept in eps), or
  that attends a non-finite k or v row (anchor, window, chosen blocks: the kernels keep
  a NaN sum NaN) gets NaN out, lse and eps. The step reads k and v only in the blocks it
  attends and trusts the summaries to be those of k: a non-finite v elsewhere goes
  unseen (condensate_attention checks every key).
  """
  kv_lengths, scale = check_decode_inputs(q, k, v, kmin, kmax, kv_lengths, spec, scale,
                                          method=method, rank=rank, bounds=bounds,
                                          kernel=kernel, num_splits=num_splits)
  return _decode_step(q, k, v, kmin, kmax, kv_lengths, spec=spec, scale=scale,
                      num_splits=num_splits, method=method, rank=rank, bounds=bounds,
                      return_blocks=bool(return_blocks), kernel=kernel)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "num_splits", "method",
                                             "rank", "bounds", "return_blocks", "kernel"))
def _decode_step(q, k, v, kmin, kmax, kv_lengths, *, spec, scale, num_splits, method,
                 rank, bounds, return_blocks, kernel):
  ids, u = _select(q, kmin, kmax, kv_lengths, spec, scale, method, rank, bounds)
  out, lse, eps = decode_attend(q, k, v, ids, u, kv_lengths, spec=spec, scale=scale,
                                num_splits=num_splits, kernel=kernel)
  # Non-finite values travel on their own (module docstring): a NaN / +inf bound (a
  # non-finite q or summary entry) is never selected and keeps eps NaN; a non-finite k
  # or v row the kernels attend keeps out and lse NaN. One check makes the three agree.
  out, lse, eps = finite.poison_decode(q, out, lse, eps)
  ids = ids[..., :min(spec.top_blocks, kmin.shape[1])]
  return (out, lse, eps, ids) if return_blocks else (out, lse, eps)
