"""Checkpoints of a training state: one safetensors file per saved step, written atomically
(a temporary file, fsync, rename), restored exactly (every leaf's bytes, dtype and shape).

  save(directory, step, tree, metadata={...}, keep=2)  -> the file's path
  latest(directory)                                   -> (step, path) or None
  restore(path, template)                             -> (tree like template, metadata)

A tree is any pytree of arrays (NNX `State`s, optax states, dicts): leaves are stored
under their `jax.tree_util.keystr` paths; restore checks that the file holds exactly the
template's paths with its shapes and dtypes (a ValueError lists what differs), so a
checkpoint of another model or optimizer is refused instead of loaded crooked. dtypes
safetensors' numpy API lacks (bfloat16) are stored as unsigned ints of the same width and
viewed back; shapes are kept in the metadata (safetensors stores 0-d arrays as [1]). Files are named ckpt-<step, 8 digits>.safetensors; `keep` newest survive.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Optional

import jax
import numpy as np

_NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")
_NATIVE = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
           "uint64", "float16", "float32", "float64"}


def _leaves(tree) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def path_for(directory, step: int) -> pathlib.Path:
  return pathlib.Path(directory) / f"ckpt-{step:08d}.safetensors"


def save(directory, step: int, tree, *, metadata: Optional[dict] = None,
         keep: int = 2) -> pathlib.Path:
  """Writes `tree` at `step` (module docstring); removes all but the `keep` newest."""
  from safetensors.numpy import save as st_save  # pylint: disable=import-outside-toplevel
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step={step!r}: expected an int >= 0.")
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"keep={keep!r}: expected an int >= 1.")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  arrays, dtypes, shapes = {}, {}, {}
  for name, leaf in _leaves(tree):
    arr = np.asarray(jax.device_get(leaf))
    dtypes[name], shapes[name] = arr.dtype.name, list(arr.shape)
    if arr.dtype.name not in _NATIVE:
      arr = arr.view(f"uint{8 * arr.dtype.itemsize}")
    arrays[name] = np.ascontiguousarray(arr)
  meta = {"step": str(int(step)), "dtypes": json.dumps(dtypes),
          "shapes": json.dumps(shapes),
          "user": json.dumps(metadata or {}, sort_keys=True, default=str)}
  data = st_save(arrays, metadata=meta)
  final = path_for(directory, int(step))
  tmp = final.with_suffix(".tmp")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, final)
  try:   # the rename itself durable
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass
  for old in sorted(_steps(directory))[:-keep]:
    path_for(directory, old).unlink(missing_ok=True)
  return final


def _steps(directory) -> list[int]:
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  return [int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name))]


def latest(directory) -> Optional[tuple[int, pathlib.Path]]:
  steps = _steps(directory)
  return (max(steps), path_for(directory, max(steps))) if steps else None


def restore(path, template):
  """(the tree of `template`'s structure with the file's leaves, the saved metadata)."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  with safe_open(str(path), framework="numpy") as f:
    meta = f.metadata() or {}
    stored = {name: f.get_tensor(name) for name in f.keys()}
  dtypes = json.loads(meta.get("dtypes", "{}"))
  shapes = json.loads(meta.get("shapes", "{}"))
  want = _leaves(template)
  names = [n for n, _ in want]
  missing = [n for n in names if n not in stored]
  extra = [n for n in stored if n not in set(names)]
  problems = []
  if missing or extra:
    problems.append(f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                    f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}")
  leaves = []
  for name, ref in want:
    if name not in stored:
      continue
    arr = stored[name]
    dtype = dtypes.get(name, arr.dtype.name)
    if dtype not in _NATIVE:
      arr = arr.view(np.dtype(dtype) if dtype != "bfloat16" else jax.numpy.bfloat16)
    if name in shapes and arr.size == int(np.prod(shapes[name])):
      arr = arr.reshape(shapes[name])   # safetensors stores a 0-d array as [1]
    ref_shape, ref_dtype = tuple(np.shape(ref)), np.dtype(ref.dtype).name
    if tuple(arr.shape) != ref_shape or arr.dtype.name != ref_dtype:
      problems.append(f"{name}: stored {arr.dtype.name}{list(arr.shape)}, expected "
                      f"{ref_dtype}{list(ref_shape)}")
    leaves.append(arr)
  if problems:
    raise ValueError(f"checkpoint {str(path)!r} does not match the training state: "
                     + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else "")
                     + ". Use a fresh --workdir for another model or optimizer.")
  treedef = jax.tree_util.tree_structure(template)
  tree = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(a) for a in leaves])
  meta_out = {"step": int(meta.get("step", -1)), **json.loads(meta.get("user", "{}"))}
  return tree, meta_out
