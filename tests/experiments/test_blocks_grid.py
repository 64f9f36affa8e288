"""Block-selection settings as grid axes of the parity runner (configs/smollm2_blocks.py):
the grid, the results keys (unchanged for scalar settings), validation, and a run on the
small random model of tests/experiments/fake_lm.py through the real attention library."""

import json

import pytest

from configs import common
from experiments import cli, grid, parity, report
from experiments.errors import ConfigError
from tests.experiments import fake_lm


def _block_grid_config(bounds="blocks"):
  """A block grid: exact k=8, blocks P16 x M (1, 2), certified at eps 1e-3 on block
  bounds (P16) or on the key index."""
  config = common.parity_config(name="blocks_grid", model="tiny-random", top_k=(8,),
                                window=(8,), anchor=(1,), lengths=(96,), num_prompts=1,
                                new_tokens=4, selection=("exact", "blocks", "certified"),
                                block_size=(16,), top_blocks=(1, 2), epsilon=(1e-3,))
  config.attention.bounds = bounds
  return config


def test_scalar_settings_keep_the_old_grid_and_keys():
  """A scalar config (every config before block grids) sweeps top_k with the configured
  selection, and its results keys are the strings earlier runs wrote (resume)."""
  config = cli.load_config("smoke.py")
  assert not grid.is_block_grid(config)
  points = grid.grid(config, 112)
  assert [p.key for p in points] == ["a1-w8-k103", "a1-w8-k4", "a1-w8-k16", "a1-w32-k4",
                                     "a1-w32-k16"]
  prompt = type("P", (), {"id": "p0", "sha": "abc"})()
  key = grid.keys(config, "tiny-random", prompt, points[1])
  assert key == "tiny-random|float32|p0:abc|N16|xla|dl[]|a1-w8-k4"
  config.attention.selection = "blocks"
  config.attention.block_size = 16
  config.attention.top_blocks = 1
  points = grid.grid(config, 112)
  assert len(points) == 5 and all(p.selection == "blocks" for p in points[1:])
  assert points[0].exact and points[0].selection == "exact"
  key = grid.keys(config, "tiny-random", prompt, points[1])
  assert key == ("tiny-random|float32|p0:abc|N16|xla|dl[|blocks-P16-M1-"
                 "e5.960464477539063e-08]|a1-w8-k4")
  assert points[1].key == "a1-w8-k4-blocks-P16-M1"


def test_block_grid_takes_only_the_axes_each_mode_uses():
  config = common.parity_config(
      name="g", model="tiny-random", top_k=(32, 64), window=(8,), anchor=(1,),
      selection=("exact", "blocks", "certified", "bounded"), block_size=(16, 32),
      top_blocks=(2, 4), epsilon=(1e-3, 1e-6))
  # certified on the key index (the default) sweeps epsilon only: no block size
  certified = [p for p in grid.grid(config, 600) if p.selection == "certified"]
  assert [(p.key, p.bounds) for p in certified] == [
      ("a1-w8-k0-certified-index-e0.001", "index"), ("a1-w8-k0-certified-index-e1e-06",
                                                      "index")]
  assert grid.point_spec(certified[1], config).uses_index
  config.attention.bounds = "blocks"
  assert grid.is_block_grid(config)
  grid.check_config(config)
  points = grid.grid(config, 600)[1:]
  by_mode = {m: [p for p in points if p.selection == m]
             for m in ("exact", "blocks", "certified", "bounded")}
  assert [p.top_k for p in by_mode["exact"]] == [32, 64]
  assert {(p.block_size, p.top_blocks, p.top_k) for p in by_mode["blocks"]} == {
      (16, 2, 32), (16, 4, 64), (32, 2, 64), (32, 4, 128)}
  assert {(p.block_size, p.epsilon) for p in by_mode["certified"]} == {
      (16, 1e-3), (16, 1e-6), (32, 1e-3), (32, 1e-6)}
  assert all(p.top_k == 0 and p.top_blocks == 2 for p in by_mode["certified"])
  assert {(p.top_k, p.block_size) for p in by_mode["bounded"]} == {
      (32, 16), (32, 32), (64, 16), (64, 32)}
  assert len(points) == 2 + 4 + 4 + 4
  assert len({p.key for p in points}) == len(points)
  specs = {p.key: grid.point_spec(p, config) for p in points}
  spec = specs["a1-w8-k64-blocks-P32-M2"]
  assert (spec.selection, spec.block_size, spec.top_blocks) == ("blocks", 32, 2)
  assert specs["a1-w8-k0-certified-P16-e1e-06"].epsilon == 1e-6
  assert specs["a1-w8-k0-certified-P16-e1e-06"].uses_blocks
  assert specs["a1-w8-k32"].selection == "exact"
  sweep = common.sweep_of(config)
  assert len(sweep) == len(points) and {"selection", "block_size"} <= set(sweep[0])


