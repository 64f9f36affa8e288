"""selection="blocks" with query_blocks=True: a multi-query call selects per block of
query rows with the timed prefill's lists (`selection.prefill_lists`), so a model's
parity is measured with the sets the block-sparse prefill kernel computes."""

import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax.selection.prefill_lists import prefill_lists
from condensate_jax.weights.registry import load_model
from pallas_kernels.block_sparse import reference

SPEC = cj.CondensateSpec(anchor=3, window=20, selection="blocks", block_size=16,
                         top_blocks=1, query_blocks=True)


def _qkv(seed, t, s, hq=4, hkv=2, d=16, dtype=jnp.float32, gain=2.0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((1, t, hq, d)) * gain, dtype)
  k = jnp.asarray(rng.standard_normal((1, s, hkv, d)), dtype)
  v = jnp.asarray(rng.standard_normal((1, s, hkv, d)), dtype)
  return q, k, v


@pytest.mark.parametrize("t,s", [(96, 96), (75, 100)])   # full prompt; a later chunk
def test_equals_the_prefill_kernels_reference(t, s):
  q, k, v = _qkv(0, t, s)
  out = cj.condensate_attention(q, k, v, SPEC)
  kb, kf = prefill_lists(q, k, SPEC)
  want, _ = reference.block_prefill(q, k, v, kb, kf, block_size=16, anchor=3, window=20,
                                    scale=16**-0.5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=0, atol=1e-6)
  # and it is a different set from per-query selection of the same budget
  per_query = cj.condensate_attention(q, k, v, SPEC.replace(query_blocks=False))
  assert np.abs(np.asarray(per_query) - np.asarray(out)).max() > 1e-3


def test_cache_with_room_to_spare_and_stats():
  # keys beyond kv_lengths (an unfilled cache) and queries at positions offset + t
  q, k, v = _qkv(1, 40, 100)
  kw = dict(kv_lengths=[70], q_positions=np.arange(30, 70)[None], return_stats=True)
  out, st = cj.condensate_attention(q, k, v, SPEC, **kw)
  out2, st2 = cj.condensate_attention(q, k[:, :70], v[:, :70], SPEC, **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out2), rtol=0, atol=1e-6)
  for f in ("captured_mass", "dropped_mass_bound", "set_size", "visible", "keys_scored"):
    np.testing.assert_allclose(np.asarray(getattr(st, f)), np.asarray(getattr(st2, f)),
                               rtol=1e-6, atol=1e-7, err_msg=f)
  np.testing.assert_array_equal(np.asarray(st.visible)[0, 0], np.arange(31, 71))
  bound, true = np.asarray(st.dropped_mass_bound), np.asarray(st.dropped_mass)
  assert np.all(bound >= true * (1 - 1e-5) - 1e-7) and true.max() > 1e-3
  assert np.all(np.asarray(st.keys_scored) >= np.asarray(st.set_size))


@pytest.mark.parametrize("seed", range(6))
def test_certificate_bounds_true_dropped_mass(seed):
  q, k, v = _qkv(seed, 50, 50 + seed * 7, gain=1.0 + seed)
  spec = SPEC.replace(block_size=8, top_blocks=seed % 3, anchor=seed % 4, window=seed * 3)
  _, st = cj.condensate_attention(q, k, v, spec, return_stats=True)
  bound, true = np.asarray(st.dropped_mass_bound), np.asarray(st.dropped_mass)
  assert np.all(bound >= true * (1 - 1e-5) - 1e-7), (bound - true).min()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_covering_everything_is_dense_bitwise(dtype):
  q, k, v = _qkv(2, 64, 64, dtype=dtype)
  out = cj.condensate_attention(q, k, v, SPEC.replace(top_blocks=4))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(cj.dense_attention(q, k, v)))


def test_decode_calls_and_pallas_and_errors():
  q, k, v = _qkv(3, 1, 80)
  one = cj.condensate_attention(q, k, v, SPEC)          # T = 1: per-query selection
  np.testing.assert_array_equal(
      np.asarray(one), np.asarray(cj.condensate_attention(q, k, v,
                                                          SPEC.replace(query_blocks=False))))
  q, k, v = _qkv(4, 48, 48)
  np.testing.assert_allclose(
      np.asarray(cj.condensate_attention(q, k, v, SPEC, implementation="pallas")),
      np.asarray(cj.condensate_attention(q, k, v, SPEC)), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="query_blocks=True with causal=False"):
    cj.condensate_attention(q, k, v, SPEC, causal=False)
  with pytest.raises(ValueError, match="query_blocks=True with selection='exact'"):
    cj.CondensateSpec(query_blocks=True)
  with pytest.raises(ValueError, match="query_blocks=1"):
    cj.CondensateSpec(selection="blocks", query_blocks=1)


def test_model_prefill_through_the_cache():
  lm = load_model("tiny-random-llamalike")
  tokens = np.random.default_rng(5).integers(0, 256, (2, 40)).astype(np.int32)
  spec = cj.CondensateSpec(anchor=2, window=4, selection="blocks", block_size=4,
                           top_blocks=2, query_blocks=True)
  cached, _ = lm.step(tokens, lm.init_cache(2, 64), attention=spec)
  forced = lm.logits(tokens, attention=spec)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(forced), rtol=0, atol=2e-5)
  per_query = lm.logits(tokens, attention=spec.replace(query_blocks=False))
  assert np.abs(np.asarray(per_query) - np.asarray(forced)).max() > 1e-3
