"""The timed steps (`condensate_jax.fast`) against the XLA specification, on the
platform's kernels (Triton: interpreted on CPU, compiled on GPU) and on the Mosaic TPU
block-sparse kernels (TPU interpret mode on the CPU device; compiled on a TPU, never done
so far)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax import fast
from condensate_jax.impl import pallas_blocks


def _qkv(seed, b, t, s, hq, hkv, d, dtype=jnp.float32, gain=1.0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d)) * gain
  k, v = rng.standard_normal((2, b, s, hkv, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def test_prefill_covering_everything_is_dense():
  q, k, v = _qkv(3, 1, 48, 48, 2, 1, 16, gain=1.0)
  spec = cj.CondensateSpec(anchor=1, window=16, selection="blocks", block_size=16,
                           top_blocks=3)
  o, _ = fast.prefill_step(q, k, v, spec=spec, scale=0.25)
  dense = cj.dense_attention(q, k, v, scale=0.25)
  np.testing.assert_allclose(np.asarray(o), np.asarray(dense), atol=2e-5)


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
  summ = cj.build_summaries(k, p, lengths)
  out, lse, eps = fast.decode_step(q, k, v, summ.kmin, summ.kmax, lengths, spec=spec,
                                   scale=d**-0.5, num_splits=num_splits, method=method,
                                   kernel=kernel)
  ref, stats = cj.condensate_attention(q, k, v, spec, kv_lengths=lengths,
                                       return_stats=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  np.testing.assert_allclose(np.asarray(eps), np.asarray(stats.dropped_mass_bound)[..., 0],
                             rtol=1e-3, atol=1e-7)
  assert lse.shape == (b, hq) and np.all(np.isfinite(np.asarray(lse)))


def test_fast_path_runs_on_the_mosaic_kernels(monkeypatch, on_cpu_unless_tpu):
  """condensate_jax's block fast path with its kernels switched to "mosaic_tpu"."""
  if jax.default_backend() == "gpu":
    # interpret=None means "compile" off CPU, and a GPU cannot compile a Mosaic TPU
    # kernel (seen on an H200 host: NotImplementedError, as api.py documents)
    pytest.skip("the fast path interprets the Mosaic kernels only on a CPU backend")
  monkeypatch.setattr(pallas_blocks, "KERNEL_IMPLEMENTATION", "mosaic_tpu")
  b, s, hq, hkv, d, p = 2, 128, 4, 2, 128, 16
  q, k, v = _qkv(5, b, 1, s, hq, hkv, d, jnp.float32, gain=2.0)
  lengths = jnp.array([128, 77])
  spec = cj.CondensateSpec(anchor=4, window=16, selection="blocks", block_size=p,
                           top_blocks=3)
  summ = cj.build_summaries(k, p, lengths)
  out, _, _ = fast.decode_step(q, k, v, summ.kmin, summ.kmax, lengths, spec=spec,
                               scale=d**-0.5, num_splits=2)
  ref = cj.condensate_attention(q, k, v, spec, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  # prefill whose lists cover every key: dense causal attention
  q, k, v = _qkv(6, 1, 40, 48, 2, 1, d, jnp.float32, gain=1.0)
  spec = cj.CondensateSpec(anchor=1, window=16, selection="blocks", block_size=p,
                           top_blocks=3)
  o, _ = fast.prefill_step(q, k, v, spec=spec, scale=0.1)
  np.testing.assert_allclose(np.asarray(o), np.asarray(cj.dense_attention(q, k, v,
                                                                           scale=0.1)),
                             atol=1e-5, rtol=1e-5)
