"""Errors the runner reports as one short message (no traceback) and a non-zero exit."""


class ExperimentError(Exception):
  """Base class: `str(err)` is the whole message shown to the user."""


class ConfigError(ExperimentError, ValueError):
  """A config value is invalid (names the key, its value and what is allowed)."""


class ModelUnavailable(ExperimentError):
  """The model's weights cannot be loaded (offline hub, missing file)."""


class GateFailure(ExperimentError):
  """The covers-everything point is not bitwise equal to dense: the implementation is
  broken and no parity table is produced."""
