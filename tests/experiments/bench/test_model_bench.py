"""model_bench (issue #14): the job runs, its parity columns mean what they say, it resumes."""

import numpy as np

from experiments import cli
from experiments.bench import model_bench


def _small(config):
  """One tiny model, batch 1, 4 tokens, the indexed spec: the smoke config cut to fit the
  suite (the blocks spec runs in the GPU smoke run; its kernels are slow to interpret)."""
  config.models = {"tiny-llama": dict(config.models["tiny-llama"], lengths=(80,))}
  config.batches = (1,)
  config.new_tokens = 4
  config.short = 32
  config.specs = {"indexed": config.specs["indexed"]}
  config.plots = False
  return config


def test_model_bench_runs_and_resumes(tmp_path):
  config = _small(cli.load_config("model_bench.py:size=smoke"))
  result = model_bench.run(config, tmp_path, progress=False)
  rows = {r["spec"]: r for r in result["rows"]}
  assert set(rows) == {"dense", "indexed"}
  dense = rows["dense"]
  assert dense["greedy_match"] == 1.0 and dense["mean_kl"] == 0.0
  for name in ("indexed",):
    r = rows[name]
    assert 0.0 <= r["greedy_match"] <= 1.0 and 0 <= r["first_divergence"] <= 4
    assert np.isfinite(r["mean_kl"]) and r["mean_kl"] >= 0.0 and r["max_kl"] >= r["mean_kl"]
    assert r["prefill_s"] > 0 and r["step_s"] >= 0
  assert "| tiny-llama | 80 | 1 | indexed |" in result["table"]
  assert (tmp_path / "summary.md").exists() and result["computed"] == 2
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  # a resumed table reads the stored rows (non-finite floats stored as strings)
  assert model_bench.table([dict(rows["dense"], tokens_per_s="nan")]).count("nan") == 1
  again = model_bench.run(config, tmp_path, progress=False)
  assert (tmp_path / "results.jsonl").read_text().splitlines() == lines   # nothing redone
  assert again["computed"] == 0 and again["skipped"] == 2
  assert [r["key"] for r in again["rows"]] == [r["key"] for r in result["rows"]]


def test_forced_parity_of_dense_against_itself_is_zero():
  """The KL column compares two caches fed the same tokens: dense vs dense reads 0."""
  config = _small(cli.load_config("model_bench.py:size=smoke"))
  lm = model_bench._load(config, config.models["tiny-llama"])
  tokens = model_bench.prompt_tokens(lm, 24, 1, 0)
  forced = np.asarray(lm.generate(tokens, 2))
  parity = model_bench.forced_parity(lm, tokens, forced, None)
  assert parity["mean_kl"] == 0.0 and parity["bitwise_frac"] == 1.0


def test_greedy_match():
  d = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
  c = np.array([[1, 2, 3, 4], [1, 5, 3, 4]])
  assert model_bench.greedy_match(d, c) == (7 / 8, 1)
  assert model_bench.greedy_match(d, d) == (1.0, 4)


def test_the_timed_decode_loop_makes_generates_tokens():
  """time_generate's timed loop (from the prefilled cache, one untimed step before it)
  ends on the token lm.generate ends on: it runs the real decode steps."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  from condensate_jax import CondensateSpec  # pylint: disable=import-outside-toplevel
  from condensate_jax.models import fast_path  # pylint: disable=import-outside-toplevel
  from condensate_jax.weights import tiny  # pylint: disable=import-outside-toplevel
  lm = tiny.tiny_random("llamalike")
  spec = CondensateSpec(anchor=4, window=16, top_k=24, selection="indexed", candidates=30)
  tokens = np.random.default_rng(0).integers(0, lm.vocab_size, (2, 90)).astype(np.int32)
  n = 5
  want = np.asarray(lm.generate(tokens, n, spec, implementation="fast"))
  cache = model_bench._empty_cache(lm, 2, 90 + n, spec)   # pylint: disable=protected-access
  last, cache = lm.prefill(tokens, cache, spec, implementation="fast")
  logits, cache = lm.step(jnp.argmax(last, -1)[:, None].astype(jnp.int32), cache, spec,
                          implementation="fast")
  tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  np.testing.assert_array_equal(np.asarray(tok), want[:, 1])
  tok, cache = model_bench.decode_loop(lm.graphdef, lm.state, tok, cache, attention=spec,
                                       steps=n - 2)
  np.testing.assert_array_equal(np.asarray(tok), want[:, -1])
  np.testing.assert_array_equal(np.asarray(cache.lengths), [90 + n - 1] * 2)
  _, step_s, out = model_bench.time_generate(lm, tokens, n, spec, repeats=1)
  np.testing.assert_array_equal(out, want)
  assert step_s > 0
  config = _small(cli.load_config("model_bench.py:size=smoke"))
  config.new_tokens = 2
  with pytest.raises(ValueError, match="config.new_tokens=2"):
    model_bench.run(config, "/tmp/unused_model_bench", progress=False)
