"""The training jobs end to end on CPU (issue #19): `distill.py:size=smoke` and
`pretrain.py:size=smoke` run, their loss falls, a rerun resumes, an interrupted run
finishes where an uninterrupted one does."""

import json
import math

import pytest

from experiments import cli
from experiments.errors import ConfigError


def _rows(result, kind):
  return sorted((r for r in result["rows"] if r["kind"] == kind), key=lambda r: r["step"])


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("distill")
  result, _ = cli.run_job(cli.load_config("distill.py:size=smoke"), workdir, progress=False)
  return result, workdir


def test_distill_smoke_lowers_the_kl_to_the_teacher(distilled):
  result, workdir = distilled
  evals = _rows(result, "eval")
  assert [r["step"] for r in evals] == [0, 6, 12]
  # before training the student is the teacher's weights under the budget
  assert evals[0]["dense_kl"] == 0 and evals[0]["dense_greedy_match"] == 1
  assert evals[0]["kl"] > 0.05
  assert evals[-1]["kl"] < 0.8 * evals[0]["kl"]
  train = _rows(result, "train")
  assert len(train) == 12 and all(math.isfinite(r["grad_norm"]) for r in train)
  assert sum(r["kl"] for r in train[-3:]) < sum(r["kl"] for r in train[:3])
  for name in ("summary.md", "distill.png", "corpus.npz", "manifest.json"):
    assert (workdir / name).exists()
  assert "ppl dense" in result["table"]
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["runs"][0]["corpus"]["heldout_tokens"] > 0


def test_distill_rerun_resumes_and_an_interrupted_run_ends_the_same(distilled, tmp_path):
  result, workdir = distilled
  again, _ = cli.run_job(cli.load_config("distill.py:size=smoke"), workdir, progress=False)
  assert again["computed"] == 0
  config = cli.load_config("distill.py:size=smoke")
  cli.job_module("distill").run(config, tmp_path, progress=False, stop_at=8)
  resumed, _ = cli.run_job(config, tmp_path, progress=False)
  assert _rows(resumed, "eval")[-1] == _rows(result, "eval")[-1]
  assert [r["loss"] for r in _rows(resumed, "train")] == [
      r["loss"] for r in _rows(result, "train")]


def test_pretrain_smoke_trains_both_arms_and_tracks_the_set(tmp_path):
  result, _ = cli.run_job(cli.load_config("pretrain.py:size=smoke"), tmp_path,
                          progress=False)
  for arm in ("dense", "condensate"):
    evals = [r for r in _rows(result, "eval") if r["arm"] == arm]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["nll_dense"] < evals[0]["nll_dense"] - 0.3
    for r in evals:
      assert 0 < r["captured_mass_min"] <= r["captured_mass_mean"] <= 1
      assert 0 <= r["certified_eps_mean"] <= 1
      assert 0 <= r["greedy_match"] <= 1
  # both arms start from the same weights
  first = {r["arm"]: r for r in _rows(result, "eval") if r["step"] == 0}
  assert first["dense"]["nll_dense"] == first["condensate"]["nll_dense"]
  assert (tmp_path / "pretrain.png").exists()
  assert (tmp_path / "dense" / "checkpoints").is_dir()


def test_bad_training_configs_are_refused(tmp_path):
  config = cli.load_config("pretrain.py:size=smoke")
  config.arms = ("dense", "sparse")
  with pytest.raises(ConfigError, match="config.arms"):
    cli.run_job(config, tmp_path / "a", progress=False)
  config = cli.load_config("distill.py:size=smoke")
  config.optim.learning_rate = -1.0
  with pytest.raises(ConfigError, match="optim.learning_rate"):
    cli.run_job(config, tmp_path / "b", progress=False)
  with pytest.raises(ValueError, match="budget"):
    cli.load_config("distill.py:budget=huge")
  for key, value, match in (("data.batch", 0, "config.data.batch=0"),
                            ("data.seq_len", 4096, "config.data.seq_len=4096"),
                            ("eval.batch", 0, "config.eval.batch=0"),
                            ("optim.b2", 1.0, "config.optim.b2=1.0"),
                            ("loss.kl", 0.0, "config.loss")):
    config = cli.load_config("distill.py:size=smoke")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=match):
      cli.run_job(config, tmp_path / key, progress=False)


def test_a_corpus_of_other_settings_is_refused(distilled):
  _, workdir = distilled
  config = cli.load_config("distill.py:size=smoke")
  config.data.holdout = 0.3
  config.resume = "extend"          # past the config check: the corpus check still holds
  with pytest.raises(ConfigError, match="corpus.npz was built with other data settings"):
    cli.run_job(config, workdir, progress=False)
