"""Index-scan kernel (pallas_kernels/index_scan) against its jnp reference, and the packed
layout it reads (selection.index.pack_index) against the unpacked codes.

Parameterised over tests.conftest.kernels("triton") (interpreted on CPU, compiled on a
GPU). Pallas' generic interpret mode starts every output as NaN, so an element the kernel
never writes fails the comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensate_jax.selection import index as index_lib
from pallas_kernels.index_scan import api, reference
from tests.conftest import kernels

TRITON = kernels("triton")
# the tensor-core scan: interpreted on a CPU, compiled where the GPU kernels are
MMA = tuple(("triton_mma", interpret) for _, interpret in TRITON)
# the Mosaic GPU scan: compiled on a GPU only (no interpret mode for its pipelined kernel)
MOSAIC = (("mosaic_gpu", False),) if jax.default_backend() == "gpu" else ()


def _inputs(seed, b, s, hkv, g, d, bits, lengths):
  rng = np.random.default_rng(seed)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)) * (1 + 5 * (rng.random(d) < 0.1))
                  + 3 * rng.standard_normal(d), jnp.float32)
  q = jnp.asarray(rng.standard_normal((b, hkv, g, d)), jnp.float32)
  idx = index_lib.build_index(k, bits, jnp.asarray(lengths, jnp.int32))
  packed = index_lib.pack_index(idx)
  gp = 1 << (g - 1).bit_length()
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, gp - g)] + [(0, 0)] * (x.ndim - 3))
  qs = pad(q * idx.sigma[:, :, None])
  qmu = pad(jnp.einsum("bkgd,bkd->bkg", q, idx.mu))
  return idx, packed, qs, qmu


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
  idx, packed, _, _ = _inputs(0, 2, 64, 2, 1, 32, bits, [64, 40])
  assert packed.packed.dtype == jnp.uint8
  assert packed.packed.shape == (2, 2, 64, 32 * bits // 8)
  assert packed.bytes_per_key == 32 * bits // 8 + 8
  codes = index_lib.unpack_codes(packed.packed, bits).transpose(0, 2, 1, 3)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(idx.codes))
  np.testing.assert_array_equal(np.asarray(packed.step), np.asarray(idx.step).transpose(0, 2, 1))


@pytest.mark.parametrize("impl,interpret", TRITON + MMA + MOSAIC)
@pytest.mark.parametrize("bits,g,block_keys,d", [(2, 4, 32, 32), (4, 3, 64, 32),
                                                 (8, 1, 16, 32), (2, 8, 64, 64),
                                                 (4, 4, 128, 128)])
def test_matches_reference(impl, interpret, bits, g, block_keys, d):
  if impl == "triton_mma" and d * bits // 8 < 16:
    pytest.skip("packed width < 16: the tensor-core scan refuses it (tested below)")
  if impl == "mosaic_gpu" and d * bits // 8 not in (32, 64, 128):
    pytest.skip("packed width not 32, 64 or 128 bytes: the Mosaic GPU scan refuses it")
  tuning = {} if impl == "mosaic_gpu" else dict(block_keys=block_keys)
  _check_scan(impl, interpret, bits, g, d, 128, [128, 57], tuning)


# the Mosaic GPU scan over several tiles per program, 2-bit fields and padding rows
@pytest.mark.parametrize("impl,interpret", MOSAIC)
@pytest.mark.parametrize("bits,g,d,tiles", [(2, 3, 128, 2), (4, 3, 64, 4), (8, 2, 32, 8)])
def test_mosaic_scan_over_tiles(impl, interpret, bits, g, d, tiles):
  _check_scan(impl, interpret, bits, g, d, 1024, [1024, 700], dict(tiles=tiles))


def _check_scan(impl, interpret, bits, g, d, s, lengths, tuning):
  """impl's estimates against the reference, the XLA specification's and the float64
  score within the index's rounding slack, on rows of kv lengths `lengths`."""
  b, hkv = len(lengths), 2
  idx, packed, qs, qmu = _inputs(1, b, s, hkv, g, d, bits, lengths)
  kw = dict(scale=0.3, bits=bits, group=g, anchor=3, window=5)
  want = api.index_scan(qs, qmu, packed.packed, packed.step, jnp.asarray(lengths),
                        implementation="reference", **kw)
  # under jit, as the decode step runs it (XLA may fold rounding steps a caller makes)
  scan = jax.jit(lambda *a: api.index_scan(*a, implementation=impl, interpret=interpret,
                                           **tuning, **kw))
  got = scan(qs, qmu, packed.packed, packed.step, jnp.asarray(lengths))
  want, got = np.asarray(want), np.asarray(got)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)
  # middle keys of each row, real rows only: anchor .. len - 1 - window
  for row, n in enumerate(lengths):
    assert fin[row, :, :g, 3:n - 5].all() and not fin[row, :, :g, n - 5:].any()
    assert not fin[row, :, :g, :3].any() and not fin[row, :, g:].any()
  # the estimate is the XLA specification's (index_bounds), and brackets the exact score
  q = (qs[:, :, :g] / idx.sigma[:, :, None]).reshape(b, 1, hkv * g, d)
  est, slack = index_lib.index_bounds(q, idx, 0.3)
  est, slack = np.asarray(est)[:, :, :, 0], np.asarray(slack)[:, :, :, 0]
  np.testing.assert_allclose(got[:, :, :g][fin[:, :, :g]], est[fin[:, :, :g]], rtol=1e-5,
                             atol=1e-5)
  # the kernel's estimate is within the rounding part of the index's slack (a_step s_j +
  # a_one: the code error term left out) of the float64 score of the decoded codes
  k64 = np.asarray(index_lib.unpack_codes(packed.packed, bits), np.float64)  # [B,K,S,D]
  _, a_step, a_one = (np.asarray(x)[:, 0] for x in index_lib.slack_coefficients(
      q.reshape(b, 1, hkv, g, d), idx.mu, idx.sigma, bits, 0.3))            # [B,K,G]
  rounding = (a_step[..., None] * np.asarray(packed.step)[:, :, None]
              + a_one[..., None])                                          # [B,K,G,S]
  exact = 0.3 * np.einsum("bkgd,bksd->bkgs", np.asarray(q.reshape(b, hkv, g, d), np.float64),
                          np.asarray(idx.mu, np.float64)[:, :, None]
                          + np.asarray(packed.step, np.float64)[..., None]
                          * k64 * np.asarray(idx.sigma, np.float64)[:, :, None])
  real = fin[:, :, :g]
  gap = np.abs(got[:, :, :g] - exact)[real]
  assert np.all(gap <= rounding[real]), (gap.max(), rounding[real].min())


