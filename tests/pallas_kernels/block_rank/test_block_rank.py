"""Block rank kernels (pallas_kernels/block_rank) against their jnp reference: integer
outputs, so EXACT equality, with heavy ties (integer scores; high=2: nearly all tied),
-inf entries and a (batch, K/V head) with no finite score at all.

Parameterised over tests.conftest.kernels("triton") (interpreted on CPU, compiled on a
GPU). Pallas' generic interpret mode starts int32 outputs at INT32_MIN, so a slot the
kernel never writes fails the exact comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_rank import api, reference
from tests.conftest import PLATFORM, kernels

TRITON = kernels("triton")
B, HKV, GP = 2, 3, 16


def _scores(seed, nb, high):
  rng = np.random.default_rng(seed)
  score = rng.integers(0, high, (B, HKV, GP, nb)).astype(np.float32)
  score[rng.random(score.shape) < 0.3] = -np.inf
  score[1, 2] = -np.inf                                      # a row with no middle key
  return jnp.asarray(score)


def _top_k_spec(x, best, heads, m):
  """The spec in NumPy: entries by group score descending, ties to the lower index."""
  r = np.max(np.asarray(x)[:, :, :heads] - np.asarray(best)[:, :, :heads, None], axis=2)
  order = np.stack([np.lexsort((np.arange(r.shape[-1]), -r[i, j]))
                    for i in range(B) for j in range(HKV)]).reshape(B, HKV, -1)
  return order[..., :m], np.take_along_axis(r, order, -1)[..., :m]


def test_reference_is_the_spec():
  """The reference (lax.top_k) against a NumPy lexsort, on the tied data of the tests."""
  score = _scores(0, 64, 2)
  best = jnp.where(jnp.isneginf(jnp.max(score, -1)), 0.0, jnp.max(score, -1))
  sb_max = jnp.max(score.reshape(B, HKV, GP, 8, 8), -1)
  sbids, best_r = reference.superblock_select(sb_max, top=5, heads=4)
  np.testing.assert_array_equal(np.asarray(sbids)[..., :5],
                                _top_k_spec(sb_max, best_r, 4, 5)[0])
  assert np.all(np.asarray(sbids)[..., 5:] == -1) and sbids.shape == (B, HKV, 8)
  ids = reference.rank_select(jnp.broadcast_to(jnp.arange(8), (B, HKV, 8)), score, best,
                              top=6, superblock=8, heads=4, width=8)
  order, value = _top_k_spec(score, best, 4, 6)
  np.testing.assert_array_equal(np.asarray(ids)[..., :6], np.where(np.isneginf(value), -1,
                                                                   order))
  assert np.all(np.asarray(ids)[..., 6:] == -1)


@pytest.mark.parametrize("impl,interpret", TRITON)
@pytest.mark.parametrize("g,nb,m,x,high", [(4, 256, 8, 8, 3), (1, 128, 5, 16, 30),
                                           (2, 64, 16, 8, 1000), (4, 512, 3, 32, 2)])
def test_matches_reference(impl, interpret, g, nb, m, x, high):
  """superblock_select, then rank_select on its (rank-ordered, -1 padded) superblocks,
  plain and wide (width next_pow2(m + 1), as the fused decode step takes it), and
  rank_select on index-ordered candidates."""
  score = _scores(g * nb + m, nb, high)
  run = dict(implementation=impl, interpret=interpret)
  best = jnp.where(jnp.isneginf(jnp.max(score, -1)), 0.0, jnp.max(score, -1))
  n_sb = nb // x
  if n_sb > m:
    sb_max = jnp.max(score.reshape(B, HKV, GP, n_sb, x), -1)
    sb_k, best_k = api.superblock_select(sb_max, top=m, heads=g, per_program=4, **run)
    sb_r, best_r = reference.superblock_select(sb_max, top=m, heads=g)
    np.testing.assert_array_equal(np.asarray(sb_k), np.asarray(sb_r))
    np.testing.assert_array_equal(np.asarray(best_k), np.asarray(best_r))
    np.testing.assert_array_equal(np.asarray(best_k), np.asarray(best))
    width = 1 << m.bit_length()                             # next_pow2(m + 1)
    got = api.rank_select(sb_k, score, best_k, top=m, superblock=x, heads=g, width=width,
                          **run)
    want = reference.rank_select(sb_r, score, best_r, top=m, superblock=x, heads=g,
                                 width=width)
    assert got.shape == (B, HKV, width) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    sbids = jnp.sort(jax.lax.top_k(jnp.max(sb_max[:, :, :g] - best[:, :, :g, None], 2),
                                   m)[1], -1)
  else:
    sbids = jnp.broadcast_to(jnp.arange(n_sb), (B, HKV, n_sb))
  got = api.rank_select(sbids, score, best, top=m, superblock=x, heads=g, **run)
  want = reference.rank_select(sbids, score, best, top=m, superblock=x, heads=g)
  assert got.shape == (B, HKV, m) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.all(np.asarray(got)[1, 2] == -1)                # no finite score: all -1


def test_dispatch_and_validation():
  sb_max = jnp.zeros((1, 1, 16, 6), jnp.float32)            # 6: not a power of two
  expected = {"gpu": "triton", "cpu": "triton"}.get(PLATFORM, "reference")
  assert api.default_implementations()[0] == expected
  assert set(api.IMPLEMENTATIONS) == {"reference", "triton"}
  with pytest.raises(ValueError, match=r"implementation='cuda'.*'reference', 'triton'"):
    api.superblock_select(sb_max, top=2, heads=1, implementation="cuda")
  with pytest.raises(ValueError, match="interpret=0"):
    api.rank_select(jnp.zeros((1, 1, 1), jnp.int32), sb_max, sb_max[..., 0], top=2,
                    superblock=2, heads=1, interpret=0)
  with pytest.raises(NotImplementedError, match="6 superblocks"):
    api.superblock_select(sb_max, top=2, heads=1, implementation="triton", interpret=True)
  sbids, best = api.superblock_select(sb_max, top=3, heads=1)       # falls back
  np.testing.assert_array_equal(np.asarray(sbids), [[[0, 1, 2, -1]]])
  # 6 blocks in 2 superblocks of 3 (not a power of two): the reference takes it
  sbids = jnp.array([[[1, 0]]], jnp.int32)
  with pytest.raises(NotImplementedError, match="superblock=3"):
    api.rank_select(sbids, sb_max, best, top=3, superblock=3, heads=1,
                    implementation="triton", interpret=True)
  ids = api.rank_select(sbids, sb_max, best, top=3, superblock=3, heads=1)
  np.testing.assert_array_equal(np.asarray(ids), [[[0, 1, 2]]])
  with pytest.raises(ValueError, match="width=2"):
    api.rank_select(sbids, sb_max, best, top=3, superblock=3, heads=1, width=2,
                    implementation="reference")
  if PLATFORM == "cpu":
    with pytest.raises(NotImplementedError, match="needs a GPU"):
      api.superblock_select(jnp.zeros((1, 1, 16, 8)), top=2, heads=1,
                            implementation="triton", interpret=False)