@pytest.mark.parametrize("key, value, match", [
    ("selection", ("exact", "topk"), "attention.selection"),
    ("selection", (), "attention.selection"),
    ("block_size", (64, 0), "attention.block_size"),
    ("top_blocks", (4, -1), "attention.top_blocks"),
    ("epsilon", (1e-3, 1.5), "attention.epsilon"),
    ("epsilon", (), "attention.epsilon"),
    ("bounds", "summaries", "attention.bounds"),
])
def test_bad_block_axes_are_refused(key, value, match):
  config = _block_grid_config()
  config.attention[key] = value
  with pytest.raises(ConfigError, match=match):
    grid.check_config(config)


def test_smollm2_blocks_config():
  for size in ("small", "medium", None):
    config = cli.load_config("smollm2_blocks.py" + (f":size={size}" if size else ""))
    grid.check_config(config)
    assert config.model.name == "smollm2-135m" and config.attention.anchor == (16,)
    assert config.attention.window == (64,)
    points = grid.grid(config, max(config.prompts.lengths) + config.generate.new_tokens)
    keys = {p.key for p in points}
    # Exact selection at the same budget as P=64 M=16 blocks, and certified at 1e-3.
    assert {"a16-w64-k1024", "a16-w64-k1024-blocks-P64-M16",
            "a16-w64-k0-certified-P64-e0.001"} <= keys
  full = {p.key for p in points}
  # The timed GPU settings (BENCHMARKS.md "Fast path").
  assert {"a16-w64-k4096-blocks-P64-M64", "a16-w64-k4096-blocks-P128-M32"} <= full
  module_doc = open(cli.CONFIG_DIR / "smollm2_blocks.py").read().split('"""')[1]
  assert module_doc.startswith("python -m experiments.run --config=smollm2_blocks.py")
  assert "Runtime" in module_doc and "Expected result" in module_doc
  with pytest.raises(ValueError, match="size"):
    cli.load_config("smollm2_blocks.py:size=huge")


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("blocks_grid")
  result = parity.run(_block_grid_config(), workdir, load_model=fake_lm.loader(),
                      progress=False)
  return workdir, result


def test_block_grid_run_measures_each_setting(grid_run):
  workdir, result = grid_run
  rows = {r["point_key"]: r for r in _rows(workdir) if r["kind"] == "condensate"}
  assert set(rows) == {"a1-w8-k91", "a1-w8-k8", "a1-w8-k16-blocks-P16-M1",
                       "a1-w8-k32-blocks-P16-M2", "a1-w8-k0-certified-P16-e0.001"}
  assert result["computed"] == 6  # + the dense row
  modes = {"a1-w8-k91": "exact", "a1-w8-k8": "exact", "a1-w8-k16-blocks-P16-M1": "blocks",
           "a1-w8-k32-blocks-P16-M2": "blocks", "a1-w8-k0-certified-P16-e0.001": "certified"}
  for key, row in rows.items():  # each row records its own settings
    assert row["selection"] == row["point"]["selection"] == modes[key]
    assert row["set_size_mean"] <= row["set_size_max"]
  m1, m2 = rows["a1-w8-k16-blocks-P16-M1"], rows["a1-w8-k32-blocks-P16-M2"]
  assert (m1["point"]["top_blocks"], m2["point"]["top_blocks"]) == (1, 2)
  # One more block read per query and group: more keys, at most as much dropped mass.
  assert 0.0 < m1["keys_read_frac"] < m2["keys_read_frac"] < 1.0
  assert m1["set_size_max"] <= 1 + 8 + 16 and m2["set_size_max"] <= 1 + 8 + 32
  assert m1["set_size_max"] > 1 + 8  # a block was read besides anchor and window
  certified = rows["a1-w8-k0-certified-P16-e0.001"]
  # The certified mode meets its target, and the certificate bounds the true mass.
  assert certified["certified_eps_max"] <= 1e-3
  assert certified["dropped_mass_max"] <= certified["certified_eps_max"] * (1 + 1e-4)
  assert certified["set_size_max"] > certified["set_size_mean"]  # budgets vary per query
  assert rows["a1-w8-k91"]["bitwise_frac"] == 1.0  # the gate point stays exact


def test_block_grid_summary_and_plots(grid_run):
  workdir, result = grid_run
  summary = (workdir / "summary.md").read_text()
  header = next(line for line in summary.splitlines() if line.startswith("| anchor"))
  cells = [c.strip() for c in header.strip("|").split("|")]
  assert cells[3:7] == ["selection", "P", "M", "eps"]
  assert "set size mean" in cells and "keys scored/visible" in cells
  assert "| 1 | 8 | 16 | blocks | 16 | 1 | - |" in summary
  assert "| 1 | 8 | 0 | certified | 16 | - | 0.001 |" in summary
  assert (workdir / "selection.png").stat().st_size > 0
  assert [e["key"] for e in report.heatmap_entries(result["summary"])] == ["a1-w8-k8"]


