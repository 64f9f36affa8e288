"""The parity runner end to end, in process, on a small random model (tests/experiments/
fake_lm.py) that calls the real attention library."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from condensate_jax import attention as attention_lib
from experiments import cli, grid, parity
from experiments.errors import GateFailure, ModelUnavailable
from tests.experiments import fake_lm

# smoke.py: 2 prompts x (covering point + top_k (4, 16) x window (8, 32)) + 2 dense rows.
ROWS = 2 * 5 + 2


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  lm = fake_lm.FakeLM()
  result = parity.run(cli.load_config("smoke.py"), workdir, load_model=fake_lm.loader(lm),
                      progress=False)
  return workdir, result, lm


def test_smoke_writes_every_output(smoke_run):
  workdir, result, _ = smoke_run
  for name in ("manifest.json", "results.jsonl", "summary.md", "heatmap_greedy.png",
               "heatmap_logit_diff.png", "captured_mass.png"):
    assert (workdir / name).stat().st_size > 0, name
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["config"]["name"] == "smoke"
  assert manifest["packages"]["jax"] and manifest["device"]["platform"]
  assert "commit" in manifest["git"]
  rows = _rows(workdir)
  assert len(rows) == ROWS == result["computed"]
  assert sum(r["kind"] == "dense" for r in rows) == 2
  assert len({r["key"] for r in rows}) == ROWS
  summary = (workdir / "summary.md").read_text()
  assert summary.count("\n| 1") == 5  # one table row per grid point
  assert "(covers all)" in summary


def test_smoke_numbers_are_real(smoke_run):
  workdir, result, _ = smoke_run
  rows = [r for r in _rows(workdir) if r["kind"] == "condensate"]
  covering = [r for r in rows if r["point"]["covering"]]
  small = [r for r in rows if r["point_key"] == "a1-w8-k4"]
  assert len(covering) == 2 and all(r["covers"] for r in covering)
  for r in covering:
    assert r["bitwise_frac"] == 1.0 and r["max_ulp_diff"] == 0 and r["greedy_exact"]
    assert r["keys_read_frac"] == 1.0 and r["certified_eps_max"] == 0.0
  for r in small:  # 13 of 112 keys on random weights: not exact
    assert not r["covers"]
    assert r["bitwise_frac"] < 1.0 and r["max_abs_logit_diff"] > 0
    assert 0.0 < r["keys_read_frac"] < 1.0 and 0.0 < r["captured_mass_min"] < 1.0
    assert r["certified_eps_max"] > 0.0
    assert r["certified_eps_max"] >= r["dropped_mass_max"] * (1 - 1e-4)
    assert math.isfinite(r["mean_kl"]) and r["mean_kl"] > 0
    assert len(r["tokens"]) == 16 and r["greedy_n"] == 16
  for r in rows:
    if r["greedy_first_divergence"] is None:
      assert r["greedy_divergence_margin"] is None
    else:
      assert 0.0 <= r["greedy_divergence_margin"] < 1e3
  by_key = {e["key"]: e for e in result["summary"]}
  assert by_key["a1-w8-k4"]["keys_read_frac"] < by_key["a1-w32-k16"]["keys_read_frac"]


def test_rerun_skips_finished_rows(smoke_run):
  workdir, _, _ = smoke_run
  lm = fake_lm.FakeLM()
  result = parity.run(cli.load_config("smoke.py"), workdir, load_model=fake_lm.loader(lm),
                      progress=False)
  assert lm.calls == {"logits": 0, "generate": 0}
  assert result["computed"] == 0 and result["skipped"] == ROWS
  assert len(_rows(workdir)) == ROWS


def test_resume_after_crash_with_truncated_line(tmp_path, smoke_run):
  workdir, _, _ = smoke_run
  lines = (workdir / "results.jsonl").read_text().splitlines(keepends=True)
  # Keep the first prompt's rows and two rows of the second; the third was mid-write.
  kept = lines[:8]
  (tmp_path / "results.jsonl").write_text("".join(kept) + lines[8][:25])
  lm = fake_lm.FakeLM()
  result = parity.run(cli.load_config("smoke.py"), tmp_path, load_model=fake_lm.loader(lm),
                      progress=False)
  # Second prompt: its dense reference once, then 4 missing points: 1 generate + 1 logits each.
  assert result["computed"] == ROWS - 8
  assert lm.calls == {"logits": 1 + 4, "generate": 1 + 4}
  rows = _rows(tmp_path)
  assert len(rows) == ROWS and len({r["key"] for r in rows}) == ROWS
  old = {r["key"]: r for r in _rows(workdir)}
  for r in rows:  # recomputed rows reproduce the first run
    assert r["tokens"] == old[r["key"]]["tokens"]
    if r["kind"] == "condensate":
      assert r["max_abs_logit_diff"] == old[r["key"]]["max_abs_logit_diff"]


def _broken(q, k, v, *args, **kwargs):
  """The real masked implementation plus an error of 1e-3 in every output."""
  out = attention_lib.resolve_implementation("xla_masked", kwargs["spec"])(q, k, v, *args,
                                                                          **kwargs)
  if kwargs.get("return_stats"):
    return out[0] + jnp.asarray(1e-3, out[0].dtype), out[1]
  return out + jnp.asarray(1e-3, out.dtype)


def test_gate_fails_on_a_broken_implementation(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(attention_lib.REGISTERED, "broken_for_test", _broken)
  config = cli.load_config("smoke.py")
  config.attention.implementation = "broken_for_test"
  with pytest.raises(GateFailure, match="exactness gate FAILED"):
    parity.run(config, tmp_path, load_model=fake_lm.loader(), progress=False)
  assert not (tmp_path / "summary.md").exists()
  assert len(_rows(tmp_path)) == 2  # the dense row and the failing covering row
  # Resuming does not hide it; the CLI body exits non-zero with the message.
  monkeypatch.setattr(parity, "load_language_model", lambda c, l=None: fake_lm.FakeLM())
  assert cli.main(config, str(tmp_path)) == 1
  err = capsys.readouterr().err
  assert "exactness gate FAILED" in err and "broken_for_test" in err
  assert "Traceback" not in err


def test_model_that_cannot_load_gives_the_offline_hint(tmp_path, capsys):
  class HubOffline(OSError):
    pass

  def load_model(name, dtype="float32"):
    raise HubOffline(f"{name}: the Hugging Face hub is unreachable and no local copy exists")

  config = cli.load_config("gpt2_parity.py")
  with pytest.raises(ModelUnavailable) as err:
    parity.run(config, tmp_path, load_model=load_model, progress=False)
  message = str(err.value)
  assert "smollm2_parity.py" in message and "--config.model.path=" in message
  assert "gpt2" in message


def test_prompt_longer_than_context_is_refused(tmp_path):
  config = cli.load_config("smoke.py")
  config.prompts.lengths = (500,)  # + 16 new tokens > 512
  with pytest.raises(ValueError, match="prompts.lengths"):
    parity.run(config, tmp_path, load_model=fake_lm.loader(), progress=False)


def test_smoke_config_with_the_registry_model(tmp_path):
  """CI's smoke run: the real "tiny-random" model of the registry, default loader."""
  result = parity.run(cli.load_config("smoke.py"), tmp_path, progress=False)
  rows = _rows(tmp_path)
  assert len(rows) == ROWS == result["computed"]
  covering = [r for r in rows if r["kind"] == "condensate" and r["point"]["covering"]]
  assert covering and all(r["bitwise_frac"] == 1.0 and r["greedy_exact"] for r in covering)
  assert all((tmp_path / n).exists() for n in ("summary.md", "captured_mass.png"))


