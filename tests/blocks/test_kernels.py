"""Block-sparse kernels (interpreted on CPU, compiled on GPU) against their jnp reference,
and the Pallas implementation of each mode against the XLA specification."""

import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax import blocks, blocks_pallas
from pallas_kernels.block_sparse import api, reference

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def _close(a, e, dtype, what):
  tol = TOL[jnp.dtype(dtype).name]
  a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
  both_inf = np.isneginf(a) & np.isneginf(e)
  np.testing.assert_allclose(np.where(both_inf, 0, a), np.where(both_inf, 0, e), atol=tol,
                             rtol=tol, err_msg=what)


def _qkv(seed, b, t, s, hq, hkv, d, dtype=jnp.float32, gain=1.0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d)) * gain
  k, v = rng.standard_normal((2, b, s, hkv, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_kernel_matches_reference(dtype):
  b, t, s, hq, hkv, d, p = 2, 2, 100, 6, 2, 32, 16
  q, k, v = _qkv(0, b, t, s, hq, hkv, d, dtype)
  rng = np.random.default_rng(1)
  nb = -(-s // p)
  ids = np.argsort(rng.random((b, hkv, t, nb)), -1)[..., :6]
  ids = np.where(rng.random(ids.shape) < 0.3, -1, ids).reshape(b, hkv, t, 3, 2)
  ranges = np.array([[[0, 1, 90, 99, 2, 89], [3, 5, 40, 49, 6, 39]],
                     [[0, 1, 50, 59, 2, 49], [0, -1, 0, -1, 0, -1]]])   # last: empty
  args = (q, k, v, jnp.asarray(ids, jnp.int32), jnp.asarray(ranges, jnp.int32))
  kw = dict(block_size=p, scale=0.2, anchor=3, window=10)
  o, lse = api.block_decode(*args, implementation="triton", **kw)
  ro, rl = api.block_decode(*args, implementation="reference", **kw)
  _close(o, ro, dtype, "o_parts")
  _close(lse, rl, dtype, "lse_parts")
  assert np.all(np.isneginf(np.asarray(lse)[1, :, 1]))      # the empty query
  o2, _ = api.block_decode(*args, implementation="triton", **kw)
  np.testing.assert_array_equal(np.asarray(o), np.asarray(o2))   # deterministic


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_kernel_matches_reference(dtype):
  b, t, s, h, d, p = 1, 64, 80, 2, 32, 16
  q, k, v = _qkv(2, b, t, s, h, h, d, dtype, gain=2.0)
  spec = cj.CondensateSpec(anchor=3, window=20, selection="blocks", block_size=p,
                           top_blocks=1)
  kblocks, kflags = blocks_pallas.prefill_lists(q, k, spec)
  kw = dict(block_size=p, anchor=3, window=20, scale=d**-0.5)
  o, lse = api.block_prefill(q, k, v, kblocks, kflags, implementation="triton", **kw)
  ro, rl = api.block_prefill(q, k, v, kblocks, kflags, implementation="reference", **kw)
  _close(o, ro, dtype, "o")
  _close(lse, rl, dtype, "lse")
  # masked empty entries (loads that can pipeline) give the same result as skipped ones
  om, lm = api.block_prefill(q, k, v, kblocks, kflags, implementation="triton", skip="mask",
                             **kw)
  _close(om, o, dtype, "o skip=mask")
  _close(lm, lse, dtype, "lse skip=mask")
  assert np.any(np.asarray(kblocks) < 0)          # the case has empty entries to skip
  # the lists cover every anchor and window key, and add middle keys of flagged blocks
  mask = np.asarray(reference.prefill_mask(t, s, kblocks, kflags, block_size=p, anchor=3,
                                           window=20))
  pos = s - t + np.arange(t)[:, None]
  j = np.arange(s)[None]
  static = ((j < 3) | (j > pos - 20)) & (j <= pos)
  assert np.all(mask[:, :, static]) and not np.all(mask[:, :, (j <= pos) & ~static])


def test_prefill_covering_everything_is_dense():
  q, k, v = _qkv(3, 1, 48, 48, 2, 1, 16, gain=1.0)
  spec = cj.CondensateSpec(anchor=1, window=16, selection="blocks", block_size=16,
                           top_blocks=3)
  o, _ = blocks_pallas.prefill_step(q, k, v, spec=spec, scale=0.25)
  dense = cj.dense_attention(q, k, v, scale=0.25)
  np.testing.assert_allclose(np.asarray(o), np.asarray(dense), atol=2e-5)


MODES = [("blocks", dict(top_blocks=2)), ("certified", dict(top_blocks=2, epsilon=1e-2)),
         ("bounded", dict(top_k=9)), ("blocks", dict(top_blocks=2, block_rank="centre"))]


@pytest.mark.parametrize("mode,kw", MODES, ids=["blocks", "certified", "bounded",
                                                "blocks-centre"])
def test_pallas_blocks_matches_xla_spec(mode, kw):
  q, k, v = _qkv(4, 2, 2, 90, 4, 2, 32, gain=2.0)
  spec = cj.CondensateSpec(anchor=2, window=8, selection=mode, block_size=16, **kw)
  call = dict(kv_lengths=[90, 47], return_stats=True)
  out, stats = cj.condensate_attention(q, k, v, spec, implementation="pallas", **call)
  ref, ref_stats = cj.condensate_attention(q, k, v, spec, implementation="xla", **call)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  for field in ("set_size", "visible", "captured_mass", "dropped_mass"):
    np.testing.assert_allclose(np.asarray(getattr(stats, field)),
                               np.asarray(getattr(ref_stats, field)), atol=1e-5,
                               err_msg=field)
  np.testing.assert_allclose(np.asarray(stats.dropped_mass_bound),
                             np.asarray(ref_stats.dropped_mass_bound), rtol=1e-4, atol=1e-7)
  # certified reads whole rounds: at least the spec's keys, never more than visible
  assert np.all(stats.keys_scored >= ref_stats.keys_scored)
  assert np.all(stats.keys_scored <= stats.visible)


@pytest.mark.parametrize("s,num_splits,method,rank,kernel,m", [
    (128, 2, "top_k", "bound", "split", 3), (128, None, "superblock", "bound", "split", 3),
    (128, None, "superblock", "centre", "split", 3),
    # the rank selection and the fused step need >= 16 blocks (nb = 32 here); m = 3: every
    # program of the fused step sums eps shares, m = 5: only the two beyond the blocks
    (512, None, "rank", "bound", "fused", 3), (512, None, "rank", "centre", "fused", 5),
    (512, 2, "rank", "bound", "split", 3), (512, None, "top_k", "centre", "fused", 3),
    (512, None, "rank", "bound", "fused", 5)])
def test_decode_step_matches_xla_spec(s, num_splits, method, rank, kernel, m):
  b, hq, hkv, d, p = 2, 4, 2, 32, 16
  q, k, v = _qkv(5, b, 1, s, hq, hkv, d, gain=2.0)
  lengths = jnp.array([s, s // 2 + 13])
  spec = cj.CondensateSpec(anchor=4, window=16, selection="blocks", block_size=p,
                           top_blocks=m, block_rank=rank)
  summ = blocks.build_summaries(k, p, lengths)
  out, lse, eps = blocks_pallas.decode_step(q, k, v, summ.kmin, summ.kmax, lengths,
                                            spec=spec, scale=d**-0.5,
                                            num_splits=num_splits, method=method,
                                            kernel=kernel)
  ref, stats = cj.condensate_attention(q, k, v, spec, kv_lengths=lengths,
                                       return_stats=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  np.testing.assert_allclose(np.asarray(eps), np.asarray(stats.dropped_mass_bound)[..., 0],
                             rtol=1e-3, atol=1e-7)
  assert lse.shape == (b, hq) and np.all(np.isfinite(np.asarray(lse)))


def test_kernel_validation():
  q, k, v = _qkv(0, 1, 1, 32, 2, 1, 16)
  ids = jnp.zeros((1, 1, 1, 1, 1), jnp.int32)
  rng_ = jnp.zeros((1, 1, 6), jnp.int32)
  with pytest.raises(ValueError, match="implementation='cuda'"):
    api.block_decode(q, k, v, ids, rng_, block_size=16, scale=1.0, anchor=1, window=1,
                     implementation="cuda")
  with pytest.raises(NotImplementedError, match="block_size=8"):
    api.block_decode(q, k, v, ids, rng_, block_size=8, scale=1.0, anchor=1, window=1,
                     implementation="triton")
  with pytest.raises(ValueError, match="interpret=1"):
    api.block_decode(q, k, v, ids, rng_, block_size=16, scale=1.0, anchor=1, window=1,
                     interpret=1)
