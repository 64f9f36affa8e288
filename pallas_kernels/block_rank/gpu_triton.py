"""Block rank selection, GPU backend: `pallas_call` lowered through Triton, no sort.

superblock_select: one program per (batch b, K/V head h, run of `per_program`
  superblocks) ranks its superblocks against all of them by comparisons and scatters
  each superblock id to its rank's slot (ranks are distinct, so every slot < top is
  written once). rank_select: one program per candidate superblock ranks its blocks
  against every candidate block the same way. The rank order is lax.top_k's (value
  descending, ties to the lower index); the semantics are those of reference.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.util import next_pow2
from pallas_kernels.block_sparse.triton_common import NEG_INF, check_backend


def _ranks(r_own, i_own, r_all, i_all, ok_all):
  """Rank of each own entry among all entries in lax.top_k's order (value descending,
  ties to the lower index): the count of valid entries before it. Distinct ranks."""
  before = ok_all[None, :] & ((r_all[None, :] > r_own[:, None]) | (
      (r_all[None, :] == r_own[:, None]) & (i_all[None, :] < i_own[:, None])))
  return jnp.sum(before.astype(jnp.int32), axis=1)


def _fill_tail(ref, top):
  """Program 0 writes -1 to slots top .. of a 1-D int32 output ref."""
  w = ref.shape[0]
  if w > top:
    slot = jnp.arange(w, dtype=jnp.int32)
    plgpu_triton.store(ref.at[slot], jnp.full((w,), -1, jnp.int32),
                       mask=(slot >= top) & (pl.program_id(2) == 0))


def _superblock_kernel(sbmax_ref, sbids_ref, best_ref, *, per_program, top, heads):
  # Inputs
  # sbmax_ref [Gp, nsb]  float32 per-head max ranking score of each superblock
  # Outputs
  # sbids_ref [Mp]       int32 slot r <- the superblock of rank r (r < top), then -1
  # best_ref  [Gp]       float32 each head's best score, 0 where it has none (every
  #                      program writes the same values)
  gp, nsb = sbmax_ref.shape
  row = jnp.arange(gp, dtype=jnp.int32)
  x = sbmax_ref[...]
  best = jnp.max(x, axis=1)
  best = jnp.where(best == NEG_INF, 0.0, best)
  # group score of a superblock max: max over the first `heads` rows of (max - best)
  r_all = jnp.max(jnp.where((row < heads)[:, None], x - best[:, None], NEG_INF), axis=0)
  i_all = jnp.arange(nsb, dtype=jnp.int32)
  own = pl.program_id(2) * per_program + jnp.arange(per_program, dtype=jnp.int32)
  x_own = sbmax_ref[:, pl.ds(pl.multiple_of(pl.program_id(2) * per_program, per_program),
                             per_program)]
  r_own = jnp.max(jnp.where((row < heads)[:, None], x_own - best[:, None], NEG_INF), axis=0)
  rank = _ranks(r_own, own, r_all, i_all, i_all >= 0)
  plgpu_triton.store(sbids_ref.at[rank], own, mask=rank < top)
  _fill_tail(sbids_ref, top)
  best_ref[...] = best


def superblock_select(sbmax, *, top, heads, per_program=64, interpret=False, num_warps=4):
  """Triton superblock selection; semantics of reference.superblock_select.

  sbmax [B, K, Gp, nsb] float32 (nsb a power of two >= top). Returns (sbids [B, K, Mp]
  int32, Mp = next_pow2(top): the top superblocks in rank order, then -1 (`rank_select`
  takes it as is); best [B, K, Gp] float32). Each program ranks `per_program`
  superblocks against all of them.
  """
  check_backend(interpret)
  b, hkv, gp, nsb = sbmax.shape
  if nsb & (nsb - 1) or nsb < top:
    raise NotImplementedError(f"{nsb} superblocks, top={top}: expected a power of two "
                              "and at least `top`.")
  per = min(per_program, nsb)
  mp = next_pow2(top)
  kernel = functools.partial(_superblock_kernel, per_program=per, top=top, heads=heads)
  sbids, best = pl.pallas_call(
      kernel, grid=(b, hkv, nsb // per),
      in_specs=[pl.BlockSpec((None, None, gp, nsb), lambda b_, h, j: (b_, h, 0, 0))],
      out_specs=(pl.BlockSpec((None, None, mp), lambda b_, h, j: (b_, h, 0)),
                 pl.BlockSpec((None, None, gp), lambda b_, h, j: (b_, h, 0))),
      out_shape=(jax.ShapeDtypeStruct((b, hkv, mp), jnp.int32),
                 jax.ShapeDtypeStruct((b, hkv, gp), jnp.float32)),
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      name="condensate_superblock_select")(sbmax.astype(jnp.float32))
  return sbids, best


def _rank_kernel(sbids_ref, score_ref, best_ref, ids_ref, *, superblock, top, heads):
  # Inputs
  # sbids_ref [Cp]      int32 candidate superblocks of this (b, K/V head), -1 = padding
  # score_ref [Gp, nb]  float32 ranking scores (-inf: no middle key)
  # best_ref  [Gp]      float32 each head's best score (0 where it has none)
  # Outputs
  # ids_ref   [W]       int32 slot r <- the block of rank r (r < top); -1: -inf score;
  #                     slots top .. W - 1: -1 (written by program 0)
  x = superblock
  n = sbids_ref.shape[0] * x
  i = jnp.arange(n, dtype=jnp.int32)
  c_sb = sbids_ref[i // x]                       # gather: candidate superblock per entry
  c_idx = jnp.maximum(c_sb, 0) * x + i % x
  own_sb = sbids_ref[pl.program_id(2)]
  own_idx = jnp.maximum(own_sb, 0) * x + jnp.arange(x, dtype=jnp.int32)

  def group_score(idx):   # max over the first `heads` rows of score - best
    r = score_ref[0, idx] - best_ref[0]
    for h in range(1, heads):
      r = jnp.maximum(r, score_ref[h, idx] - best_ref[h])
    return r

  r_o = group_score(own_idx)
  # candidate ranks are distinct, so slots 0..top-1 are written once each
  rank = _ranks(r_o, own_idx, group_score(c_idx), c_idx, c_sb >= 0)
  val = jnp.where(r_o == NEG_INF, -1, own_idx)
  plgpu_triton.store(ids_ref.at[rank], val, mask=(rank < top) & (own_sb >= 0))
  _fill_tail(ids_ref, top)


def rank_select(sbids, score, best, *, top, superblock, heads, width=None, interpret=False,
                num_warps=4):
  """Triton rank selection; semantics of reference.rank_select.

  sbids [B, K, C] int32 candidate superblocks (-1 = none; distinct, holding at least
  `top` blocks); score [B, K, Gp, nb] float32 (-inf: no middle key); best [B, K, Gp]
  float32; superblock X a power of two dividing nb. One program per candidate superblock
  ranks its blocks against every candidate block (comparisons, no sort) and writes the
  block ids to their rank's slot. Returns ids [B, K, width] int32 (width >= top; default
  top): the top blocks in rank order (-1 where the score is -inf), then -1.
  """
  check_backend(interpret)
  b, hkv, n_c = sbids.shape
  gp, nb = score.shape[2], score.shape[3]
  x = int(superblock)
  width = top if width is None else width
  if x < 1 or x & (x - 1) or nb % x or n_c * x < top or width < top:
    raise NotImplementedError(f"superblock={superblock}, {n_c} candidates, top={top}, "
                              f"width={width}: expected a power of two dividing "
                              "num_blocks, at least `top` candidate blocks, width >= top.")
  cp, wp = next_pow2(n_c), next_pow2(width)
  sbids = jnp.pad(sbids.astype(jnp.int32), ((0, 0), (0, 0), (0, cp - n_c)),
                  constant_values=-1)
  kernel = functools.partial(_rank_kernel, superblock=x, top=top, heads=heads)
  ids = pl.pallas_call(
      kernel, grid=(b, hkv, n_c),
      in_specs=[pl.BlockSpec((None, None, cp), lambda b_, h, j: (b_, h, 0)),
                pl.BlockSpec((None, None, gp, nb), lambda b_, h, j: (b_, h, 0, 0)),
                pl.BlockSpec((None, None, gp), lambda b_, h, j: (b_, h, 0))],
      out_specs=pl.BlockSpec((None, None, wp), lambda b_, h, j: (b_, h, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, wp), jnp.int32),
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      name="condensate_rank_select")(sbids, score.astype(jnp.float32),
                                     best.astype(jnp.float32))
  return ids[..., :width] if wp != width else ids
