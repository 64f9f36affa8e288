"""Block-bounds kernel (pallas_kernels/block_bounds) against its jnp reference.

Parameterised over tests.conftest.kernels("triton") (interpreted on CPU, compiled on a
GPU). Pallas' generic interpret mode starts every float output as NaN, so an element the
kernel never writes fails assert_close. Rows >= G of the outputs are padding (not part of
the contract) and are not compared.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_bounds import api, reference
from tests.conftest import PLATFORM, assert_close, kernels

TRITON = kernels("triton")


def _inputs(seed, b, hq, hkv, d, p, nb, lengths, dtype):
  """Decode queries and min / max summaries of random keys; blocks past a row's length are
  empty (min = +inf, max = -inf), as a cache with room to spare has them."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, hq, d))
  k = rng.standard_normal((b, nb * p, hkv, d))
  valid = (np.arange(nb * p)[None, :] < np.asarray(lengths)[:, None])[..., None, None]
  kr = lambda fill: np.where(valid, k, fill).reshape(b, nb, p, hkv, d)
  kmin, kmax = kr(np.inf).min(2), kr(-np.inf).max(2)
  return tuple(jnp.asarray(x, dtype) for x in (q, kmin, kmax))


def _rows(x, g):
  return np.asarray(x)[:, :, :g]


CASES = {
    # name: (dtype, hq, hkv, kw, kernel_kw)
    "f32_plain": (jnp.float32, 6, 2, {}, {}),
    "f32_masked_centre_superblock": (
        jnp.float32, 6, 2, dict(with_centre=True, superblock=8), dict(chunk=16)),
    "f32_masked_superblock_g1": (jnp.float32, 2, 2, dict(superblock=16), {}),
    "bf16_masked_centre": (jnp.bfloat16, 8, 2, dict(with_centre=True), {}),
    "f16_masked": (jnp.float16, 4, 1, {}, {}),
}


@pytest.mark.parametrize("impl,interpret", TRITON)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(impl, interpret, case):
  dtype, hq, hkv, kw, kernel_kw = CASES[case]
  b, d, p, nb = 4, 32, 16, 32
  g = hq // hkv
  masked = case != "f32_plain"
  # ragged: full; 301: the last middle key (288) alone in its block, the cache ends
  # mid-block; no middle key at all (14 < anchor + window + 1); empty
  lengths = [nb * p, 301, 14, 0] if masked else [nb * p] * b
  q, kmin, kmax = _inputs(len(case), b, hq, hkv, d, p, nb, lengths, dtype)
  kw = dict(kw, scale=d**-0.5, slack=0.01)
  if masked:
    kw.update(kv_lengths=jnp.asarray(lengths), block_size=p, anchor=4, window=12)
  got = api.block_bounds(q, kmin, kmax, **kw, implementation=impl, interpret=interpret,
                         **kernel_kw)
  want = reference.block_bounds(q, kmin, kmax, **kw)
  got, want = (x if isinstance(x, tuple) else (x,) for x in (got, want))
  gp = max(16, 1 << (g - 1).bit_length())
  names = ["u"] + ["centre"] * ("with_centre" in kw) + ["sbmax"] * ("superblock" in kw)
  assert len(got) == len(want) == len(names)
  for name, a, e in zip(names, got, want):
    width = nb // kw["superblock"] if name == "sbmax" else nb
    assert a.shape == e.shape == (b, hkv, gp, width) and a.dtype == jnp.float32, name
    assert_close(_rows(a, g), _rows(e, g), dtype, f"{case}: {name}")
  if masked:
    u = np.asarray(got[0])
    assert np.all(np.isneginf(u[2:])), "rows without middle keys: every block -inf"
    assert np.isfinite(u[0, :, :g]).all() and np.isneginf(u[1, :, :g]).any()


@pytest.mark.parametrize("impl,interpret", TRITON)
def test_empty_blocks_unmasked_and_deterministic(impl, interpret):
  """Without kv_lengths empty blocks give NaN (0 * inf) in kernel and reference alike;
  the other blocks agree to the table's tolerance; a second run is bitwise equal."""
  b, hq, hkv, d, p, nb = 2, 4, 2, 16, 16, 16
  q, kmin, kmax = _inputs(3, b, hq, hkv, d, p, nb, [nb * p, 100], jnp.float32)
  kw = dict(scale=0.25, slack=0.01, with_centre=True)
  run = lambda: api.block_bounds(q, kmin, kmax, **kw, implementation=impl,
                                 interpret=interpret)
  got, want = run(), reference.block_bounds(q, kmin, kmax, **kw)
  for name, a, e in zip(("u", "centre"), got, want):
    a, e = _rows(a, 2), _rows(e, 2)
    nan = np.isnan(e)
    assert nan.any() and not nan[0].any()                   # row 1: blocks past 100
    np.testing.assert_array_equal(np.isnan(a), nan, err_msg=name)
    assert_close(np.where(nan, 0, a), np.where(nan, 0, e), jnp.float32, name)
  for a, a2 in zip(got, run()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))


def test_dispatch_and_validation():
  q, kmin, kmax = _inputs(0, 1, 2, 1, 16, 16, 8, [128], jnp.float32)
  kw = dict(scale=1.0, slack=0.0)
  expected = {"gpu": "triton", "cpu": "triton"}.get(PLATFORM, "reference")
  assert api.default_implementations()[0] == expected
  assert set(api.IMPLEMENTATIONS) == {"reference", "triton"}
  with pytest.raises(TypeError):
    api.IMPLEMENTATIONS["cuda"] = None                      # immutable table
  with pytest.raises(ValueError, match=r"implementation='cuda'.*'reference', 'triton'"):
    api.block_bounds(q, kmin, kmax, **kw, implementation="cuda")
  with pytest.raises(ValueError, match="interpret='yes': expected None, True or False"):
    api.block_bounds(q, kmin, kmax, **kw, interpret="yes")
  with pytest.raises(ValueError, match="kv_lengths needs block_size"):
    api.block_bounds(q, kmin, kmax, **kw, kv_lengths=jnp.array([5]),
                     implementation="reference")
  # nb = 8 (not a multiple of 16): the named kernel refuses, None falls back
  with pytest.raises(NotImplementedError, match="num_blocks=8"):
    api.block_bounds(q, kmin, kmax, **kw, implementation="triton", interpret=True)
  u = api.block_bounds(q, kmin, kmax, **kw)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(
      reference.block_bounds(q, kmin, kmax, **kw)))
  if PLATFORM == "cpu":
    with pytest.raises(NotImplementedError, match="needs a GPU"):
      api.block_bounds(q, kmin, kmax, **kw, implementation="triton", interpret=False)
