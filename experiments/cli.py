"""Config-name resolution, config loading and job dispatch behind `experiments/run.py`.

Importable without absl flags so that notebooks and tests call the same code:
  config = load_config("smoke.py:key=value")
  result = run_job(config, workdir)
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import pathlib
import sys
from typing import Optional, Sequence

from experiments.errors import ConfigError, ExperimentError

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"
_NOT_CONFIGS = {"__init__.py", "common.py"}


def available_configs() -> list[str]:
  return sorted(p.name for p in CONFIG_DIR.glob("*.py") if p.name not in _NOT_CONFIGS)


def resolve_config_path(value: str) -> str:
  """`NAME[.py][:arg]` or `PATH[:arg]` -> `PATH[:arg]`; unknown -> ConfigError listing
  the available configs."""
  path, sep, arg = value.partition(":")
  candidates = [pathlib.Path(path)]
  if "/" not in path:
    candidates += [CONFIG_DIR / path, CONFIG_DIR / f"{path}.py"]
  for candidate in candidates:
    if candidate.is_file():
      return f"{candidate}{sep}{arg}"
  raise ConfigError(
      f"unknown config {path!r}. Available configs (in {CONFIG_DIR}): "
      f"{', '.join(available_configs())}. A path to a config file also works.")


def resolve_argv(argv: Sequence[str]) -> list[str]:
  """Rewrites `--config=NAME` / `--config NAME` in argv to a resolved path."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + resolve_config_path(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
  return out


def load_config(value: str):
  """The ConfigDict of `NAME[.py][:arg]` (unlocked; the CLI locks its own)."""
  resolved = resolve_config_path(value)
  path, _, arg = resolved.partition(":")
  spec = importlib.util.spec_from_file_location(f"_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def default_workdir(config) -> pathlib.Path:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return pathlib.Path("runs") / f"{config.get('name', 'run')}-{stamp}"


# The jobs a config may name (config.job): name -> the module whose run(config, workdir)
# runs it. `python -m experiments.run --config=...` is the one entry point for all of
# them; dev tools that are not jobs (experiments.bench.profile) have their own CLI.
JOBS = {
    "parity": "experiments.parity",
    "fast_bench": "experiments.bench.fast_bench",
    "kernel_bench": "experiments.bench.kernel_bench",
    "retrieval": "experiments.bench.retrieval",
    "model_bench": "experiments.bench.model_bench",
    "mesh_bench": "experiments.bench.mesh_bench",
    "distill": "experiments.train.distill",
    "pretrain": "experiments.train.pretrain",
}


def job_module(job: str):
  """The module of JOBS[job]; a name not in JOBS -> ConfigError listing them."""
  if not isinstance(job, str) or job not in JOBS:
    raise ConfigError(f"config.job={job!r}: unknown job (no module experiments.{job} in "
                      f"experiments.cli.JOBS). Jobs available: {', '.join(sorted(JOBS))}.")
  module = importlib.import_module(JOBS[job])
  if not callable(getattr(module, "run", None)):
    raise ConfigError(f"config.job={job!r}: {JOBS[job]} has no run(config, workdir) "
                      "function.")
  return module


def run_job(config, workdir: Optional[str] = None, **kwargs):
  workdir = pathlib.Path(workdir) if workdir else default_workdir(config)
  return job_module(config.get("job", "parity")).run(config, workdir, **kwargs), workdir


def main(config, workdir: Optional[str]) -> int:
  """The CLI body: runs the job, prints its summary; ExperimentError -> message, 1."""
  try:
    result, workdir = run_job(config, workdir)
  except ExperimentError as err:
    print(f"\nerror: {err}", file=sys.stderr)
    return 1
  except OSError as err:   # e.g. the disk filled up while writing a row
    print(f"\nerror: {type(err).__name__}: {err}. Finished rows are saved; rerun with "
          "the same --workdir to resume.", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("\ninterrupted: finished rows are saved; rerun with the same --workdir to "
          "resume.", file=sys.stderr)
    return 130
  if isinstance(result, dict) and "table" in result:
    print(f"\n{result['table']}\n")
    print(f"{result.get('computed', '?')} rows computed, {result.get('skipped', 0)} "
          f"reused; outputs in {workdir}/")
  return 0
