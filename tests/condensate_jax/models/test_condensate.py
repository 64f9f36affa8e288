"""Condensate attention inside the models: exactness when the set covers every key,
a real difference when it does not, pillar (dense) layers, and the stacked stats."""

from __future__ import annotations

import numpy as np
import pytest

from condensate_jax import CondensateSpec
from condensate_jax.weights.registry import TINY_FAMILIES, load_model

T = 48


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def lm(request):
  return load_model(f"tiny-random-{request.param}")


def _tokens(b=2, t=T, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, t)).astype(np.int32)


def test_covering_spec_is_bitwise_dense(lm):
  tokens = _tokens()
  dense = np.asarray(lm.logits(tokens))
  for spec in (CondensateSpec(anchor=0, window=T, top_k=0),
               CondensateSpec(anchor=4, window=8, top_k=T - 12),
               CondensateSpec(anchor=1, window=1, top_k=1, dense_layers=(0, 1))):
    got = np.asarray(lm.logits(tokens, attention=spec))
    assert np.array_equal(got, dense), (spec, np.abs(got - dense).max())


def test_covering_spec_generate_is_dense(lm):
  tokens = _tokens(t=12)
  spec = CondensateSpec(anchor=1, window=4, top_k=32)  # budget 37 >= 12 + 20 keys
  np.testing.assert_array_equal(np.asarray(lm.generate(tokens, 20, attention=spec)),
                                np.asarray(lm.generate(tokens, 20)))


def test_small_spec_changes_logits(lm):
  tokens = _tokens()
  dense = np.asarray(lm.logits(tokens))
  spec = CondensateSpec(anchor=1, window=4, top_k=2)
  got = np.asarray(lm.logits(tokens, attention=spec))
  budget = spec.budget
  # Queries that see at most `budget` keys are untouched; later ones differ.
  np.testing.assert_array_equal(got[:, :budget], dense[:, :budget])
  assert np.abs(got[:, budget:] - dense[:, budget:]).max() > 1e-2


def test_stats_shapes_and_pillar_layer(lm):
  tokens = _tokens()
  spec = CondensateSpec(anchor=1, window=4, top_k=2, dense_layers=(0,))
  logits, stats = lm.logits(tokens, attention=spec, return_stats=True)
  cfg = lm.config
  for field in stats:
    assert field.shape == (cfg.num_layers, 2, cfg.num_heads, T)
  visible = np.asarray(stats.visible)
  window = getattr(cfg, "sliding_window", None)
  pos = np.arange(T)
  for layer in range(cfg.num_layers):
    w = _layer_window(cfg, layer)
    want = np.minimum(pos + 1, w) if w else pos + 1
    assert (visible[layer] == want).all(), (layer, window)
  # pillar layer 0: dense
  assert (np.asarray(stats.captured_mass[0]) == 1).all()
  assert (np.asarray(stats.dropped_mass_bound[0]) == 0).all()
  np.testing.assert_array_equal(stats.set_size[0], stats.visible[0])
  # condensate layer 1: the set is the budget wherever more keys are visible
  size = np.asarray(stats.set_size[1])
  assert (size == np.minimum(visible[1], spec.budget)).all()
  captured = np.asarray(stats.captured_mass[1])
  assert (captured <= 1 + 1e-6).all() and (captured[..., visible[1][0] > 7] < 1).any()
  bound = np.asarray(stats.dropped_mass_bound[1])
  assert (np.asarray(stats.dropped_mass[1]) <= bound + 1e-6).all()


def test_dense_stats(lm):
  _, stats = lm.logits(_tokens(), return_stats=True)
  assert (np.asarray(stats.captured_mass) == 1).all()
  assert (np.asarray(stats.dropped_mass) == 0).all()
  np.testing.assert_array_equal(stats.keys_scored, stats.visible)


def _layer_window(cfg, layer):
  if hasattr(cfg, "is_sliding"):
    return cfg.sliding_window if cfg.is_sliding(layer) else None
  if hasattr(cfg, "window"):
    return cfg.window(layer)
  return None


def test_cached_decode_with_spec_matches_teacher_forcing(lm):
  """Condensate decode through a padded cache (S_max keys, kv_lengths) selects the same
  sets as the teacher-forced pass over exactly T keys."""
  tokens = _tokens(t=40, seed=3)
  spec = CondensateSpec(anchor=2, window=5, top_k=3)
  want = np.asarray(lm.logits(tokens, attention=spec))
  cache = lm.init_cache(2, 64)
  logits, cache = lm.step(tokens[:, :16], cache, attention=spec)
  got = [np.asarray(logits)]
  for t in range(16, 40):
    logits, cache = lm.step(tokens[:, t:t + 1], cache, attention=spec)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=0, atol=2e-5)
  assert np.abs(want - np.asarray(lm.logits(tokens))).max() > 1e-2  # the spec mattered
