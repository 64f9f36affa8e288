"""lm.generate for real use: ragged batches, EOS stop, sampling by seed, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensate_jax import CondensateSpec, metrics
from condensate_jax import generate as gen
from condensate_jax.weights.registry import load_model

N = 8
# Small sets on prompts of 23-41 tokens: every mode really selects (none covers).
SPECS = {
    "dense": None,
    "exact": CondensateSpec(anchor=2, window=4, top_k=4),
    "indexed": CondensateSpec(anchor=2, window=4, top_k=4, selection="indexed"),
    "blocks": CondensateSpec(anchor=2, window=4, top_k=8, selection="blocks",
                             block_size=8, top_blocks=1),
    "certified": CondensateSpec(anchor=2, window=4, top_k=2, selection="certified",
                                epsilon=1e-2),
}


@pytest.fixture(scope="module")
def lm():
  return load_model("tiny-random")


def _ragged(lengths, seed=0, pad=77):
  rng = np.random.default_rng(seed)
  rows = [rng.integers(0, 256, n) for n in lengths]
  batch = np.full((len(rows), max(lengths)), pad, np.int32)
  for i, row in enumerate(rows):
    batch[i, :len(row)] = row
  return rows, batch


@pytest.mark.parametrize("name", list(SPECS))
def test_ragged_batch_equals_each_prompt_alone(lm, name):
  spec = SPECS[name]
  lengths = [41, 23, 31]
  rows, batch = _ragged(lengths)
  got = np.asarray(lm.generate(batch, N, attention=spec, prompt_lengths=lengths))
  for i, row in enumerate(rows):
    alone = np.asarray(lm.generate(row[None], N, attention=spec))[0]
    np.testing.assert_array_equal(got[i], alone, err_msg=f"row {i} ({name})")
  # the padding really is ignored: other pad ids give the same tokens
  _, other = _ragged(lengths, pad=3)
  np.testing.assert_array_equal(
      np.asarray(lm.generate(other, N, attention=spec, prompt_lengths=lengths)), got)


def test_ragged_sampled_row_equals_alone_with_its_seed(lm):
  lengths = [30, 17]
  rows, batch = _ragged(lengths, seed=4)
  got = np.asarray(lm.generate(batch, N, prompt_lengths=lengths, temperature=1.0,
                               top_p=0.9, seed=[11, 12]))
  for i, row in enumerate(rows):
    alone = np.asarray(lm.generate(row[None], N, temperature=1.0, top_p=0.9,
                                   seed=[11 + i]))[0]
    np.testing.assert_array_equal(got[i], alone)


def test_eos_stops_each_row(lm):
  _, batch = _ragged([20, 20], seed=2)
  free = np.asarray(lm.generate(batch, N))
  eos = int(free[0, 3])
  got = np.asarray(lm.generate(batch, N, eos_id=eos))
  for i in range(2):
    hits = np.flatnonzero(free[i] == eos)
    stop = hits[0] + 1 if hits.size else N
    want = np.concatenate([free[i, :stop], np.full(N - stop, eos)])
    np.testing.assert_array_equal(got[i], want)
  assert (got[0, :4] == free[0, :4]).all() and (got[0, 4:] == eos).all()


def test_sampling_is_reproducible_and_seeded(lm):
  tokens = np.arange(10, 30, dtype=np.int32)[None].repeat(2, axis=0)
  a = np.asarray(lm.generate(tokens, 16, temperature=1.5, seed=5))
  np.testing.assert_array_equal(a, np.asarray(lm.generate(tokens, 16, temperature=1.5,
                                                          seed=5)))
  b = np.asarray(lm.generate(tokens, 16, temperature=1.5, seed=6))
  assert not np.array_equal(a, b)
  assert not np.array_equal(a[0], a[1])   # an int seed: rows draw independently
  # a vanishing temperature is greedy; top_p that keeps one token is greedy too
  greedy = np.asarray(lm.generate(tokens, 16))
  np.testing.assert_array_equal(np.asarray(lm.generate(tokens, 16, temperature=1e-4)),
                                greedy)
  np.testing.assert_array_equal(
      np.asarray(lm.generate(tokens, 16, temperature=2.0, top_p=1e-6)), greedy)


def test_sampler_draws_from_the_documented_distribution():
  """choose() frequencies over many keys against metrics.sampling_probs (the float64
  statement of temperature + top-p) — the two implementations agree in law."""
  logits = jnp.asarray([[2.0, 1.5, 1.0, 0.2, -1.0, 0.9, 3.0, -0.5]], jnp.float32)
  draws = 20000
  keys = jax.random.split(jax.random.key(0), draws)
  for temperature, top_p in ((0.8, 1.0), (1.3, 0.75)):
    pick = jax.vmap(lambda k: gen.choose(logits, k[None], 0, sample=True,
                                         temperature=temperature, top_p=top_p)[0])
    counts = np.bincount(np.asarray(pick(keys)), minlength=8) / draws
    want = metrics.sampling_probs(np.asarray(logits[0]), temperature, top_p)
    assert np.abs(counts - want).max() < 0.015, (temperature, top_p, counts, want)
    assert (counts[want == 0] == 0).all()       # nothing outside the nucleus


def test_sampled_parity_metric():
  rng = np.random.default_rng(0)
  d = rng.normal(size=(6, 40)).astype(np.float32)
  same = metrics.sampled_parity(d, d, 0.7, 0.9)
  assert same == {"sample_tv_mean": 0.0, "sample_tv_max": 0.0, "sample_kl_mean": 0.0}
  moved = metrics.sampled_parity(d, d + rng.normal(size=d.shape).astype(np.float32),
                                 0.7, 0.9)
  assert 0 < moved["sample_tv_mean"] <= moved["sample_tv_max"] <= 1
  assert moved["sample_kl_mean"] > 0
  probs = metrics.sampling_probs(d, 0.7, 0.9)
  np.testing.assert_allclose(probs.sum(-1), 1.0)
  assert ((probs > 0).sum(-1) < 40).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_lengths=[3]), r"prompt_lengths=\[3\]: expected 2 ints"),
    (dict(prompt_lengths=[0, 4]), r"in \[1, 4\]"),
    (dict(prompt_lengths=[5, 4]), r"in \[1, 4\]"),
    (dict(prompt_lengths=[1.0, 4.0]), "prompt_lengths"),
    (dict(eos_id=258), r"eos_id=258: expected an int in \[0, 257\]"),
    (dict(temperature=-1.0), "temperature=-1.0: expected a float >= 0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=0.0), r"top_p=0.0: expected a float in \(0, 1\]"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=[1, 2, 3]), r"seed=\[1, 2, 3\]: expected an int in \[0, 2\*\*32\) or 2"),
    (dict(seed=1.5), "seed=1.5"),
])
def test_generate_validation(lm, kwargs, match):
  with pytest.raises(ValueError, match=match):
    lm.generate(np.zeros((2, 4), np.int32), 3, **kwargs)
