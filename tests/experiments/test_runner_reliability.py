"""Issue #15, repros 8-10: runner failures are one line, a workdir never mixes two
configs' rows unless asked to, and a complete last row without its newline is kept."""

import json
import tempfile

import pytest

from experiments import cli, parity
from experiments.errors import ConfigError
from experiments.results import CorruptResults, ResultsStore
from tests.experiments import fake_lm


def _smoke(**changes):
  config = cli.load_config("smoke.py")
  for key, value in changes.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def _main(config, workdir, monkeypatch, capsys):
  monkeypatch.setattr(parity, "load_language_model", lambda c, l=None: fake_lm.FakeLM())
  code = cli.main(config, str(workdir))
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return code, err


def test_workdir_under_a_file_is_one_line(tmp_path, monkeypatch, capsys):
  (tmp_path / "file").write_text("")
  code, err = _main(_smoke(), tmp_path / "file" / "run", monkeypatch, capsys)
  assert code == 1 and "is not a writable directory" in err


def test_read_only_workdir_is_one_line(tmp_path, monkeypatch, capsys):
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
  code, err = _main(_smoke(), tmp_path, monkeypatch, capsys)
  assert code == 1 and "not a writable directory (PermissionError: Permission denied)" in err


def test_malformed_middle_line_is_one_line(tmp_path, monkeypatch, capsys):
  (tmp_path / "results.jsonl").write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')
  code, err = _main(_smoke(), tmp_path, monkeypatch, capsys)
  assert code == 1 and "line 2 is not valid JSON" in err
  with pytest.raises(CorruptResults):
    ResultsStore(tmp_path / "results.jsonl")


def test_unknown_implementation_is_refused_before_any_row(tmp_path, monkeypatch, capsys):
  code, err = _main(_smoke(**{"attention.implementation": "foo"}), tmp_path, monkeypatch,
                    capsys)
  assert code == 1 and "config.attention.implementation: implementation='foo'" in err
  assert not (tmp_path / "results.jsonl").exists()


def test_rerun_with_another_config_is_refused_unless_extended(tmp_path):
  loader = fake_lm.loader(fake_lm.FakeLM())
  parity.run(_smoke(), tmp_path, load_model=loader, progress=False)
  before = (tmp_path / "results.jsonl").read_text()
  other = _smoke(**{"attention.top_k": (4, 8)})
  with pytest.raises(ConfigError, match=r"holds rows of another config \(attention.top_k: "
                                        r"\[4, 16\] -> \[4, 8\]\).*resume=extend"):
    parity.run(other, tmp_path, load_model=loader, progress=False)
  assert (tmp_path / "results.jsonl").read_text() == before      # nothing written
  parity.run(_smoke(), tmp_path, load_model=loader, progress=False)  # same: resumes
  other.resume = "extend"
  result = parity.run(other, tmp_path, load_model=loader, progress=False)
  assert result["computed"] > 0
  keys = [json.loads(line)["key"] for line in (tmp_path / "results.jsonl").open()]
  assert any(k.endswith("-k16") for k in keys) and any(k.endswith("-k8") for k in keys)
  runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
  assert [r["config"]["attention"]["top_k"] for r in runs] == [[4, 16], [4, 16], [4, 8]]
  with pytest.raises(ConfigError, match=r"attention.top_k: \[4, 8\] -> \[4, 32\]"):
    parity.run(_smoke(**{"attention.top_k": (4, 32)}), tmp_path, load_model=loader,
               progress=False)
  assert parity.run(_smoke(), tmp_path, load_model=loader,        # an earlier run's
                    progress=False)["computed"] == 0                 # config resumes
  with pytest.raises(ConfigError, match=r"config.resume='sometimes'"):
    parity.run(_smoke(resume="sometimes"), tmp_path, load_model=loader, progress=False)


def test_complete_last_row_without_newline_is_kept(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text('{"key": "a", "x": 1}\n{"key": "b", "x": 2}')
  store = ResultsStore(path)
  assert set(store.rows) == {"a", "b"} and store.dropped_tail == b""
  store.append({"key": "c", "x": 3})
  assert [json.loads(l)["key"] for l in path.read_text().splitlines()] == ["a", "b", "c"]
