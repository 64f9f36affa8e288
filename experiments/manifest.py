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
from typing import Any

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


def write_manifest(workdir: pathlib.Path, config_dict: dict[str, Any],
                   extra: dict[str, Any]) -> dict[str, Any]:
  """Writes workdir/manifest.json (atomically) and returns it. A resumed run keeps the
  first start time and appends itself to "runs"."""
  path = workdir / "manifest.json"
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  run = {"started": now, "argv": sys.argv, **extra}
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
