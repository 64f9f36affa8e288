"""Pieces of the timed fast path: bound property of `fast_bounds`, exact chunked top-M,
the whole-block cache requirement of `decode_step`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax import blocks, blocks_pallas


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fast_bounds_bound_every_score(dtype):
  rng = np.random.default_rng(0)
  b, s, hq, hkv, d, p = 2, 96, 6, 2, 64, 16
  q = jnp.asarray(rng.standard_normal((b, hq, d)) * 3, dtype)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), dtype)
  summ = blocks.build_summaries(k, p)
  u = np.asarray(blocks_pallas.fast_bounds(q, summ.kmin, summ.kmax, 0.125))  # [B,K,nb,G]
  scores = np.asarray(jnp.einsum("bkgd,bskd->bkgs", q.reshape(b, hkv, hq // hkv, d), k,
                                 preferred_element_type=jnp.float32) * 0.125)
  block_max = scores.reshape(b, hkv, hq // hkv, s // p, p).max(-1).transpose(0, 1, 3, 2)
  assert np.all(u >= block_max)
  # and the same bound as the centre/radius form of the XLA specification (to slack)
  u_spec = np.asarray(blocks.block_bounds(q[:, None], summ, 0.125))[:, :, :, 0]
  np.testing.assert_allclose(u, u_spec.transpose(0, 1, 3, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,m", [((3, 1000), 16), ((2, 4, 700), 5), ((1, 300), 40)])
def test_chunked_top_m_equals_top_k(shape, m):
  # integer-valued floats: many ties, which must still go to the lower index
  x = jnp.asarray(np.random.default_rng(1).integers(0, 30, shape), jnp.float32)
  v1, i1 = jax.lax.top_k(x, m)
  v2, i2 = blocks_pallas.top_m(x, m, "chunked", chunk=128)
  np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
  np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
  with pytest.raises(ValueError, match="method='heap'"):
    blocks_pallas.top_m(x, m, "heap", chunk=128)


def test_decode_step_needs_whole_blocks():
  q = jnp.zeros((1, 1, 2, 16))
  k = jnp.zeros((1, 40, 1, 16))
  spec = cj.CondensateSpec(selection="blocks", block_size=16, top_blocks=1)
  summ = blocks.build_summaries(k, 16)
  with pytest.raises(ValueError, match="k.shape\\[1\\]=40"):
    blocks_pallas.decode_step(q, k, k, summ.kmin, summ.kmax, jnp.array([40]), spec=spec,
                              scale=0.25)


def test_decode_select_centre_rank():
  rng = np.random.default_rng(2)
  b, s, hq, hkv, d, p, m = 2, 128, 4, 2, 16, 16, 3
  q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  spec = cj.CondensateSpec(anchor=1, window=16, selection="blocks", block_size=p,
                           top_blocks=m)
  summ = blocks.build_summaries(k, p)
  ids, _ = blocks_pallas.decode_select(q, summ.kmin, summ.kmax, jnp.array([s, s]),
                                       spec=spec, scale=0.25, rank="centre")
  c = (np.asarray(summ.kmin) + np.asarray(summ.kmax)) / 2                 # [B, nb, K, D]
  qn = np.asarray(q)[:, 0].reshape(b, hkv, hq // hkv, d) * 0.25
  cen = np.einsum("bkgd,bnkd->bkgn", qn, c)
  cen[..., s // p - 1] = -np.inf          # the last block holds only window keys
  rel = (cen - cen.max(-1, keepdims=True)).max(2)                          # [B, K, nb]
  want = np.argsort(-rel, axis=-1, kind="stable")[..., :m]
  np.testing.assert_array_equal(np.sort(np.asarray(ids), -1), np.sort(want, -1))
  with pytest.raises(ValueError, match="rank='mean'"):
    blocks_pallas.decode_select(q, summ.kmin, summ.kmax, jnp.array([s, s]), spec=spec,
                                scale=0.25, rank="mean")