def test_shapes_the_kernel_does_not_take_fall_back():
  _, packed, qs, qmu = _inputs(2, 1, 24, 1, 2, 32, 4, [24])
  kw = dict(scale=1.0, bits=4, group=2)
  with pytest.raises(NotImplementedError, match="divisible by 16"):
    api.index_scan(qs, qmu, packed.packed, packed.step, jnp.array([24]),
                   implementation="triton", interpret=True, **kw)
  got = api.index_scan(qs, qmu, packed.packed, packed.step, jnp.array([24]), **kw)
  want = reference.index_scan(qs, qmu, packed.packed, packed.step, jnp.array([24]), **kw,
                              anchor=0, window=0)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="implementation='nope'"):
    api.index_scan(qs, qmu, packed.packed, packed.step, jnp.array([24]),
                   implementation="nope", **kw)


def test_tensor_core_scan_refuses_narrow_codes_and_the_default_falls_back():
  _, packed, qs, qmu = _inputs(2, 1, 64, 1, 2, 32, 2, [64])     # packed width 8
  kw = dict(scale=1.0, bits=2, group=2, anchor=1, window=2)
  with pytest.raises(NotImplementedError, match="packed width"):
    api.index_scan(qs, qmu, packed.packed, packed.step, jnp.array([64]),
                   implementation="triton_mma", interpret=True, **kw)
  assert api.default_implementations("gpu")[:2] == ("triton_mma", "triton")   # refusals fall back


@pytest.mark.parametrize("jit", [False, True])
def test_tensor_core_parts_hold_float32(jit):
  from pallas_kernels.index_scan import gpu_triton_mma
  x = jnp.asarray(np.random.default_rng(4).standard_normal(4096) * 10.0 ** np.arange(
      -20, 20, 40 / 4096), jnp.float32)
  parts = (jax.jit(gpu_triton_mma.split_parts) if jit else gpu_triton_mma.split_parts)(x)
  assert all(p.dtype == jnp.bfloat16 for p in parts)
  back = sum(p.astype(jnp.float32) for p in parts)
  assert np.all(np.abs(np.asarray(back - x)) <= 2.0**-24 * np.abs(np.asarray(x)))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the off-GPU refusal")
def test_mosaic_scan_refuses_off_gpu_and_is_not_a_default():
  idx, packed, qs, qmu = _inputs(0, 1, 128, 1, 4, 128, 4, [128])
  with pytest.raises(NotImplementedError, match="Hopper GPU"):
    api.index_scan(qs, qmu, packed.packed, packed.step, jnp.asarray([128]), scale=0.3,
                   bits=4, group=4, implementation="mosaic_gpu")
  assert "mosaic_gpu" not in api.default_implementations("gpu")


def test_pack_refuses_bad_input():
  with pytest.raises(ValueError, match="expected a KeyIndex"):
    index_lib.pack_index(jnp.zeros((1, 8, 1, 16)))
  idx = index_lib.build_index(jax.random.normal(jax.random.PRNGKey(0), (1, 16, 1, 6)), 2)
  with pytest.raises(ValueError, match="divisible by 4"):
    index_lib.pack_index(idx)
