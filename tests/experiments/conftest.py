import pytest

from experiments import cli


@pytest.fixture
def smoke_config():
  """The smoke config, unlocked, so tests may adjust it."""
  return cli.load_config("smoke.py")