def test_block_selection_points_run_and_are_keyed_apart(tmp_path):
  """attention.selection reaches the spec of every non-gate point; the gate point stays
  exact; rows of different selections never collide on resume."""
  from experiments import cli, parity
  config = cli.load_config("smoke.py")
  config.attention.top_k = (8,)
  config.attention.window = (8,)
  config.prompts.num = 1
  config.generate.new_tokens = 4
  config.plots = False
  exact = parity.run(config, tmp_path, progress=False)
  config.attention.selection = "blocks"
  config.attention.block_size = 16
  config.attention.top_blocks = 1
  config.resume = "extend"       # another config's rows into the same workdir
  blocks = parity.run(config, tmp_path, progress=False)
  assert exact["computed"] == 3 and blocks["computed"] == 1  # gate point reused
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert sorted(r.get("selection", "-") for r in rows) == ["-", "blocks", "exact", "exact"]
  config.attention.top_blocks = -1
  with pytest.raises(ValueError, match="top_blocks=-1"):
    parity.run(config, tmp_path, progress=False)


def _nudged(q, k, v, q_positions, kv_lengths, *, spec, causal, sliding_window, scale,
            return_stats):
  """Gathered attention plus a 1e-3 relative error: wrong beyond float rounding."""
  res = attention_lib.resolve_implementation("xla_gathered", spec)(
      q, k, v, q_positions, kv_lengths, spec=spec, causal=causal,
      sliding_window=sliding_window, scale=scale, return_stats=return_stats)
  out, stats = res if return_stats else (res, None)
  out = out * (1 + 1e-3)
  return (out, stats) if return_stats else out


