"""condensate_jax.metrics on hand-made cases whose answers are worked out by hand."""

import math

import numpy as np
import pytest

from condensate_jax import metrics
from condensate_jax.softmax import AttentionStats


def _next(x, steps=1):
  x = np.float32(x)
  for _ in range(steps):
    x = np.nextafter(x, np.float32(np.inf), dtype=np.float32)
  return x


def test_bitwise_fraction_counts_positions_not_entries():
  dense = np.arange(12, dtype=np.float32).reshape(3, 4)
  cond = dense.copy()
  cond[1, 2] = _next(cond[1, 2])  # one ulp in one entry of position 1
  assert metrics.bitwise_fraction(dense, cond) == pytest.approx(2 / 3)
  assert metrics.bitwise_fraction(dense, dense.copy()) == 1.0


def test_bitwise_distinguishes_signed_zeros_but_ulp_does_not():
  dense = np.array([[0.0, 1.0]], np.float32)
  cond = np.array([[-0.0, 1.0]], np.float32)
  assert metrics.bitwise_fraction(dense, cond) == 0.0
  assert metrics.max_ulp_diff(dense, cond) == 0
  assert metrics.max_abs_logit_diff(dense, cond) == 0.0


@pytest.mark.parametrize("a, b, ulps", [
    (1.0, _next(1.0), 1),
    (1.0, _next(1.0, 5), 5),
    (-1.0, -_next(1.0, 3), 3),
    (1.0, 2.0, 2**23),  # one binade of float32
    (np.float32(1e-45), np.float32(-1e-45), 2),  # smallest subnormals across zero
])
def test_max_ulp_diff(a, b, ulps):
  dense = np.array([[a, 7.0]], np.float32)
  cond = np.array([[b, 7.0]], np.float32)
  assert metrics.max_ulp_diff(dense, cond) == ulps
  assert metrics.max_ulp_diff(cond, dense) == ulps


def test_max_abs_logit_diff():
  dense = np.array([[1.0, -2.0], [3.0, np.inf]], np.float32)
  cond = np.array([[1.5, -2.0], [2.75, np.inf]], np.float32)
  assert metrics.max_abs_logit_diff(dense, cond) == 0.5
  cond[0, 1] = np.nan
  assert math.isnan(metrics.max_abs_logit_diff(dense, cond))


def test_mean_kl_two_class_by_hand():
  # p = softmax(0, 0) = (1/2, 1/2); q = softmax(0, ln 3) = (1/4, 3/4).
  dense = np.array([[0.0, 0.0], [5.0, 5.0]], np.float32)
  cond = np.array([[0.0, math.log(3.0)], [5.0, 5.0]], np.float32)
  kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
  assert metrics.mean_kl(dense, cond) == pytest.approx(kl0 / 2, rel=1e-6)
  assert metrics.mean_kl(dense, cond, chunk=1) == pytest.approx(kl0 / 2, rel=1e-6)
  assert metrics.mean_kl(dense, dense) == 0.0


def test_mean_kl_is_not_symmetric():
  dense = np.array([[0.0, 2.0, -1.0]], np.float32)
  cond = np.array([[1.0, 0.0, 0.0]], np.float32)
  assert metrics.mean_kl(dense, cond) != pytest.approx(metrics.mean_kl(cond, dense))


def test_top1_agreement():
  dense = np.array([[0, 1, 0], [2, 0, 0], [0, 0, 3], [1, 0, 0]], np.float32)
  cond = np.array([[0, 2, 0], [0, 5, 0], [0, 0, 1], [0, 0, 9]], np.float32)
  assert metrics.top1_agreement(dense, cond) == 0.5


def test_greedy_match():
  out = metrics.greedy_match([5, 6, 7, 8], [5, 6, 9, 8])
  assert out == {"n": 4, "prefix": 2, "equal": 3, "first_divergence": 2, "exact": False}
  out = metrics.greedy_match(np.array([[1, 2, 3]]), np.array([[1, 2, 3]]))
  assert out == {"n": 3, "prefix": 3, "equal": 3, "first_divergence": None, "exact": True}
  assert metrics.greedy_match([1, 2], [3, 2])["first_divergence"] == 0


def test_attention_summary():
  shape = (2, 1, 1, 2)  # [L, B, Hq, T]
  stats = AttentionStats(
      captured_mass=np.array([1.0, 0.5, 0.75, 1.0], np.float32).reshape(shape),
      dropped_mass=np.array([0.0, 0.5, 0.25, 0.0], np.float32).reshape(shape),
      dropped_mass_bound=np.array([0.0, 0.6, 0.3, 0.0], np.float32).reshape(shape),
      set_size=np.array([1, 2, 2, 3], np.int32).reshape(shape),
      visible=np.array([1, 4, 4, 3], np.int32).reshape(shape),
      keys_scored=np.array([1, 4, 4, 3], np.int32).reshape(shape))
  out = metrics.attention_summary(stats)
  assert out["captured_mass_min"] == 0.5
  assert out["captured_mass_mean"] == pytest.approx(0.8125)
  assert out["dropped_mass_max"] == 0.5
  assert out["dropped_mass_mean"] == pytest.approx(0.1875)
  assert out["certified_eps_max"] == pytest.approx(0.6)
  assert out["keys_read_frac"] == pytest.approx(8 / 12)
  assert out["keys_scored_frac"] == 1.0


