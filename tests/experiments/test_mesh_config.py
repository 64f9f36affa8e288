"""config.attention.mesh: parsing and validation (the mesh runs: tests/condensate_jax/
distributed, on 8 devices)."""

import pytest

from experiments import cli, grid
from experiments.errors import ConfigError


def _config(mesh, implementation="xla"):
  config = cli.load_config("smoke.py")
  config.attention.mesh = mesh
  config.attention.implementation = implementation
  return config


def test_mesh_axes_and_labels():
  assert grid.mesh_axes(_config("")) == {}
  assert grid.mesh_axes(_config("seq=4, heads=2")) == {"seq": 4, "heads": 2}
  assert grid.implementation_label(_config("")) == "xla"
  assert grid.implementation_label(_config("seq=1")) == "xla@mesh(seq=1)"
  placement = grid.model_implementation(_config("seq=1"))
  assert placement.seq_axis == "seq" and placement.head_axis is None
  assert grid.model_implementation(_config(""), dense=True) == "xla"


@pytest.mark.parametrize("bad", ["seq", "rows=2", "seq=0", "seq=2,seq=2", "seq=two"])
def test_bad_mesh_strings(bad):
  with pytest.raises(ConfigError, match="config.attention.mesh="):
    grid.mesh_axes(_config(bad))


def test_mesh_needs_the_xla_implementation_and_enough_devices():
  with pytest.raises(ConfigError, match="the mesh call is the XLA one"):
    grid.check_config(_config("seq=1", "pallas"))
  with pytest.raises(ConfigError, match="devices asked"):
    grid.model_implementation(_config("seq=4096"))
  grid.check_config(_config("seq=1"))
