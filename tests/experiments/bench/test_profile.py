"""experiments.bench.profile: aggregation of a trace's device events."""

import jax.numpy as jnp
import pytest

from experiments.bench import profile as kernel_profile


def _trace():
  meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
          dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU"))]
  ev = [dict(ph="X", pid=1, name="sort_20_1", ts=0.0, dur=3.0),
        dict(ph="X", pid=1, name="sort_21_1", ts=3.0, dur=2.0),
        dict(ph="X", pid=1, name="condensate_block_decode", ts=10.0, dur=8.0),
        dict(ph="X", pid=2, name="host_work", ts=0.0, dur=100.0),    # not a device row
        dict(ph="i", pid=1, name="marker", ts=5.0)]                    # not a complete event
  return dict(traceEvents=meta + ev)


def test_kernel_times_sums_device_events_by_name_and_kind():
  res = kernel_profile.kernel_times(_trace(), "GPU")
  assert res["busy_us"] == 13.0
  assert res["span_us"] == 18.0                    # 0 .. 10 + 8
  assert res["kernels"][0] == ("condensate_block_decode", 8.0, 1)
  assert ("sort", 5.0, 2) in res["kinds"]
  assert all(n != "host_work" for n, _, _ in res["kernels"])
  text = kernel_profile.format_profile("t", res)
  assert "| 5.00 | 2.0 | `sort` |" in text and "3 kernel launches" in text


def test_no_device_events_is_reported():
  res = kernel_profile.kernel_times(_trace(), "TPU")
  assert res["kernels"] == [] and res["busy_us"] == 0.0
  assert "no device kernel events" in kernel_profile.format_profile("t", res)


def test_profile_runs_and_validates(tmp_path):
  # on CPU the trace has no device rows, but the traced loop must run and parse
  res = kernel_profile.profile(lambda q: q * 2, jnp.ones((2, 3)), (), iterations=2,
                               device="NO_SUCH_DEVICE", log_dir=str(tmp_path))
  assert res["iterations"] == 2 and res["kernels"] == []
  with pytest.raises(ValueError, match="iterations=0"):
    kernel_profile.profile(lambda q: q, jnp.ones((2, 3)), (), iterations=0)
