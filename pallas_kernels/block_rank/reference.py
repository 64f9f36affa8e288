"""Block rank selection, reference (plain jnp): the spec of the two ops.

Both pick, per (batch b, K/V head k), the `top` entries with the highest group score in
`lax.top_k`'s order (score descending, ties to the lower index). The group score of an
entry is max over the first `heads` rows h of (x[h] - best[h]), each row taken relative
to its best entry (so a row with a small query norm still gets its best entries chosen);
rows >= heads are ignored.

superblock_select(sbmax [B, K, Gp, nsb], top, heads)
  best[b, k, h] = max over all superblocks of sbmax[b, k, h] (0 where that is -inf), for
  every row h < Gp; the entries are the superblocks. Returns (sbids [B, K, Mp] int32 with
  Mp = next_pow2(top): slot r < top holds the superblock of rank r (whatever its score,
  -inf included: lax.top_k's index), slots >= top (and >= nsb) hold -1; best [B, K, Gp]
  float32).
rank_select(sbids [B, K, C], score [B, K, Gp, nb], best [B, K, Gp], top, superblock X,
            heads, width=None)
  The entries are the blocks of the candidate superblocks (superblock j holds blocks
  jX .. jX + X - 1; ids -1 are no candidate); score is per-row (-inf: no middle key),
  best the given per-row offsets. Returns ids [B, K, width] int32 (width >= top; default
  top): slot r < top holds the block of rank r among the candidate blocks, or -1 where
  its group score is -inf; slots >= top hold -1. The kernel needs distinct candidates
  holding at least `top` blocks (the top `top` superblocks by their max, from
  superblock_select, hold the top `top` blocks); with fewer, its slots beyond them are
  unspecified (here -1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.util import next_pow2

NEG_INF = float("-inf")


def _group_score(x, best, heads):
  """x [B, K, Gp, N], best [B, K, Gp] -> max over rows h < heads of x - best, [B, K, N]."""
  return jnp.max(x[:, :, :heads] - best[:, :, :heads, None], axis=2)


def _pad(ids, width):
  return jnp.pad(ids, ((0, 0), (0, 0), (0, width - ids.shape[-1])), constant_values=-1)


def superblock_select(sbmax, *, top, heads):
  sbmax = sbmax.astype(jnp.float32)
  nsb = sbmax.shape[-1]
  best = jnp.max(sbmax, axis=-1)
  best = jnp.where(best == NEG_INF, 0.0, best)
  _, sbids = jax.lax.top_k(_group_score(sbmax, best, heads), min(top, nsb))
  return _pad(sbids.astype(jnp.int32), next_pow2(top)), best


def rank_select(sbids, score, best, *, top, superblock, heads, width=None):
  b, hkv, nb = score.shape[0], score.shape[1], score.shape[3]
  x = int(superblock)
  width = top if width is None else width
  if x < 1 or nb % x or width < top:
    raise ValueError(f"superblock={superblock}, width={width}, top={top}: expected a "
                     f"divisor of num_blocks={nb} and width >= top.")
  # candidate[b, k, j]: block j lies in a candidate superblock
  sb_of = jnp.arange(nb, dtype=jnp.int32) // x
  sb = sbids.astype(jnp.int32)[..., :, None]
  candidate = jnp.any((sb == sb_of) & (sb >= 0), axis=-2)
  r = _group_score(score.astype(jnp.float32), best.astype(jnp.float32), heads)
  r = jnp.where(candidate, r, NEG_INF)           # non-candidates rank last, as -inf
  v, ids = jax.lax.top_k(r, min(top, nb))
  ids = jnp.where(v == NEG_INF, -1, ids).astype(jnp.int32)
  return _pad(ids, width).reshape(b, hkv, width)
