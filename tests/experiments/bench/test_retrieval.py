"""The needle retrieval job (experiments/bench/retrieval.py) end to end on CPU, tiny."""

import json

import numpy as np

from experiments import cli
from experiments.bench import retrieval


def test_needles_are_where_the_probe_says():
  rng = np.random.default_rng(0)
  q, k, v, where = retrieval.needle_qkv(rng, 512, 4, 2, 32, needles=3, gain=1.0,
                                        offset=3.0, outliers=2, outlier_scale=8.0,
                                        query_noise=0.3)
  scores = np.einsum("hd,shd->hs", q[0, 0], np.repeat(k[0], 2, axis=1))
  for h in range(4):   # needles stand out of their head's noise (about its maximum)
    noise = np.delete(scores[h], where[h])
    assert scores[h, where[h]].min() > np.quantile(noise, 0.99)
    assert np.median(scores[h, where[h]]) > np.quantile(noise, 0.999)
    assert (v[0, where[h], h // 2].sum(0) > 0).sum() == 3


def test_retrieval_job_runs_and_indexed_keeps_what_exact_keeps(tmp_path):
  config = cli.load_config("retrieval.py:size=smoke")
  config.lengths = (1024,)
  config.plots = True
  result = retrieval.run(config, tmp_path, progress=False)
  rows = {r["mode"]: r for r in result["rows"]}
  assert set(rows) == {"exact", "indexed", "blocks"}
  assert rows["exact"]["recall"] == 1.0
  assert rows["indexed"]["recall"] == rows["exact"]["recall"]
  assert rows["indexed"]["captured_mean"] == rows["exact"]["captured_mean"]
  assert rows["indexed"]["scored_fraction"] < rows["exact"]["scored_fraction"] == 1.0
  assert (tmp_path / "summary.md").exists() and (tmp_path / "retrieval.png").exists()
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  assert len(lines) == 3 and all(json.loads(line)["keys"] == 1024 for line in lines)
  again = retrieval.run(config, tmp_path, progress=False)       # resumes: nothing new
  assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
  assert again["rows"] == result["rows"]


def test_timed_steps_report_their_own_quality_beside_the_time(tmp_path):
  # CPU: the kernels are interpreted, so the times mean nothing; the columns are checked
  config = cli.load_config("retrieval.py:size=smoke,timing=true")
  config.lengths, config.modes, config.plots = (1024,), ("indexed",), False
  result = retrieval.run(config, tmp_path, progress=False)
  row = result["rows"][0]
  for name in ("step_s", "scan_s", "scan_topc_s", "cudnn_s", "setup_s"):
    assert row[name] > 0, name
  assert row["step_recall"] == row["recall"] == 1.0      # the step finds what the spec finds
  assert row["step_eps_covers_dropped"] and row["step_eps_bound_max"] <= 1.0
  assert row["step_kernel_err"] < 1e-5
  # the same set as the spec, its captured mass computed apart (float32 rounding)
  assert abs(row["step_captured_mean"] - row["captured_mean"]) < 1e-6
  # bytes the step must read: the packed index (4 bits: 16 + 8 B per key and KV head at
  # d = 32) + candidates' keys + the set's K/V; dense reads K and V
  s, hkv, hq, d = 1024, config.kv_heads, config.q_heads, config.head_dim
  c, k = 4 * config.attention.top_k, config.attention.top_k
  static = config.attention.anchor + config.attention.window
  assert row["read_bytes"] == s * hkv * 24 + hq * c * d * 4 + 2 * (hq * k + hkv * static) * d * 4
  assert "Timed decode steps" in result["table"]