def test_block_grid_resumes_and_reads_rows_without_new_fields(grid_run, tmp_path):
  """Rerunning computes nothing; rows written before point_key gained the selection
  suffix and before set sizes existed still aggregate into the table."""
  workdir, _ = grid_run
  old = []
  for row in _rows(workdir):
    if row["kind"] == "condensate":
      row["point_key"] = grid.GridPoint(**row["point"]).budget_key
      for name in ("set_size_mean", "set_size_max", "set_size_last_mean"):
        row.pop(name)
    old.append(json.dumps(row))
  (tmp_path / "results.jsonl").write_text("\n".join(old) + "\n")
  lm = fake_lm.FakeLM()
  result = parity.run(_block_grid_config(), tmp_path, load_model=fake_lm.loader(lm),
                      progress=False)
  assert result["computed"] == 0 and lm.calls == {"logits": 0, "generate": 0}
  by_key = {e["key"]: e for e in result["summary"]}
  assert len(by_key) == 5
  assert by_key["a1-w8-k16-blocks-P16-M1"]["set_size_mean"] == "-"
  assert "| 1 | 8 | 16 | blocks | 16 | 1 | - |" in result["table"]


def test_block_rank_and_query_blocks_reach_the_spec_keys_and_summary(tmp_path):
  config = common.parity_config(name="opts", model="tiny-random", top_k=(8,), window=(8,),
                                anchor=(1,), lengths=(96,), num_prompts=1, new_tokens=4,
                                selection="blocks", block_size=16, top_blocks=1,
                                block_rank="centre", query_blocks=True)
  points = grid.grid(config, 100)
  spec = grid.point_spec(points[1], config)
  assert (spec.selection, spec.block_rank, spec.query_blocks) == ("blocks", "centre", True)
  gate = grid.point_spec(points[0], config)                  # the covering point: exact
  assert (gate.selection, gate.block_rank, gate.query_blocks) == ("exact", "bound", False)
  prompt = type("P", (), {"id": "p0", "sha": "abc"})()
  key = grid.keys(config, "tiny-random", prompt, points[1])
  assert key.endswith("-rcentre-qb]|a1-w8-k8")
  parity.run(config, tmp_path, load_model=fake_lm.loader(), progress=False)
  rows = [r for r in _rows(tmp_path) if r["kind"] == "condensate" and not r["covers"]]
  assert rows and all(r["block_rank"] == "centre" and r["query_blocks"] for r in rows)
  assert "| blocks centre query-blocks | 16 | 1 |" in (tmp_path / "summary.md").read_text()
  config.attention.block_rank = "mean"
  with pytest.raises(ConfigError, match="block_rank='mean'"):
    grid.point_spec(points[1], config)
  # a typo is refused even where the option would not apply (exact selection)
  exact = common.parity_config(name="e", model="tiny-random", top_k=(8,), window=(8,),
                               block_rank="centr")
  with pytest.raises(ConfigError, match="block_rank='centr'"):
    grid.check_config(exact)


def test_indexed_points_in_a_grid_and_a_run(tmp_path):
  config = common.parity_config(name="indexed_grid", model="tiny-random", top_k=(4, 8),
                                window=(8,), anchor=(1,), lengths=(96,), num_prompts=1,
                                new_tokens=4, selection=("exact", "indexed"))
  config.attention.candidates = 16
  grid.check_config(config)
  points = grid.grid(config, 100)[1:]
  indexed = [p for p in points if p.selection == "indexed"]
  assert [p.key for p in indexed] == ["a1-w8-k4-indexed", "a1-w8-k8-indexed"]
  spec = grid.point_spec(indexed[0], config)
  assert (spec.selection, spec.index_bits, spec.candidates) == ("indexed", 4, 16)
  prompt = type("P", (), {"id": "p0", "sha": "abc"})()
  assert grid.keys(config, "tiny-random", prompt, indexed[0]).endswith(
      "|dl[|indexed-b4-c16]|a1-w8-k4")
  config.attention.index_bits = 3
  with pytest.raises(ConfigError, match=r"index_bits=3"):
    grid.check_config(config)
  config.attention.index_bits = 4
  result = parity.run(config, tmp_path, load_model=fake_lm.loader(), progress=False)
  rows = {e["key"]: e for e in result["summary"]}
  # 16 candidates of at most 95 visible keys: what exact top-k finds at k = 4 and 8
  assert rows["a1-w8-k4-indexed"]["mean_kl"] == rows["a1-w8-k4"]["mean_kl"]
  assert rows["a1-w8-k4-indexed"]["keys_scored_frac"] < 1.0


def test_certified_on_the_key_index_meets_epsilon_through_the_runner(tmp_path):
  config = common.parity_config(name="cert_index", model="tiny-random", top_k=(0,),
                                window=(8,), anchor=(1,), lengths=(96,), num_prompts=1,
                                new_tokens=4, selection="certified", epsilon=1e-3)
  result = parity.run(config, tmp_path, load_model=fake_lm.loader(), progress=False)
  rows = {r["point_key"]: r for r in _rows(tmp_path) if r["kind"] == "condensate"}
  row = rows["a1-w8-k0-certified-index-e0.001"]
  assert (row["selection"], row["bounds"]) == ("certified", "index")
  assert row["certified_eps_max"] <= 1e-3
  assert row["dropped_mass_max"] <= row["certified_eps_max"] * (1 + 1e-4)
  assert row["set_size_max"] > row["set_size_mean"]          # budgets vary per query
  assert "| 1 | 8 | 0 | certified (index) | - | - | 0.001 |" in result["table"]