def test_gate_for_non_bitwise_implementations(tmp_path, monkeypatch):
  """xla_gathered sums in another order: its gate is float-rounding tolerance plus
  identical tokens; it passes, while a 1e-3 error in the same path fails."""
  config = cli.load_config("smoke.py")
  config.attention.implementation = "xla_gathered"
  config.plots = False
  result = parity.run(config, tmp_path / "gathered", load_model=fake_lm.loader(),
                      progress=False)
  covering = [r for r in _rows(tmp_path / "gathered") if r.get("kind") == "condensate"
              and r["covers"]]
  assert covering and all(r["exact"] for r in covering) and result["summary"]
  assert any(r["bitwise_frac"] < 1.0 for r in covering)  # really not bitwise
  monkeypatch.setitem(attention_lib.REGISTERED, "nudged_for_test", _nudged)
  config.attention.implementation = "nudged_for_test"
  with pytest.raises(GateFailure, match="up to float rounding"):
    parity.run(config, tmp_path / "nudged", load_model=fake_lm.loader(), progress=False)


def test_gate_message_survives_nan_rows_on_resume(tmp_path):
  """A stored failing gate row with NaN (stored as the string "nan") still gives the
  GateFailure message on resume, not a formatting crash."""
  row = {"point_key": "a1-w8-k99", "prompt": {"id": "p"}, "implementation": "xla",
         "bitwise_frac": "nan", "max_abs_logit_diff": "nan", "max_ulp_diff": 0,
         "greedy_equal": 0, "greedy_n": 4}
  assert "max |dlogit| nan" in parity._gate_message(row)  # pylint: disable=protected-access


def test_aggregate_propagates_nan_whatever_the_order():
  from experiments import report
  point = grid.GridPoint(1, 8, 4)
  base = {"point_key": point.key, "greedy_first_divergence": None, "greedy_exact": True,
          "covers": False, "bitwise_frac": 0.5, "max_ulp_diff": 1, "mean_kl": 0.1,
          "top1_agreement": 1.0, "greedy_prefix": 4, "greedy_n": 4,
          "captured_mass_min": 0.9, "captured_mass_mean": 0.95, "dropped_mass_max": 0.1,
          "dropped_mass_mean": 0.05, "certified_eps_max": 0.2, "keys_read_frac": 0.5,
          "seconds": 1.0, "max_abs_logit_diff": 0.5}
  bad = dict(base, max_abs_logit_diff="nan", captured_mass_min="nan")
  for rows in ([base, bad], [bad, base]):
    entry = report.aggregate(rows, [point])[0]
    assert math.isnan(entry["max_abs_logit_diff"]) and math.isnan(entry["captured_mass_min"])


