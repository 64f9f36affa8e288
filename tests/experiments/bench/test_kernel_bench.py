"""The kernel benchmark job runs end to end on its tiny smoke cases (CPU: interpret mode;
timings meaningless, only the plumbing and the pallas-vs-xla agreement are checked)."""

import json

from experiments import cli


def test_kernel_bench_smoke(tmp_path):
  config = cli.load_config("kernel_bench.py:cases=smoke")
  assert config.job == "kernel_bench"
  result, workdir = cli.run_job(config, str(tmp_path))
  data = json.loads((tmp_path / "results.json").read_text())
  assert [r["case"] for r in data["rows"]] == ["tiny_decode", "tiny_prefill"]
  for row in data["rows"]:
    for name in ("dense_xla", "condensate_xla", "condensate_pallas", "selection_only",
                 "scores_only", "gather_kernel_only"):
      assert row[name + "_ms"] > 0, (row["case"], name, row.get(name + "_error"))
    assert row["max_abs_diff_pallas_vs_xla"] < 2e-2  # bf16
    assert row["gathered_bytes"] > 0
  assert (tmp_path / "table.md").read_text() == result["table"] + "\n"
  assert "| tiny_decode | 1 | 1 | 256 |" in result["table"]