def test_logit_parity_of_a_perturbed_copy():
  rng = np.random.default_rng(0)
  dense = rng.normal(size=(5, 11)).astype(np.float32)
  cond = dense.copy()
  cond[4] += np.float32(0.25)  # a uniform shift: same softmax, different bits
  out = metrics.logit_parity(dense, cond)
  assert out["bitwise_frac"] == pytest.approx(0.8)
  assert out["max_abs_logit_diff"] == pytest.approx(0.25, abs=1e-6)
  assert out["max_ulp_diff"] > 0
  assert out["mean_kl"] == pytest.approx(0.0, abs=1e-12)
  assert out["top1_agreement"] == 1.0


@pytest.mark.parametrize("fn", [metrics.bitwise_fraction, metrics.max_ulp_diff])
def test_float32_required(fn):
  with pytest.raises(ValueError, match="float32"):
    fn(np.zeros((2, 3)), np.zeros((2, 3)))


def test_shape_mismatch():
  with pytest.raises(ValueError, match="shape"):
    metrics.max_abs_logit_diff(np.zeros((2, 3), np.float32), np.zeros((3, 3), np.float32))
  with pytest.raises(ValueError, match="length"):
    metrics.greedy_match([1, 2], [1, 2, 3])


# ------------------------------------------------------------- logit_parity_on_device


def _device_cases():
  rng = np.random.default_rng(11)
  d = (rng.standard_normal((70, 300)) * 4).astype(np.float32)
  noisy = lambda s: (d + rng.standard_normal(d.shape).astype(np.float32) * s).astype(
      np.float32)
  special = d.copy()
  special[3, 5], special[4, 7], special[5, :2] = np.nan, np.inf, -np.inf
  crossing = d.copy()
  crossing[0, :4] = [1e-30, -1e-30, 0.0, -0.0]
  return {
      "same": (d, d.copy()),
      "one ulp": (d, np.nextafter(d, np.float32(np.inf))),
      "tiny noise": (d, noisy(1e-5)),
      "moderate": (d, noisy(0.3)),
      "unrelated": (d, (rng.standard_normal(d.shape) * 10).astype(np.float32)),
      "shifted": (d, d + np.float32(3.0)),
      "outlier": (d, np.where(np.arange(300) == 9, d + 95.0, d).astype(np.float32)),
      "non-finite": (d, special),
      "sign crossings": (crossing, -crossing),
  }


@pytest.mark.parametrize("case", list(_device_cases()))
def test_logit_parity_on_device_matches_host(case):
  dense, cond = _device_cases()[case]
  host = metrics.logit_parity(dense, cond)
  dev = metrics.logit_parity_on_device(dense, cond, chunk=16)
  assert set(dev) == set(host) | {"dense_max_abs_logit"}
  assert dev["dense_max_abs_logit"] == float(np.max(np.abs(dense)))
  for key in ("bitwise_frac", "max_ulp_diff", "top1_agreement"):
    assert dev[key] == host[key], key
  for key in ("max_abs_logit_diff", "max_diff_scale_ulps"):
    np.testing.assert_allclose(dev[key], host[key], rtol=1e-6, err_msg=key)
  # float32 on the device against float64 on the host: relative 1e-5, or absolute 1e-12
  # where the logits nearly agree (the direct float32 formula would be off by ~1e-6)
  np.testing.assert_allclose(dev["mean_kl"], host["mean_kl"], rtol=1e-5, atol=1e-12,
                             err_msg=f"mean_kl ({case})")


def test_logit_parity_on_device_validates():
  x = np.zeros((2, 5), np.float32)
  with pytest.raises(ValueError, match="expected equal shapes"):
    metrics.logit_parity_on_device(x, x[:1])
  with pytest.raises(ValueError, match="expected float32"):
    metrics.logit_parity_on_device(x.astype(np.float64), x)
  with pytest.raises(ValueError, match="at least one position"):
    metrics.logit_parity_on_device(x[:0], x[:0])


def test_device_kl_counts_positions_dead_in_dense():
  # exp(-120) underflows to 0 in float32: the dense side gives that token no weight, but
  # the condensate side makes it as likely as the other (KL = log 2, as on the host)
  dense = np.array([[0.0, -120.0]], np.float32)
  cond = np.array([[0.0, 0.0]], np.float32)
  want = metrics.mean_kl(dense, cond)
  assert want == pytest.approx(math.log(2), rel=1e-6)
  assert metrics.logit_parity_on_device(dense, cond)["mean_kl"] == pytest.approx(want,
                                                                                rel=1e-6)


def test_device_kl_huge_divergence_stays_finite():
  rng = np.random.default_rng(2)
  dense = rng.standard_normal((3, 4096)).astype(np.float32)
  cond = dense.copy()
  cond[:, 7] += 85.0          # e^85 * 4096 terms would overflow float32
  host, dev = metrics.mean_kl(dense, cond), metrics.logit_parity_on_device(dense, cond)
  assert np.isfinite(dev["mean_kl"])
  np.testing.assert_allclose(dev["mean_kl"], host, rtol=1e-4)
  with pytest.raises(ValueError, match="chunk=0"):
    metrics.logit_parity_on_device(dense, cond, chunk=0)
