"""BlockSummaries: build against brute force, append == rebuild, validation."""

import jax.numpy as jnp
import numpy as np
import pytest

from condensate_jax.selection import summaries as blocks


def _brute(k, p, lengths):
  k = np.asarray(k, np.float64)
  b, s, hkv, d = k.shape
  nb = -(-s // p)
  kmin = np.full((b, nb, hkv, d), np.inf)
  kmax = np.full((b, nb, hkv, d), -np.inf)
  for bi in range(b):
    for j in range(lengths[bi]):
      kmin[bi, j // p] = np.minimum(kmin[bi, j // p], k[bi, j])
      kmax[bi, j // p] = np.maximum(kmax[bi, j // p], k[bi, j])
  return kmin, kmax


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_build_matches_brute_force(dtype):
  rng = np.random.default_rng(1)
  k = jnp.asarray(rng.standard_normal((3, 37, 2, 8)), dtype)
  lengths = np.array([37, 20, 0])
  summ = blocks.build_summaries(k, 8, lengths)
  kmin, kmax = _brute(k.astype(jnp.float32), 8, lengths)
  assert summ.kmin.dtype == dtype and summ.kmin.shape == (3, 5, 2, 8)
  np.testing.assert_array_equal(np.asarray(summ.kmin, np.float64), kmin)
  np.testing.assert_array_equal(np.asarray(summ.kmax, np.float64), kmax)


def test_append_equals_rebuild_ragged():
  rng = np.random.default_rng(2)
  b, cap, hkv, d, p = 2, 50, 3, 4, 8
  k = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
  lengths = np.array([13, 5])
  summ = blocks.build_summaries(jnp.asarray(k), p, lengths)   # prefill
  for step in range(4):                                       # decode appends, ragged
    n_new = 3 if step % 2 else 1
    pos = lengths[:, None] + np.arange(n_new)
    if step == 1:
      pos[1, -1] = -1                                         # a padding slot, skipped
    k_new = rng.standard_normal((b, n_new, hkv, d)).astype(np.float32)
    for bi in range(b):
      for i in range(n_new):
        if pos[bi, i] >= 0:
          k[bi, pos[bi, i]] = k_new[bi, i]
    summ = blocks.append_summaries(summ, jnp.asarray(k_new), jnp.asarray(pos))
    lengths = lengths + np.array([n_new, n_new - (1 if step == 1 else 0)])
    rebuilt = blocks.build_summaries(jnp.asarray(k), p, lengths)
    np.testing.assert_array_equal(np.asarray(summ.kmin), np.asarray(rebuilt.kmin))
    np.testing.assert_array_equal(np.asarray(summ.kmax), np.asarray(rebuilt.kmax))


def test_empty_then_append_equals_build():
  rng = np.random.default_rng(3)
  k = jnp.asarray(rng.standard_normal((1, 20, 1, 4)), jnp.float32)
  summ = blocks.empty_summaries(1, 20, 1, 4, 4)
  summ = blocks.append_summaries(summ, k[:, :11], jnp.arange(11)[None])
  built = blocks.build_summaries(k, 4, [11])
  np.testing.assert_array_equal(np.asarray(summ.kmin), np.asarray(built.kmin))
  np.testing.assert_array_equal(np.asarray(summ.kmax), np.asarray(built.kmax))


def test_validation_errors():
  k = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match="block_size=0"):
    blocks.build_summaries(k, 0)
  with pytest.raises(ValueError, match="kv_lengths"):
    blocks.build_summaries(k, 4, [9])
  with pytest.raises(ValueError, match=r"k: expected an array \[B, S, Hkv, D\]"):
    blocks.build_summaries(jnp.zeros((8, 4)), 4)
  summ = blocks.build_summaries(k, 4)
  with pytest.raises(ValueError, match="positions has values"):
    blocks.append_summaries(summ, jnp.zeros((1, 1, 1, 4)), jnp.array([[8]]))
  with pytest.raises(ValueError, match="k_new.shape"):
    blocks.append_summaries(summ, jnp.zeros((1, 1, 2, 4)), jnp.array([[3]]))
