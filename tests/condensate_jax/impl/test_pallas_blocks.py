"""`implementation="pallas"` for each block mode against the XLA specification (the
kernels against their own references: tests/pallas_kernels)."""

import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj


def _qkv(seed, b, t, s, hq, hkv, d, dtype=jnp.float32, gain=1.0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d)) * gain
  k, v = rng.standard_normal((2, b, s, hkv, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


MODES = [("blocks", dict(top_blocks=2)), ("certified", dict(top_blocks=2, epsilon=1e-2, bounds="blocks")),
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
