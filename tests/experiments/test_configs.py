"""Every config loads, documents its command, and follows the shared schema."""

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import cli, grid
from experiments.errors import ConfigError

CONFIGS = cli.available_configs()
PARITY = [c for c in CONFIGS if c.endswith("_parity.py") or c == "smoke.py"]


def test_expected_configs_exist():
  for name in ("gpt2_parity.py", "pythia_parity.py", "qwen2_parity.py",
               "tinyllama_parity.py", "mistral_parity.py", "gemma3_parity.py",
               "smollm2_parity.py", "smoke.py"):
    assert name in CONFIGS


@pytest.mark.parametrize("name", PARITY)
def test_parity_config(name):
  config = cli.load_config(name)
  assert config.job == "parity"
  grid.check_config(config)
  module_doc = open(cli.CONFIG_DIR / name).read().split('"""')[1]
  assert module_doc.splitlines()[0].startswith(f"python -m experiments.run --config={name}")
  assert "Runtime" in module_doc and "Expected result" in module_doc
  assert config.generate.new_tokens >= 1
  points = grid.grid(config, max(config.prompts.lengths) + config.generate.new_tokens)
  assert points[0].covering and points[0].budget >= max(config.prompts.lengths)
  assert len(points) == 1 + len(config.attention.top_k) * len(
      config.attention.window) * len(config.attention.anchor)


@pytest.mark.parametrize("name", [c for c in PARITY if c != "smoke.py"])
def test_small_size_argument(name):
  small = cli.load_config(f"{name}:size=small")
  full = cli.load_config(name)
  assert len(small.attention.top_k) <= len(full.attention.top_k)
  with pytest.raises(ValueError, match="size"):
    cli.load_config(f"{name}:size=huge")


def test_resolve_names_paths_and_unknown():
  assert cli.resolve_config_path("smoke").endswith("configs/smoke.py")
  assert cli.resolve_config_path("smoke.py:a=b").endswith("configs/smoke.py:a=b")
  path = str(cli.CONFIG_DIR / "smoke.py")
  assert cli.resolve_config_path(path) == path
  with pytest.raises(ConfigError) as err:
    cli.resolve_config_path("no_such_config.py")
  assert "no_such_config.py" in str(err.value) and "smoke.py" in str(err.value)
  argv = cli.resolve_argv(["prog", "--config", "smoke.py", "--workdir=/x"])
  assert argv[2].endswith("configs/smoke.py") and argv[3] == "--workdir=/x"


def test_command_line_overrides_through_config_flags():
  argv = cli.resolve_argv(["prog", "--config=smoke.py", "--config.attention.top_k=(2,3,5)",
                           "--config.model.path=/some/dir",
                           "--config.generate.new_tokens=7"])
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                           lock_config=True, sys_argv=argv)
  values(argv)
  config = holder.value
  assert config.attention.top_k == (2, 3, 5)
  assert config.model.path == "/some/dir"
  assert config.generate.new_tokens == 7
  with pytest.raises(AttributeError):
    config.new_key = 1  # locked


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_names_a_job_of_the_table(name):
  config = cli.load_config(name)
  assert config.job in cli.JOBS
  assert callable(cli.job_module(config.job).run)


def test_unknown_job_is_a_clear_error(smoke_config):
  smoke_config.job = "no_such_job"
  with pytest.raises(ConfigError, match="no module experiments.no_such_job"):
    cli.job_module(smoke_config.job)
  with pytest.raises(ConfigError, match="fast_bench, kernel_bench, mesh_bench, model_bench, parity"):
    cli.job_module(smoke_config.job)


@pytest.mark.parametrize("key, value, match", [
    ("attention.top_k", (), "attention.top_k"),
    ("attention.window", (-1,), "attention.window"),
    ("prompts.lengths", (0,), "prompts.lengths"),
    ("generate.new_tokens", 0, "generate.new_tokens"),
    ("model.dtype", "float64", "model.dtype"),
])
def test_bad_config_values(smoke_config, key, value, match):
  section, field = key.split(".")
  smoke_config[section][field] = value
  with pytest.raises(ConfigError, match=match):
    grid.check_config(smoke_config)
