"""experiments.bench.coverage_gate: the covers-everything spec is bitwise dense at a real
preset's shapes (random weights), with and without stats, on CPU."""

import pytest

from experiments.bench import coverage_gate


def test_preset_covering_spec_is_bitwise_dense():
  rows = coverage_gate.run("smollm2", 100)   # the gate spec takes exact selection's path
  assert [r["stats"] for r in rows] == [False, True]
  for r in rows:
    assert r["bitwise_frac"] == 1.0 and r["first_diff"] is None, r


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="family='llama'"):
    coverage_gate.run("llama", 40)
  with pytest.raises(ValueError, match=r"tokens=1: expected an int in \[2, 8192\]"):
    coverage_gate.run("smollm2", 1)
