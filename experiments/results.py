"""Append-only, crash-safe results file: one JSON object per line, keyed by "key".

Each row is written with a single write of a complete line, then flushed and fsynced,
so a crash or Ctrl-C leaves at worst a truncated last line. Opening the store drops
such a torn tail (and only a tail that is not a complete row: a complete last row
without its newline, e.g. from an editor, is kept and the newline added; a malformed
line elsewhere is a `CorruptResults` error), so rerunning the same workdir skips the
finished rows and redoes the interrupted one.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterator, Optional

from experiments.errors import ExperimentError


class CorruptResults(ExperimentError, ValueError):
  """results.jsonl holds a line that is neither a row nor a torn last line."""


def _row_or_none(line: bytes) -> Optional[dict[str, Any]]:
  try:
    row = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  return row if isinstance(row, dict) and "key" in row else None


def _clean(value: Any) -> Any:
  """JSON without NaN/Infinity tokens: non-finite floats become strings."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # "nan", "inf", "-inf"
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  return value


class ResultsStore:
  """results.jsonl in a workdir."""

  def __init__(self, path: os.PathLike):
    self.path = pathlib.Path(path)
    self.rows: dict[str, dict[str, Any]] = {}
    self.dropped_tail = b""
    if self.path.exists():
      self._load()

  def _load(self) -> None:
    data = self.path.read_bytes()
    end = data.rfind(b"\n") + 1  # after the last newline: a complete row or a torn one
    if end < len(data):
      tail = data[end:]
      if _row_or_none(tail) is not None:   # a complete last row without its newline
        with open(self.path, "ab") as f:
          f.write(b"\n")
          f.flush()
          os.fsync(f.fileno())
        data, end = data + b"\n", len(data) + 1
      else:                                   # torn by a crash: the only repair made
        self.dropped_tail = tail
        with open(self.path, "r+b") as f:
          f.truncate(end)
          f.flush()
          os.fsync(f.fileno())
    try:
      text = data[:end].decode("utf-8")
    except UnicodeDecodeError as err:
      raise CorruptResults(f"{self.path} is not UTF-8 text ({err}); it is not a results "
                           "file of this runner. Use a fresh --workdir.") from None
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as err:
        raise CorruptResults(
            f"{self.path} line {number} is not valid JSON ({err}); only a torn last line "
            "is repaired automatically. Fix or remove that line, or use a fresh "
            "--workdir.") from None
      if not isinstance(row, dict) or "key" not in row:
        raise CorruptResults(f"{self.path} line {number}: expected a JSON object with a "
                             "'key' field (a results row).")
      self.rows[row["key"]] = row

  def __contains__(self, key: str) -> bool:
    return key in self.rows

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return iter(self.rows.values())

  def append(self, row: dict[str, Any]) -> None:
    if "key" not in row:
      raise ValueError(f"row keys {sorted(row)}: expected a 'key' field.")
    line = (json.dumps(_clean(row), sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      written = os.write(fd, line)
      if written != len(line):  # a short write leaves a tail the next open repairs
        raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
      os.fsync(fd)
    finally:
      os.close(fd)
    self.rows[row["key"]] = row
