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
