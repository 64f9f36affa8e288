"""The certified dropped-mass bound (DESIGN.md §1) holds on random and adversarial inputs."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import condensate_jax as cj

# Relative slack for float32 rounding in the sums of the true and bounded masses.
REL = 1e-4


def check_certificate(q, k, v, spec, **kw):
  out, stats = cj.condensate_attention(q, k, v, spec, return_stats=True, **kw)
  dense = cj.dense_attention(q, k, v, **kw)
  dropped = np.asarray(stats.dropped_mass, np.float64)
  bound = np.asarray(stats.dropped_mass_bound, np.float64)
  assert np.isfinite(bound).all() and (bound >= 0).all() and (bound <= 1).all()
  # 1. The bound is an upper bound of the true dropped probability, query by query.
  assert (dropped <= bound * (1 + REL) + 1e-30).all(), (dropped - bound).max()
  # 2. Nothing dropped <=> bound exactly 0.
  set_all = np.asarray(stats.set_size) == np.asarray(stats.visible)
  assert (bound[set_all] == 0).all() and (dropped[set_all] == 0).all()
  # 3. captured + dropped = 1.
  np.testing.assert_allclose(np.asarray(stats.captured_mass) + dropped, 1.0, atol=1e-5)
  # 4. Output error bound: |o - o_dense| <= 2 * eps * max_j |v_j| (per query, 2-norm).
  err = np.linalg.norm(np.asarray(out, np.float64) - np.asarray(dense, np.float64), axis=-1)
  vmax = np.linalg.norm(np.asarray(v, np.float64), axis=-1).max()
  eps = np.asarray(stats.dropped_mass_bound).transpose(0, 2, 1)  # [B, T, Hq]
  assert (err <= 2 * eps * vmax * (1 + REL) + 1e-5 * vmax).all()
  return stats


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 24), extra=st.integers(0, 24),
       group=st.sampled_from([1, 2, 4]), anchor=st.integers(0, 3),
       window=st.integers(0, 6), top_k=st.integers(0, 8),
       temperature=st.sampled_from([0.1, 1.0, 4.0, 30.0]))
def test_certificate_random(seed, t, extra, group, anchor, window, top_k, temperature):
  rng = np.random.default_rng(seed)
  s, hkv, d = t + extra, 2, 8
  q = jnp.asarray(temperature * rng.standard_normal((1, t, hkv * group, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, s, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, s, hkv, d)), jnp.float32)
  spec = cj.CondensateSpec(anchor=anchor, window=window, top_k=top_k)
  check_certificate(q, k, v, spec)


@pytest.mark.parametrize("top_k", [0, 1, 5])
def test_certificate_tight_on_flat_scores(top_k):
  """All middle scores equal the threshold: the bound is attained (no slack to hide in)."""
  t = s = 40
  q = jnp.zeros((1, t, 2, 4), jnp.float32)
  k = jnp.ones((1, s, 1, 4), jnp.float32)
  v = jnp.asarray(np.random.default_rng(0).standard_normal((1, s, 1, 4)), jnp.float32)
  stats = check_certificate(q, k, v, cj.CondensateSpec(anchor=1, window=4, top_k=top_k))
  np.testing.assert_allclose(stats.dropped_mass_bound, stats.dropped_mass, rtol=1e-5)


def test_certificate_adversarial_near_threshold():
  """Many dropped keys scoring just below the k-th selected one: large true loss that the
  bound must still cover; and a peaky sink where the bound is tiny but non-zero."""
  rng = np.random.default_rng(1)
  s, d = 64, 8
  base = rng.standard_normal(d)
  k = np.tile(base, (s, 1)) + 1e-3 * rng.standard_normal((s, d))
  q = np.tile(base, (s, 1))
  v = rng.standard_normal((s, d))
  to = lambda x: jnp.asarray(x[None, :, None, :], jnp.float32)
  stats = check_certificate(to(q), to(k), to(v), cj.CondensateSpec(1, 2, 3))
  assert np.asarray(stats.dropped_mass)[0, 0, -1] > 0.5  # really lossy
  k2 = rng.standard_normal((s, d))
  k2[0] = 12 * base
  stats = check_certificate(to(q), to(k2), to(v), cj.CondensateSpec(1, 2, 3))
  assert 0 < np.asarray(stats.dropped_mass_bound)[0, 0, -1] < 1e-4


def test_certificate_with_ragged_window_and_gqa():
  rng = np.random.default_rng(2)
  b, t, s, hq, hkv, d = 3, 6, 50, 8, 2, 16
  q = jnp.asarray(3 * rng.standard_normal((b, t, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  lengths = jnp.array([50, 20, 31], jnp.int32)
  for window in (None, 17):
    check_certificate(q, k, v, cj.CondensateSpec(2, 4, 6), kv_lengths=lengths,
                      sliding_window=window)
