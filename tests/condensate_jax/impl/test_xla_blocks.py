"""The XLA specification of block selection ("xla_blocks") against exact mode, float64
NumPy references and its own certificates."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import condensate_jax as cj
from condensate_jax import validation
from condensate_jax.selection import summaries
from experiments.bench import synthetic
from tests.references import np_blocks
from tests.references.np_reference import condensate_reference


def _bounds(mode):
  """"certified" on block summaries (its default bounds are the key index)."""
  return "blocks" if mode == "certified" else None


def _gauss(seed, b=2, t=3, s=70, hq=4, hkv=2, d=16, q_gain=2.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d)) * q_gain
  k, v = rng.standard_normal((2, b, s, hkv, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


CASES = [  # (name, shape kwargs, call kwargs)
    ("gqa_ragged", dict(), dict(kv_lengths=[70, 41])),
    ("mha_partial_block", dict(hq=2, hkv=2, s=45), dict()),
    ("mqa_prefill_window", dict(t=12, hq=3, hkv=1, s=40), dict(sliding_window=25)),
    ("noncausal", dict(t=2), dict(causal=False, q_positions=[[3, 60], [10, 20]])),
]


@pytest.mark.parametrize("name,shape,kw", CASES, ids=[c[0] for c in CASES])
def test_bounded_equals_exact(name, shape, kw):
  q, k, v = _gauss(hash(name) % 100, **shape)
  spec = cj.CondensateSpec(anchor=2, window=5, top_k=7, selection="bounded", block_size=8)
  out, stats = cj.condensate_attention(q, k, v, spec, return_stats=True, **kw)
  ex, ex_stats = cj.condensate_attention(q, k, v, spec.replace(selection="exact"),
                                         return_stats=True, **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ex), atol=2e-6, rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(stats.set_size), np.asarray(ex_stats.set_size))
  np.testing.assert_allclose(np.asarray(stats.captured_mass),
                             np.asarray(ex_stats.captured_mass), atol=1e-6)
  if "causal" not in kw and "q_positions" not in kw:
    ref = condensate_reference(q, k, v, anchor=2, window=5, top_k=7, **kw)
    ok = ~ref.ambiguous.transpose(0, 2, 1)                              # [B, T, Hq]
    np.testing.assert_allclose(np.asarray(out)[ok], ref.out[ok], atol=1e-5)


def test_bounded_bf16_equals_exact():
  q, k, v = _gauss(5, dtype=jnp.bfloat16)
  spec = cj.CondensateSpec(anchor=1, window=4, top_k=9, selection="bounded", block_size=16)
  out = cj.condensate_attention(q, k, v, spec)
  ex = cj.condensate_attention(q, k, v, spec.replace(selection="exact"))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ex, np.float32),
                             atol=1e-2, rtol=1e-2)


def test_bounded_scores_fewer_keys_on_structured_inputs():
  rng = np.random.default_rng(0)
  q, k, v = map(jnp.asarray, synthetic.topic_qkv(rng, 1, 2, 2048, 4, 2, 32,
                                                    key_noise=0.05, segment=128))
  spec = cj.CondensateSpec(anchor=4, window=32, top_k=32, selection="bounded",
                           block_size=32)
  out, stats = cj.condensate_attention(q, k, v, spec, return_stats=True)
  ex = cj.condensate_attention(q, k, v, spec.replace(selection="exact"))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ex), atol=2e-6)
  scored, visible = np.asarray(stats.keys_scored), np.asarray(stats.visible)
  assert np.all(scored >= stats.set_size)
  assert scored.sum() < 0.6 * visible.sum(), (scored.sum(), visible.sum())


@pytest.mark.parametrize("mode,rank", [("blocks", "bound"), ("certified", "bound"),
                                       ("blocks", "centre")])
def test_against_float64_reference(mode, rank):
  q, k, v = _gauss(11, t=2, s=53)
  lengths = [53, 30]
  spec = cj.CondensateSpec(anchor=2, window=4, top_k=1, selection=mode, block_size=8,
                           top_blocks=2, epsilon=1e-3, block_rank=rank,
                           bounds=_bounds(mode))
  out, stats = cj.condensate_attention(q, k, v, spec, kv_lengths=lengths,
                                       return_stats=True)
  ref_out, ref_bound, ref_size, crossing = np_blocks.reference(
      q, k, v, anchor=2, window=4, block_size=8, mode=mode, top_blocks=2, epsilon=1e-3,
      kv_lengths=lengths, rank=rank)
  # certified: skip queries whose stopping rule was within 1% of epsilon (float32 vs 64)
  ok = np.abs(crossing - 1.0) > 0.01                                   # [B, Hq, T]
  assert ok.mean() > 0.8
  np.testing.assert_array_equal(np.asarray(stats.set_size)[ok], ref_size[ok])
  np.testing.assert_allclose(np.asarray(stats.dropped_mass_bound)[ok], ref_bound[ok],
                             rtol=1e-3, atol=1e-6)
  ok_btq = ok.transpose(0, 2, 1)
  np.testing.assert_allclose(np.asarray(out)[ok_btq], ref_out[ok_btq], atol=1e-5)


def test_blocks_covering_everything_is_dense():
  q, k, v = _gauss(3, s=64)
  spec = cj.CondensateSpec(anchor=1, window=3, top_k=0, selection="blocks", block_size=8,
                           top_blocks=8)
  out, stats = cj.condensate_attention(q, k, v, spec, kv_lengths=[64, 29],
                                       return_stats=True)
  dense = cj.dense_attention(q, k, v, kv_lengths=[64, 29])
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-6)
  np.testing.assert_array_equal(np.asarray(stats.set_size), np.asarray(stats.visible))
  assert np.all(np.asarray(stats.dropped_mass_bound) == 0.0)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(validation.BLOCK_SELECTIONS),
       s=st.integers(5, 48), p=st.sampled_from([1, 4, 8]), top=st.integers(0, 4),
       anchor=st.integers(0, 3), window=st.integers(0, 6), gain=st.sampled_from([1.0, 4.0]),
       eps=st.sampled_from([1e-1, 1e-4, 2.0**-24]), centre=st.booleans())
def test_certificate_bounds_true_dropped_mass(seed, mode, s, p, top, anchor, window, gain,
                                              eps, centre):
  q, k, v = _gauss(seed, b=2, t=2, s=s, q_gain=gain)
  lengths = [s, max(1, s // 2)]
  rank = "centre" if centre and mode == "blocks" else "bound"
  spec = cj.CondensateSpec(anchor=anchor, window=window, top_k=top, selection=mode,
                           block_size=p, top_blocks=top, epsilon=eps, block_rank=rank,
                           bounds=_bounds(mode))
  _, stats = cj.condensate_attention(q, k, v, spec, kv_lengths=lengths, return_stats=True)
  bound, true = np.asarray(stats.dropped_mass_bound), np.asarray(stats.dropped_mass)
  assert np.all(bound >= true * (1 - 1e-5) - 1e-7), (bound - true).min()
  assert np.all((bound >= 0) & (bound <= 1))
  assert np.all(stats.keys_scored <= stats.visible)
  if mode == "certified":
    assert np.all(bound <= eps), bound.max()
    assert np.all(true <= eps * (1 + 1e-5))


def test_certified_meets_epsilon_and_reports_budget():
  rng = np.random.default_rng(4)
  q, k, v = map(jnp.asarray, synthetic.topic_qkv(rng, 2, 4, 1024, 4, 2, 32,
                                                    key_noise=0.05, segment=128))
  spec = cj.CondensateSpec(anchor=2, window=16, selection="certified", block_size=32,
                           top_blocks=2, epsilon=1e-3, bounds="blocks")
  out, stats = cj.condensate_attention(q, k, v, spec, return_stats=True)
  assert np.all(np.asarray(stats.dropped_mass_bound) <= 1e-3)
  assert np.all(np.asarray(stats.dropped_mass) <= 1e-3)
  sizes = np.asarray(stats.set_size)
  # the budget varies per query, and some queries stop before reading every key
  assert sizes.min() < sizes.max() and np.any(sizes < np.asarray(stats.visible))
  dense = cj.dense_attention(q, k, v)
  vmax = float(jnp.max(jnp.linalg.norm(v, axis=-1)))
  err = np.linalg.norm(np.asarray(out - dense), axis=-1)
  assert np.all(err <= 2 * 1e-3 * vmax + 1e-5)


def test_precomputed_summaries_match_built_ones():
  q, k, v = _gauss(8)
  spec = cj.CondensateSpec(anchor=1, window=4, top_k=3, selection="blocks", block_size=8,
                           top_blocks=2)
  summ = summaries.build_summaries(k, 8, [70, 33])
  a = cj.condensate_attention(q, k, v, spec, summaries=summ, kv_lengths=[70, 33])
  b = cj.condensate_attention(q, k, v, spec, kv_lengths=[70, 33])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_validation_errors():
  q, k, v = _gauss(0)
  with pytest.raises(ValueError, match="spec.selection='exact'"):
    cj.condensate_attention(q, k, v, cj.CondensateSpec(),
                            summaries=summaries.build_summaries(k, 8))
  spec = cj.CondensateSpec(selection="blocks", block_size=8)
  with pytest.raises(ValueError, match="summaries.block_size=4"):
    cj.condensate_attention(q, k, v, spec, summaries=summaries.build_summaries(k, 4))
  with pytest.raises(ValueError, match="summaries.kmin.shape"):
    cj.condensate_attention(q, k, v, spec,
                            summaries=summaries.build_summaries(k[:, :60], 8))
  with pytest.raises(ValueError, match="summaries: expected BlockSummaries"):
    cj.condensate_attention(q, k, v, spec, summaries=(1, 2))
  with pytest.raises(ValueError, match="implementation='xla_gathered'"):
    cj.condensate_attention(q, k, v, spec, implementation="xla_gathered")
  with pytest.raises(ValueError, match="CondensateSpec.block_size=0"):
    cj.CondensateSpec(selection="blocks", block_size=0)
