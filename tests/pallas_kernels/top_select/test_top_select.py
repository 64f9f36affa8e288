"""Top-k selection kernel (pallas_kernels/top_select, interpreted on the CPU) against
`lax.top_k`: the same set on every input, ties, signed zeros, infinities and NaNs
included, in position order, and the k-th value bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.top_select import api, reference


def _bits(x):
  return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32))


def _check(x, k, **kw):
  x = jnp.asarray(x, jnp.float32)
  ids, tau = api.top_select(x, k, implementation="triton", **kw)
  vals, want = jax.lax.top_k(x, k)
  assert ids.dtype == jnp.int32 and ids.shape == x.shape[:-1] + (k,)
  np.testing.assert_array_equal(np.asarray(ids), np.sort(np.asarray(want), axis=-1))
  np.testing.assert_array_equal(_bits(tau), _bits(vals[..., -1]))
  r_ids, r_tau = reference.top_select(x, k)
  np.testing.assert_array_equal(np.asarray(r_ids), np.asarray(ids))
  np.testing.assert_array_equal(_bits(r_tau), _bits(tau))


@pytest.mark.parametrize("n,k", [(1, 1), (16, 16), (100, 7), (100, 1), (257, 256),
                                 (1000, 999), (4096, 512)])
def test_random_rows(n, k):
  x = np.random.default_rng(n + k).standard_normal((3, n)).astype(np.float32)
  _check(x, k)


def test_ties_go_to_the_lower_position():
  rng = np.random.default_rng(1)
  x = rng.integers(-3, 4, size=(4, 300)).astype(np.float32)   # 7 values, many ties
  for k in (1, 5, 43, 150, 299, 300):
    _check(x, k)
  _check(np.zeros((2, 64), np.float32), 10)                   # every entry tied


def test_total_order_of_floats():
  nan, inf = np.float32(np.nan), np.float32(np.inf)
  neg_nan = -nan
  lowest = jax.lax.bitcast_convert_type(jnp.int32(-1), jnp.float32)   # the padding's key
  row = np.array([1.0, nan, 3.0, -0.0, 0.0, -inf, 3.0, neg_nan, 0.0, -0.0, inf, -inf,
                  float(lowest), 2.5, -7.0, 1e-45, -1e-45], np.float32)
  x = np.stack([row, row[::-1], np.roll(row, 5)])
  for k in range(1, row.size + 1):
    _check(x, k)


def test_leading_dims_and_rows_with_few_finite():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 3, 2, 50)).astype(np.float32)
  x[..., 10:] = -np.inf                         # 10 finite entries, k beyond them
  _check(x, 20)
  _check(x, 10)


def test_largest_row_and_the_limit():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1, api.MAX_ROW)).astype(np.float32)
  x[0, ::7] = x[0, 3]                           # a tied value across the row
  _check(x, 2048)
  with pytest.raises(NotImplementedError, match="at most"):
    api.top_select(jnp.zeros((1, api.MAX_ROW + 1)), 4, implementation="triton")
  ids, tau = api.top_select(jnp.asarray(np.tile(x, (1, 2))), 4)   # default: falls back
  assert ids.shape == (1, 4)


def test_bad_arguments():
  x = jnp.zeros((2, 8))
  for k in (0, 9, 2.0, True):
    with pytest.raises(ValueError, match="k="):
      api.top_select(x, k)
  with pytest.raises(ValueError, match="x.shape"):
    api.top_select(jnp.float32(1.0), 1)
  with pytest.raises(ValueError, match="implementation"):
    api.top_select(x, 2, implementation="cuda")


@pytest.mark.parametrize("n,k", [(200, 5), (200, 40), (130, 33), (64, 64), (1000, 3)])
def test_top_set_of_rows_longer_than_the_kernel(n, k, monkeypatch):
  """top_set with the row limit lowered to 32: two levels (or, where a level's row stays
  too long, lax.top_k for it), the set of lax.top_k with ties and the total order."""
  monkeypatch.setattr(api, "MAX_ROW", 32)
  rng = np.random.default_rng(n * k)
  x = rng.integers(-4, 5, size=(2, n)).astype(np.float32)          # many ties
  x[0, rng.integers(0, n, 6)] = [np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0]
  x = jnp.asarray(x)
  vals, ids, tau = api.top_set(x, k, implementation="triton")
  want_vals, want = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(np.asarray(ids), np.sort(np.asarray(want), axis=-1))
  np.testing.assert_array_equal(_bits(vals), _bits(jnp.take_along_axis(x, ids, axis=-1)))
  np.testing.assert_array_equal(_bits(tau), _bits(want_vals[..., -1]))


def test_top_set_bad_arguments():
  with pytest.raises(ValueError, match="k="):
    api.top_set(jnp.zeros((2, 8)), 9)
  with pytest.raises(ValueError, match="x.shape"):
    api.top_set(jnp.float32(1.0), 1)
