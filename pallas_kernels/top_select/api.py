"""Top-k selection entry point: `implementation=` dispatch and interpret mode.

implementation:
  "reference"  plain jnp (reference.py: `lax.top_k`, then a sort of the ids), any platform;
  "triton"     GPU kernel (gpu_triton.py): a radix search of the k-th key and a
               compaction, no sort; rows of at most MAX_ROW entries;
  None         the best for the platform: GPU "triton", CPU "triton" interpreted, else
               "reference"; a backend raising NotImplementedError falls back to the next.
interpret: None = True exactly when the platform is CPU (Pallas interpret mode).
"""

from __future__ import annotations

import types

import jax

from pallas_kernels import util
from pallas_kernels.top_select import gpu_triton, reference

MAX_ROW = gpu_triton.MAX_ROW
IMPLEMENTATIONS = types.MappingProxyType({
    "reference": reference.top_select,
    "triton": gpu_triton.top_select,
})
_BEST = types.MappingProxyType({"gpu": ("triton", "reference"),
                                "cpu": ("triton", "reference")})


def top_select(x, k, *, implementation=None, interpret=None, **kernel_kw):
  """(ids [..., k] int32 ascending, tau [...] float32) of the k largest entries of each
  row of x [..., N] float32, the set `lax.top_k` picks (reference.py).
  kernel_kw: backend tuning (num_warps); ignored by "reference"."""
  if x.ndim < 1:
    raise ValueError(f"x.shape={tuple(x.shape)}: expected [..., N].")
  n = x.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k={k!r}: expected an int in [1, N={n}].")
  return util.dispatch("top_select", IMPLEMENTATIONS, _BEST, implementation, interpret,
                       (x, k), {}, kernel_kw)


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  return _BEST.get(platform or jax.default_backend(), ("reference",))
