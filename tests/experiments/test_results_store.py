import json

import pytest

from experiments.results import ResultsStore


def test_append_and_reload(tmp_path):
  path = tmp_path / "results.jsonl"
  store = ResultsStore(path)
  store.append({"key": "a", "x": 1.5})
  store.append({"key": "b", "x": float("nan")})
  again = ResultsStore(path)
  assert set(again.rows) == {"a", "b"}
  assert again.rows["b"]["x"] == "nan"  # strict JSON: no NaN token
  for line in path.read_text().splitlines():
    json.loads(line)


def test_truncated_last_line_is_dropped_and_repaired(tmp_path):
  path = tmp_path / "results.jsonl"
  store = ResultsStore(path)
  store.append({"key": "a", "x": 1})
  with open(path, "ab") as f:
    f.write(b'{"key": "b", "x"')  # a crash in the middle of a write
  store = ResultsStore(path)
  assert set(store.rows) == {"a"}
  assert store.dropped_tail == b'{"key": "b", "x"'
  store.append({"key": "b", "x": 2})
  assert [json.loads(l)["key"] for l in path.read_text().splitlines()] == ["a", "b"]


def test_malformed_middle_line_is_an_error(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')
  with pytest.raises(ValueError, match="line 2"):
    ResultsStore(path)


def test_row_needs_key(tmp_path):
  with pytest.raises(ValueError, match="key"):
    ResultsStore(tmp_path / "r.jsonl").append({"x": 1})


@pytest.mark.parametrize("line", ['[1, 2]', '{"no_key": 1}', '"text"'])
def test_complete_lines_that_are_not_rows_are_refused_with_the_line_number(tmp_path, line):
  path = tmp_path / "results.jsonl"
  path.write_text('{"key": "a"}\n' + line + "\n")
  with pytest.raises(ValueError, match=r"line 2: expected a JSON object with a 'key'"):
    ResultsStore(path)
