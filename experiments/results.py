"""Append-only, crash-safe results file: one JSON object per line, keyed by "key".

Each row is written with a single write of a complete line, then flushed and fsynced,
so a crash or Ctrl-C leaves at worst a truncated last line. Opening the store drops
such a tail (and only a tail: a malformed line elsewhere is an error), so rerunning the
same workdir skips the finished rows and redoes the interrupted one.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterator


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
    end = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    if end < len(data):
      self.dropped_tail = data[end:]
      with open(self.path, "r+b") as f:
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as err:
        raise ValueError(
            f"{self.path} line {number} is not valid JSON ({err}); only a truncated "
            "last line is repaired automatically.") from None
      if not isinstance(row, dict) or "key" not in row:
        raise ValueError(f"{self.path} line {number}: expected a JSON object with a "
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