def test_sampled_parity_run_on_a_real_model(tmp_path):
  """generate.temperature > 0: dense and condensate sample with the same seed; the
  covering point draws the same tokens from the same distribution (TV 0), a small set
  reports a real distance, and the summary says what was compared."""
  from configs import common  # pylint: disable=import-outside-toplevel
  config = common.parity_config(name="sampled", model="tiny-random", top_k=(4,),
                                window=(8,), lengths=(48,), num_prompts=1, new_tokens=8)
  config.plots = False
  config.generate.temperature, config.generate.top_p, config.generate.seed = 0.9, 0.95, 3
  parity.run(config, tmp_path, progress=False)
  rows = _rows(tmp_path)
  dense = [r for r in rows if r["kind"] == "dense"]
  assert len(dense) == 1 and dense[0]["generate_matches_teacher_forced_argmax"]
  assert dense[0]["decoding"]["temperature"] == 0.9 and "|T0.9-p0.95-s3|" in dense[0]["key"]
  cover = [r for r in rows if r["kind"] == "condensate" and r["covers"]]
  small = [r for r in rows if r["kind"] == "condensate" and not r["covers"]]
  assert len(cover) == 1 and cover[0]["exact"] and cover[0]["greedy_exact"]
  assert cover[0]["sample_tv_max"] == 0.0 and cover[0]["decoding"] == "sampled"
  assert len(small) == 1 and 0 < small[0]["sample_tv_mean"] <= small[0]["sample_tv_max"] <= 1
  summary = (tmp_path / "summary.md").read_text()
  assert "sampled exact" in summary and "sample TV mean" in summary
  assert "temperature 0.9, top-p 0.95, seed 3" in summary
  config.generate.temperature = -0.5
  with pytest.raises(Exception, match="generate.temperature=-0.5"):
    parity.run(config, tmp_path / "bad", progress=False)


def _stats_nudged(rel):
  def fn(q, k, v, q_positions, kv_lengths, *, spec, causal, sliding_window, scale,
         return_stats):
    """The masked path, off by `rel` only in the program that returns stats."""
    res = attention_lib.resolve_implementation("xla_masked", spec)(
        q, k, v, q_positions, kv_lengths, spec=spec, causal=causal,
        sliding_window=sliding_window, scale=scale, return_stats=return_stats)
    return (res[0] * (1 + rel), res[1]) if return_stats else res
  return fn


def test_gate_reads_the_program_without_stats(tmp_path, monkeypatch):
  """The covering row's logits (bitwise_frac) come from the no-stats program; the stats
  program's own bits are recorded beside them and must match dense to float rounding:
  a rounding-size difference there passes, a 1e-2 one fails the gate."""
  config = cli.load_config("smoke.py")
  config.prompts.num = 1
  config.plots = False
  monkeypatch.setitem(attention_lib.REGISTERED, "stats_nudged_for_test", _stats_nudged(1e-6))
  config.attention.implementation = "stats_nudged_for_test"
  parity.run(config, tmp_path / "ulp", progress=False)    # the registry's tiny-random model
  covering = [r for r in _rows(tmp_path / "ulp") if r.get("kind") == "condensate"
              and r["covers"]]
  assert covering and all(r["exact"] and r["bitwise_frac"] == 1.0 for r in covering)
  assert all(r["stats_program_bitwise_frac"] < 1.0 for r in covering)
  assert all(r["stats_program_max_abs_logit_diff"] > 0 for r in covering)
  # another name: the model's compiled programs are keyed by the implementation's name
  monkeypatch.setitem(attention_lib.REGISTERED, "stats_broken_for_test", _stats_nudged(1e-2))
  config.attention.implementation = "stats_broken_for_test"
  with pytest.raises(GateFailure):
    parity.run(config, tmp_path / "broken", progress=False)


def test_gate_holds_with_attention_over_query_chunks(tmp_path, monkeypatch):
  """A budget that chunks every teacher-forced and prefill call (dense and condensate
  alike) keeps the covering point bitwise dense on the registry model."""
  monkeypatch.setattr(attention_lib, "QUERY_CHUNK_ELEMENTS", 64)
  jax.clear_caches()     # the budget is read when a program is traced
  config = cli.load_config("smoke.py")
  config.prompts.num = 1
  config.plots = False
  parity.run(config, tmp_path, progress=False)
  covering = [r for r in _rows(tmp_path) if r.get("kind") == "condensate" and r["covers"]]
  assert covering and all(r["exact"] and r["bitwise_frac"] == 1.0 for r in covering)
