"""HF checkpoints (config.json + safetensors [+ tokenizer]) -> `LanguageModel`.

The model is built abstractly (`nnx.eval_shape`), every checkpoint key is mapped through
its family's regex table (`HF_KEYS`: key pattern -> module path(s) and a conversion), and
all mapping errors (missing, unexpected, shape mismatch) are collected and raised once.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import struct
from typing import Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from condensate_jax import models
from condensate_jax.models import layers

# Leading module names of the transformers checkpoint layouts (CausalLM wrappers).
PREFIXES = ("transformer.", "gpt_neox.", "model.")
_MAX_LISTED = 20


class WeightLoadError(ValueError):
  """A checkpoint that does not fit the model: every problem listed in one message."""


class CheckpointFileError(ValueError):
  """A missing, unreadable or truncated checkpoint file."""


# ------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Reads one .safetensors file (memory-mapped); checks the header against the size."""
  path = pathlib.Path(path)
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointFileError(f"{path}: {size} bytes, too short for a safetensors "
                                  "header (truncated file?).")
      (n,) = struct.unpack("<Q", head)
      if 8 + n > size:
        raise CheckpointFileError(f"{path}: header of {n} bytes exceeds the file size "
                                  f"{size} (truncated or not a safetensors file).")
      header = json.loads(f.read(n))
  except OSError as e:
    raise CheckpointFileError(f"{path}: cannot read ({e}).") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointFileError(f"{path}: unreadable safetensors header ({e}).") from None
  if not isinstance(header, dict):
    raise CheckpointFileError(f"{path}: safetensors header is not a JSON object.")
  header.pop("__metadata__", None)
  for name, info in header.items():
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
      raise CheckpointFileError(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets "
                                "in the header.")
  data_size = size - 8 - n
  end = max((info["data_offsets"][1] for info in header.values()), default=0)
  if end > data_size:
    raise CheckpointFileError(
        f"{path}: tensors need {end} data bytes but the file has {data_size} "
        "(truncated file).")
  buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,)) \
      if data_size else np.zeros((0,), np.uint8)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _ST_DTYPES:
      raise CheckpointFileError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}; "
                                f"expected one of {sorted(_ST_DTYPES)}.")
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    lo, hi = info["data_offsets"]
    shape = tuple(info["shape"])
    if hi - lo != math.prod(shape) * dtype.itemsize:
      raise CheckpointFileError(f"{path}: tensor {name!r} spans {hi - lo} bytes; shape "
                                f"{shape} of {info['dtype']} needs "
                                f"{math.prod(shape) * dtype.itemsize}.")
    out[name] = buf[lo:hi].view(dtype).reshape(shape)
  return out


def read_checkpoint(directory) -> dict[str, np.ndarray]:
  """All tensors of a directory: model.safetensors or a sharded index."""
  d = pathlib.Path(directory)
  index = d / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointFileError(f"{index}: not a safetensors index ({e}).") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      if not (d / shard).is_file():
        raise CheckpointFileError(f"{d / shard}: shard named in {index.name} is missing.")
      tensors.update(read_safetensors(d / shard))
    return tensors
  single = d / "model.safetensors"
  if single.is_file():
    return read_safetensors(single)
  others = sorted(p.name for p in d.glob("*.safetensors"))
  if len(others) == 1:
    return read_safetensors(d / others[0])
  raise CheckpointFileError(
      f"{d}: no model.safetensors or model.safetensors.index.json (found "
      f"{others or 'no .safetensors files'}; PyTorch .bin checkpoints are not read).")


# -------------------------------------------------------------------------- mapping


class _Mismatch(Exception):
  def __init__(self, expected):
    super().__init__(expected)
    self.expected = tuple(expected)


