"""Runs one experiment config.

  python -m experiments.run --config=smoke.py [--workdir=DIR] [--config.KEY=VALUE ...]

--config takes a name in configs/ (with or without .py), or a path, optionally with a
`:arg` suffix passed to its get_config(). Outputs go to --workdir (default
runs/<config name>-<timestamp>); rerunning the same workdir resumes. See configs/common.py
for the keys and experiments/parity.py for what is measured.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a name in configs/ (e.g. smoke.py), or a path; ':arg' "
    "suffix allowed.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default runs/<name>-<timestamp>); reusing one "
    "resumes it.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    print(f"error: --config is required. Available configs: "
          f"{', '.join(cli.available_configs())}", file=sys.stderr)
    return 2
  return cli.main(_CONFIG.value, _WORKDIR.value)


def _parse_flags(argv):
  """absl's parser, with a bad `--config.KEY=VALUE` override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    message = str(err).strip()
    if "Traceback" in message:  # a config file's get_config() raised: keep its last line
      message = message.splitlines()[-1]
    print(f"error: {message}\nPass --help for usage.", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as err:
    print(f"error: bad --config override or config file ({type(err).__name__}: {err}). "
          "Overrides must name existing keys (see configs/common.py) with values of "
          "the same type.", file=sys.stderr)
  sys.exit(2)


def entry():
  try:
    sys.argv = cli.resolve_argv(sys.argv)
  except ConfigError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  entry()
