"""Helpers shared by the kernel packages: integer padding arithmetic and the `api.py`
dispatch (implementation table, platform defaults, interpret mode)."""

from __future__ import annotations

import jax


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def round_up(n: int, m: int) -> int:
  return -(-int(n) // m) * m


def dispatch(op, table, defaults, implementation, interpret, args, kw, kernel_kw):
  """Runs `op` by one entry of `table` (name -> function; "reference" is plain jnp).

  implementation None: the names of defaults[platform] (else ("reference",)) in turn,
  the next one where a backend raises NotImplementedError; a named implementation runs
  alone and its NotImplementedError propagates. interpret None: True exactly on CPU.
  Kernels get kw, kernel_kw and interpret=; the reference gets kw only.
  """
  if implementation is None:
    names = defaults.get(jax.default_backend(), ("reference",))
  elif isinstance(implementation, str) and implementation in table:
    names = (implementation,)
  else:
    raise ValueError(f"implementation={implementation!r}: expected None or one of "
                     f"{sorted(table)}.")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if not isinstance(interpret, bool):
    raise ValueError(f"interpret={interpret!r}: expected None, True or False.")
  error = None
  for name in names:
    try:
      if name == "reference":
        return table[name](*args, **kw)
      return table[name](*args, **kw, **kernel_kw, interpret=interpret)
    except NotImplementedError as e:
      if implementation is not None:
        raise
      error = e
  raise NotImplementedError(f"{op}: no implementation of {names} accepts these inputs: "
                            f"{error}")