def _convert(kind: str, arr: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
  """Checkpoint array -> arrays for the target parameter shapes (see HF_KEYS tables)."""
  t = shapes[0]
  p = math.prod
  if kind == "copy":
    expected, fn = t, lambda a: [a]
  elif kind == "bias":
    expected, fn = (p(t),), lambda a: [a.reshape(t)]
  elif kind == "linear":  # nn.Linear [out, in]; the parameter is [in, out...]
    expected, fn = (p(t[1:]), t[0]), lambda a: [a.T.reshape(t)]
  elif kind == "linear_o":  # nn.Linear [out, in] into [in..., out]
    expected, fn = (t[-1], p(t[:-1])), lambda a: [a.T.reshape(t)]
  elif kind == "conv1d":  # GPT-2 Conv1D [in, out]: already our [in, out...] order
    expected, fn = (t[0], p(t[1:])), lambda a: [a.reshape(t)]
  elif kind == "conv1d_o":
    expected, fn = (p(t[:-1]), t[-1]), lambda a: [a.reshape(t)]
  elif kind == "conv1d_qkv":  # c_attn: [.., 3 * N * H], q | k | v
    lead, tail = t[:-2], t[-2:]
    expected = lead + (3 * p(tail),)
    fn = lambda a: list(np.moveaxis(a.reshape(lead + (3,) + tail), len(lead), 0))
  elif kind == "neox_qkv":  # query_key_value: [N * 3 * H (, D)], per head q | k | v
    n, h = t[-2], t[-1]
    if len(t) == 3:  # weight [N*3*H, D] -> [D, N, H]
      expected = (3 * n * h, t[0])
      fn = lambda a: [a.reshape(n, 3, h, t[0])[:, i].transpose(2, 0, 1) for i in range(3)]
    else:
      expected = (3 * n * h,)
      fn = lambda a: [a.reshape(n, 3, h)[:, i] for i in range(3)]
  else:
    raise AssertionError(f"unknown conversion {kind!r}")
  if tuple(arr.shape) != tuple(expected) or any(s != t for s in shapes):
    raise _Mismatch(expected)
  return fn(arr)


def _strip(key: str) -> str:
  for prefix in PREFIXES:
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def build_model(cfg, tensors: dict, dtype="float32", *, where: str = "checkpoint"):
  """An NNX model of `cfg`'s family holding `tensors` (HF keys) converted to `dtype`."""
  dtype = layers.check_dtype(dtype)
  family = models.FAMILIES[models.family_of_config(cfg)]
  abstract = nnx.eval_shape(lambda: family.Model(cfg, dtype, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  targets = {"/".join(map(str, k)): tuple(v.shape)
             for k, v in flatten_dict(nnx.to_pure_dict(abs_state)).items()}
  table = [(re.compile(pat), tgt, kind) for pat, tgt, kind in family.HF_KEYS]
  ignored = [re.compile(p) for p in family.HF_IGNORED_KEYS]
  tied = getattr(cfg, "tie_embeddings", False)
  values, errors, sources, mismatched = {}, [], {}, set()
  for key in sorted(tensors):
    short = _strip(key)
    match = next(((m, tgt, kind) for rx, tgt, kind in table
                  if (m := rx.fullmatch(short))), None)
    if match is None:
      if not any(rx.fullmatch(short) for rx in ignored):
        errors.append(f"unexpected key {key!r} (no parameter of {type(cfg).__name__} "
                      "maps to it)")
      continue
    m, tgt, kind = match
    paths = [p.format(*m.groups()) for p in ((tgt,) if isinstance(tgt, str) else tgt)]
    absent = [p for p in paths if p not in targets]
    if absent:
      if tied and paths == ["unembed_dv"]:
        continue  # a tied model's lm_head copy: the embedding is used
      errors.append(f"unexpected key {key!r}: maps to {absent}, which this config lacks")
      continue
    arr = np.asarray(tensors[key])
    try:
      converted = _convert(kind, arr, [targets[p] for p in paths])
    except _Mismatch as e:
      errors.append(f"shape mismatch for {key!r}: checkpoint {tuple(arr.shape)}, "
                    f"expected {e.expected} (for {paths})")
      mismatched.update(paths)
      continue
    for p, a in zip(paths, converted):
      if p in values:
        errors.append(f"duplicate: {key!r} and {sources[p]!r} both map to {p!r}")
      values[p], sources[p] = a, key
  missing = sorted(set(targets) - set(values) - mismatched)
  errors += [f"missing parameter {p!r} (shape {targets[p]})" for p in missing]
  if errors:
    listed = "\n  ".join(errors[:_MAX_LISTED])
    more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
    raise WeightLoadError(f"{where}: {len(errors)} problem(s) mapping weights to "
                          f"{type(cfg).__name__}:\n  {listed}{more}")
  pure = unflatten_dict({tuple(int(s) if s.isdigit() else s for s in p.split("/")):
                         jnp.asarray(np.asarray(a, dtype=np.float32) if a.dtype != dtype
                                     else a, dtype=dtype)
                         for p, a in values.items()})
  nnx.replace_by_pure_dict(abs_state, pure)
  return nnx.merge(graphdef, abs_state)


def config_from_hf(hf_config: dict):
  """The family config of an HF config dict (refuses unknown keys)."""
  if not isinstance(hf_config, dict):
    raise ValueError(f"hf_config of type {type(hf_config).__name__}: expected a dict.")
  if "model_type" not in hf_config:
    raise ValueError("hf_config has no 'model_type': expected one of gpt2, gpt_neox, "
                     "llama, mistral, qwen2, gemma3_text.")
  family = models.family_of_model_type(hf_config["model_type"])
  return models.CONFIG_CLASSES[family].from_hf_config(hf_config)


def build_language_model(hf_config: dict, tensors: dict, tokenizer, dtype="float32", *,
                         name: Optional[str] = None, where: str = "checkpoint"):
  """(HF config dict, HF-named tensors, tokenizers.Tokenizer) -> LanguageModel."""
  from condensate_jax.lm import LanguageModel  # lm imports this module's callers
  cfg = config_from_hf(hf_config)
  model = build_model(cfg, tensors, dtype, where=where)
  return LanguageModel(model, cfg, tokenizer, dtype=dtype, name=name)


def _special_tokens(d: pathlib.Path, vocab: dict) -> list[str]:
  """The special tokens a GPT-2-era directory names (special_tokens_map.json /
  tokenizer_config.json: bos/eos/unk/pad), else GPT-2's <|endoftext|> when in the vocab."""
  names = []
  for fname in ("special_tokens_map.json", "tokenizer_config.json"):
    path = d / fname
    if not path.is_file():
      continue
    try:
      meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise CheckpointFileError(f"{path}: invalid JSON ({e}).") from None
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
      tok = meta.get(key)
      tok = tok.get("content") if isinstance(tok, dict) else tok
      if isinstance(tok, str) and tok in vocab and tok not in names:
        names.append(tok)
  if not names and "<|endoftext|>" in vocab:
    names.append("<|endoftext|>")
  return names


def load_tokenizer(directory):
  """The tokenizer of a model directory: tokenizer.json, else a GPT-2-era byte-level BPE
  (vocab.json + merges.txt, special tokens from special_tokens_map.json /
  tokenizer_config.json), else None (the model then takes ids only)."""
  import tokenizers
  d = pathlib.Path(directory)
  if (d / "tokenizer.json").is_file():
    try:
      return tokenizers.Tokenizer.from_file(os.fspath(d / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises plain Exceptions
      raise CheckpointFileError(f"{d / 'tokenizer.json'}: unreadable ({e}).") from None
  bpe = [(d / f).is_file() for f in ("vocab.json", "merges.txt")]
  if not any(bpe):
    return None
  if not all(bpe):
    raise CheckpointFileError(
        f"{d}: has {'vocab.json' if bpe[0] else 'merges.txt'} but not "
        f"{'merges.txt' if bpe[0] else 'vocab.json'}; a byte-level BPE tokenizer needs "
        "both (or give the directory a tokenizer.json).")
  try:
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    tok = tokenizers.ByteLevelBPETokenizer(os.fspath(d / "vocab.json"),
                                           os.fspath(d / "merges.txt"))
  except Exception as e:  # noqa: BLE001 - JSON and tokenizers errors alike
    raise CheckpointFileError(f"{d}: vocab.json / merges.txt unreadable ({e}).") from None
  tok.add_special_tokens(_special_tokens(d, vocab))
  return tok


def load_directory(directory, dtype="float32", *, name: Optional[str] = None):
  """A local directory with config.json and safetensors weights; the tokenizer from
  tokenizer.json or vocab.json + merges.txt, or none (ids in, logits out; encode /
  decode then raise)."""
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise CheckpointFileError(f"{d}: not a directory.")
  if not (d / "config.json").is_file():
    raise CheckpointFileError(f"{d}: missing ['config.json']; a model directory needs "
                              "config.json and safetensors weights (and a tokenizer: "
                              "tokenizer.json or vocab.json + merges.txt, optional).")
  try:
    hf_config = json.loads((d / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise CheckpointFileError(f"{d / 'config.json'}: invalid JSON ({e}).") from None
  tokenizer = load_tokenizer(d)
  tensors = read_checkpoint(d)
  return build_language_model(hf_config, tensors, tokenizer, dtype, name=name or str(d),
                              where=str(d))
