"""manifest.json: what produced a workdir (config, package versions, device, git commit)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
from typing import Any

from experiments.errors import ConfigError, ExperimentError

PACKAGES = ("condensate-jax", "jax", "jaxlib", "flax", "numpy", "ml_collections",
            "tokenizers", "gguf", "safetensors")
REPO = pathlib.Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str]:
  versions = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def device_info() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {"platform": devices[0].platform, "kind": devices[0].device_kind,
          "count": len(devices), "host": platform.node()}


def git_info() -> dict[str, Any]:
  def git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=20, check=True).stdout.strip()
  try:
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


# Config keys that do not change any row (how a run reports, not what it measures).
NON_RESULT_KEYS = ("resume", "plots", "gate", "name")
# keys added to the configs after workdirs were written, with the default that an earlier
# config (which lacks them) ran with: a workdir of that config still resumes
ADDED_KEYS = {"attention.mesh": ""}
RESUME_MODES = ("match", "extend")


def prepare_workdir(workdir) -> pathlib.Path:
  """Creates workdir (and parents) and checks that it takes files; ExperimentError with
  the reason otherwise (a path under a file, no permission, a read-only file system)."""
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-"):
      pass
  except OSError as err:
    raise ExperimentError(f"workdir {str(workdir)!r} is not a writable directory "
                          f"({type(err).__name__}: {err.strerror or err}). Pass another "
                          "--workdir.") from None
  return workdir


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _json(value: Any) -> Any:
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def check_resume(workdir: pathlib.Path, config_dict: dict[str, Any], has_rows: bool):
  """Refuses to add rows of a config to a workdir whose rows came from other ones
  (ConfigError listing the keys that differ from the latest), unless config.resume ==
  "extend"; a config of any earlier run of the workdir resumes."""
  mode = config_dict.get("resume", "match")
  if mode not in RESUME_MODES:
    raise ConfigError(f"config.resume={mode!r}: expected one of {RESUME_MODES}.")
  path = workdir / "manifest.json"
  if not has_rows or not path.exists() or mode == "extend":
    return
  try:
    manifest = json.loads(path.read_text())
    earlier = [manifest.get("config", {})] + [r["config"] for r in manifest.get("runs", [])
                                              if isinstance(r, dict) and "config" in r]
  except (json.JSONDecodeError, AttributeError, OSError):
    earlier = [{}]
  new = _flat(_json(config_dict))

  def differences(old):
    old = _flat(_json(old))
    return sorted(k for k in set(new) | set(old) if k.split(".")[0] not in NON_RESULT_KEYS
                  and new.get(k, "<absent>") != old.get(k, ADDED_KEYS.get(k, "<absent>")))

  diffs = [differences(old) for old in earlier]
  if all(diffs):      # matches none of the configs whose rows the workdir holds
    diff, old = diffs[0], _flat(_json(earlier[0]))
    shown = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
                      for k in diff[:6]) + ("; ..." if len(diff) > 6 else "")
    raise ConfigError(
        f"workdir {str(workdir)!r} holds rows of another config ({shown}). Use a fresh "
        "--workdir, or pass --config.resume=extend to add this config's rows to it (the "
        "summary and plots then cover this config's grid only).")


def write_manifest(workdir: pathlib.Path, config_dict: dict[str, Any],
                   extra: dict[str, Any]) -> dict[str, Any]:
  """Writes workdir/manifest.json (atomically) and returns it. A resumed run keeps the
  first start time and appends itself to "runs"."""
  path = workdir / "manifest.json"
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  run = {"started": now, "argv": sys.argv, "config": config_dict, **extra}
  runs = []
  if path.exists():
    try:
      runs = json.loads(path.read_text()).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
      runs = []
  manifest = {"config": config_dict, "packages": package_versions(),
              "device": device_info(), "git": git_info(), "runs": runs + [run]}
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
  os.replace(tmp, path)
  return manifest
