"""Pieces of the timed fast path: bound property of `fast_bounds`, exact chunked top-M,
the whole-block cache requirement of `decode_step`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax import fast
from condensate_jax.selection import bounds as bounds_lib
from condensate_jax.selection import order, summaries
from pallas_kernels import util
from pallas_kernels.block_rank import api as rank_api


@pytest.mark.parametrize("bounds", ["xla", "triton"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fast_bounds_bound_every_score(dtype, bounds):
  rng = np.random.default_rng(0)
  b, s, hq, hkv, d, p = 2, 512, 6, 2, 64, 16
  q = jnp.asarray(rng.standard_normal((b, hq, d)) * 3, dtype)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), dtype)
  summ = summaries.build_summaries(k, p)
  u, cen = fast.fast_bounds(q, summ.kmin, summ.kmax, 0.125, bounds=bounds,
                                     with_centre=True)
  u, cen = np.asarray(u), np.asarray(cen)                                 # [B, K, G, nb]
  assert u.shape == (b, hkv, hq // hkv, s // p)
  scores = np.asarray(jnp.einsum("bkgd,bskd->bkgs", q.reshape(b, hkv, hq // hkv, d), k,
                                 preferred_element_type=jnp.float32,
                                 precision="highest") * 0.125)
  block_max = scores.reshape(b, hkv, hq // hkv, s // p, p).max(-1)
  assert np.all(u >= block_max)
  # the same bound as the centre/radius form of the XLA specification (to slack)
  u_spec = np.asarray(bounds_lib.block_bounds(q[:, None], summ, 0.125))[:, :, :, 0]
  np.testing.assert_allclose(u, u_spec, rtol=1e-4, atol=1e-4)
  # centre score q.(min + max) / 2
  c = (np.asarray(summ.kmin, np.float64) + np.asarray(summ.kmax, np.float64)) / 2
  qn = np.asarray(q, np.float64).reshape(b, hkv, hq // hkv, d) * 0.125
  np.testing.assert_allclose(cen, np.einsum("bkgd,bnkd->bkgn", qn, c), rtol=1e-4,
                             atol=1e-4)


def test_fast_bounds_tight_box_exceeds_every_score():
  # every key of a block equal: the box is a point and U_b must still be >= the score
  # computed in float32 (the rounding slack, not the box, makes the bound hold)
  rng = np.random.default_rng(3)
  b, s, hkv, d, p = 1, 256, 1, 128, 16
  q = jnp.asarray(rng.standard_normal((b, 4, d)) * 10, jnp.bfloat16)
  row = rng.standard_normal((s // p, 1, hkv, d)) * 10
  k = jnp.asarray(np.repeat(row, p, axis=1).reshape(b, s, hkv, d), jnp.bfloat16)
  summ = summaries.build_summaries(k, p)
  for bounds in ("xla", "triton"):
    u = np.asarray(fast.fast_bounds(q, summ.kmin, summ.kmax, 0.088, bounds=bounds))
    sc = np.asarray(jnp.einsum("bgd,bsd->bgs", q, k[:, :, 0],
                               preferred_element_type=jnp.float32)) * np.float32(0.088)
    assert np.all(u[:, 0] >= sc.reshape(b, 4, s // p, p).max(-1)), bounds


def test_fast_bounds_rejects_unknown_kernel():
  z = jnp.zeros((1, 16, 1, 16))
  with pytest.raises(ValueError, match="bounds='cuda'"):
    fast.fast_bounds(jnp.zeros((1, 2, 16)), z, z, 0.25, bounds="cuda")


@pytest.mark.parametrize("method", ["chunked", "superblock"])
@pytest.mark.parametrize("shape,m,high", [((3, 1000), 16, 30), ((2, 4, 700), 5, 30),
                                          ((1, 300), 40, 30), ((2, 2048), 16, 3),
                                          ((4, 1500), 7, 1000)])
def test_top_m_methods_equal_top_k(shape, m, high, method):
  # integer-valued floats: many ties (high=3: nearly all), which must still go to the
  # lower index; -inf entries too (blocks without middle keys)
  rng = np.random.default_rng(1)
  x = rng.integers(0, high, shape).astype(np.float32)
  x[rng.random(shape) < 0.3] = -np.inf
  x = jnp.asarray(x)
  v1, i1 = jax.lax.top_k(x, m)
  v2, i2 = order.top_m(x, m, method, chunk=64)
  np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
  np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))


def test_top_m_all_neg_inf_and_bad_method():
  x = jnp.full((2, 1024), -jnp.inf)
  v, i = order.top_m(x, 8, "superblock", chunk=16)
  np.testing.assert_array_equal(np.asarray(i), np.tile(np.arange(8), (2, 1)))
  assert np.all(np.isneginf(np.asarray(v)))
  with pytest.raises(ValueError, match="method='heap'"):
    order.top_m(x, 8, "heap", chunk=128)


def test_decode_step_needs_whole_blocks():
  q = jnp.zeros((1, 1, 2, 16))
  k = jnp.zeros((1, 40, 1, 16))
  spec = cj.CondensateSpec(selection="blocks", block_size=16, top_blocks=1)
  summ = summaries.build_summaries(k, 16)
  with pytest.raises(ValueError, match="k.shape\\[1\\]=40"):
    fast.decode_step(q, k, k, summ.kmin, summ.kmax, jnp.array([40]), spec=spec,
                              scale=0.25)


def test_decode_select_centre_rank():
  rng = np.random.default_rng(2)
  b, s, hq, hkv, d, p, m = 2, 128, 4, 2, 16, 16, 3
  q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  spec = cj.CondensateSpec(anchor=1, window=16, selection="blocks", block_size=p,
                           top_blocks=m)
  summ = summaries.build_summaries(k, p)
  ids, _ = fast.decode_select(q, summ.kmin, summ.kmax, jnp.array([s, s]),
                                       spec=spec, scale=0.25, rank="centre")
  c = (np.asarray(summ.kmin) + np.asarray(summ.kmax)) / 2                 # [B, nb, K, D]
  qn = np.asarray(q)[:, 0].reshape(b, hkv, hq // hkv, d) * 0.25
  cen = np.einsum("bkgd,bnkd->bkgn", qn, c)
  cen[..., s // p - 1] = -np.inf          # the last block holds only window keys
  rel = (cen - cen.max(-1, keepdims=True)).max(2)                          # [B, K, nb]
  want = np.argsort(-rel, axis=-1, kind="stable")[..., :m]
  np.testing.assert_array_equal(np.sort(np.asarray(ids), -1), np.sort(want, -1))
  with pytest.raises(ValueError, match="rank='mean'"):
    fast.decode_select(q, summ.kmin, summ.kmax, jnp.array([s, s]), spec=spec,
                                scale=0.25, rank="mean")


def test_prefill_lists_same_by_every_top_m_method():
  rng = np.random.default_rng(4)
  t, h, d, p = 512, 2, 16, 16
  # integer-valued q and k: every ranking value is exact in float32 whatever the matmul's
  # summation order (so passes of different shapes must agree), with many ties
  q = jnp.asarray(rng.integers(-3, 4, (1, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.integers(-2, 3, (1, t, h, d)), jnp.float32)
  spec = cj.CondensateSpec(anchor=4, window=16, selection="blocks", block_size=p,
                           top_blocks=3)
  ref = fast.prefill_lists(q, k, spec, method="top_k")
  for method in ("superblock", "chunked"):
    got = fast.prefill_lists(q, k, spec, method=method, chunk=4)
    for a, b in zip(ref, got):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=method)
  # ranked in passes of 5 query blocks (the last pass padded): the same lists
  got = fast.prefill_lists(q, k, spec, max_entries=h * (t // p) * 5)
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="passes")


def test_fast_path_and_spec_rank_a_cancelling_block_alike():
  # (found in review) block 1's keys have components of +-1000 that cancel: its bound's
  # rounding slack is large. The fast path and the XLA spec use one slack formula, so
  # they pick the same block (before, the spec picked block 0, the fast path block 1).
  d, p, nb = 16, 16, 16
  k = np.zeros((1, nb * p, 1, d), np.float32)
  k[..., 0] = -5.0
  k[0, 0:16, 0, 0] = 1.012
  k[0, 16:32, 0, 0], k[0, 16:32, 0, 1] = 1000.0, -999.0
  q = np.zeros((1, 1, 1, d), np.float32)
  q[..., :2] = 1.0
  v = np.zeros_like(k)
  v[0, 0:16, 0, 0] = 1.0
  v[0, 16:32, 0, 1] = 1.0
  q, k, v = map(jnp.asarray, (q, k, v))
  spec = cj.CondensateSpec(anchor=0, window=1, selection="blocks", block_size=p,
                           top_blocks=1)
  lengths = jnp.array([nb * p])
  summ = summaries.build_summaries(k, p, lengths)
  ref = np.asarray(cj.condensate_attention(q, k, v, spec, kv_lengths=lengths))
  u_spec = np.asarray(bounds_lib.block_bounds(q, summ, 0.25))[0, 0, 0, 0]
  for bounds in ("xla", "triton"):
    out, _, _ = fast.decode_step(q, k, v, summ.kmin, summ.kmax, lengths,
                                          spec=spec, scale=0.25, bounds=bounds)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6, err_msg=bounds)
    u = np.asarray(fast.fast_bounds(q[:, 0], summ.kmin, summ.kmax, 0.25,
                                             bounds=bounds))[0, 0, 0]
    np.testing.assert_allclose(u, u_spec, rtol=2e-5, err_msg=bounds)   # float rounding


@pytest.mark.parametrize("g,nb,m,x,high", [(4, 256, 8, 8, 3), (1, 128, 5, 16, 30),
                                           (2, 64, 16, 8, 1000), (4, 512, 3, 32, 2)])
def test_rank_select_equals_top_k(g, nb, m, x, high):
  # the Triton rank selection (interpreted off GPU) on candidate superblocks picked as in
  # decode_select: the same ids in the same order as lax.top_k over the group score,
  # with heavy ties (integer scores; high=2: nearly all tied) and -inf blocks
  rng = np.random.default_rng(g * nb + m)
  b, hkv, gp = 2, 3, 16
  score = rng.integers(0, high, (b, hkv, gp, nb)).astype(np.float32)
  score[rng.random(score.shape) < 0.3] = -np.inf
  score[1, 2] = -np.inf                                      # a row with no middle key
  score = jnp.asarray(score)
  best = jnp.max(score, -1)
  best = jnp.where(jnp.isneginf(best), 0.0, best)
  r = order.group_score(score[:, :, :g], head_axis=2, block_axis=3)      # [B, K, nb]
  v_ref, i_ref = jax.lax.top_k(r, m)
  want = np.where(np.isneginf(np.asarray(v_ref)), -1, np.asarray(i_ref))
  r_sb = jnp.max(r.reshape(b, hkv, nb // x, x), -1)
  sbids = jax.lax.top_k(r_sb, min(m, nb // x))[1]
  if nb // x <= m:
    sbids = jnp.broadcast_to(jnp.arange(nb // x), (b, hkv, nb // x))
  interpret = jax.default_backend() != "gpu"
  got = rank_api.rank_select(sbids, score, best, top=m, superblock=x, heads=g,
                             implementation="triton", interpret=interpret)
  np.testing.assert_array_equal(np.asarray(got), want)
  # the superblock stage as a kernel: the same superblocks as lax.top_k (as a set: ranks
  # order them like top_k, padded with -1) and the same best
  if nb // x > m:
    sb_max = jnp.max(score.reshape(b, hkv, gp, nb // x, x), -1)
    sb_k, best_k = rank_api.superblock_select(sb_max, top=m, heads=g, per_program=4,
                                              implementation="triton", interpret=interpret)
    sb_k = np.asarray(sb_k)
    np.testing.assert_array_equal(sb_k[..., :m], np.asarray(sbids))
    assert np.all(sb_k[..., m:] == -1)
    np.testing.assert_array_equal(np.asarray(best_k), np.asarray(best))
    # wide output: -1 beyond the top m
    got_w = rank_api.rank_select(sb_k, score, best_k, top=m, superblock=x, heads=g,
                                 width=util.next_pow2(m + 1), implementation="triton",
                                 interpret=interpret)
    np.testing.assert_array_equal(np.asarray(got_w)[..., :m], want)
    assert np.all(np.asarray(got_w)[..., m:] == -1)


@pytest.mark.parametrize("rank,data", [("bound", "int"), ("centre", "int"),
                                       ("bound", "float"), ("centre", "float")])
def test_decode_select_rank_method_same_ids(rank, data):
  # int: integer-valued q and k (exact scores, many tied bounds); float: float32 normal
  # values, the reference reading the same kernel bounds (bounds="triton"). Ragged
  # lengths: one row short enough that fewer than M blocks hold middle keys, one where no
  # key is a middle key at all (length < anchor + window + 1, with the anchor and the
  # window's first key in one block)
  rng = np.random.default_rng(7)
  b, s, hq, hkv, d, p, m = 4, 1024, 8, 2, 16, 16, 12
  if data == "int":
    q = jnp.asarray(rng.integers(-1, 2, (b, 1, hq, d)), jnp.float32)
    k = jnp.asarray(rng.integers(-1, 2, (b, s, hkv, d)), jnp.float32)
  else:
    q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  lengths = jnp.array([s, 700, 150, 14])
  spec = cj.CondensateSpec(anchor=4, window=12, selection="blocks", block_size=p,
                           top_blocks=m, block_rank=rank)
  summ = summaries.build_summaries(k, p, lengths)
  args = (q, summ.kmin, summ.kmax, lengths)
  bounds = None if data == "int" else "triton"
  ids_t, u_t = fast.decode_select(*args, spec=spec, scale=0.25, method="top_k",
                                           bounds=bounds)
  ids_r, u_r = fast.decode_select(*args, spec=spec, scale=0.25, method="rank")
  np.testing.assert_array_equal(np.asarray(ids_r), np.asarray(ids_t))
  np.testing.assert_array_equal(np.asarray(u_r), np.asarray(u_t))
  assert np.sum(np.asarray(ids_r)[2] < 0) > 0          # the short row ran out of blocks
  assert np.all(np.asarray(ids_r)[3] < 0)              # no middle key: no block
  assert np.all(np.isneginf(np.asarray(u_r)[3]))
  with pytest.raises(ValueError, match="method='sort'"):
    fast.decode_select(*args, spec=spec, scale=0.25, method="sort")
