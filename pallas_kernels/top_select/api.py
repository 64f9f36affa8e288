"""Top-k selection entry point: `implementation=` dispatch and interpret mode.

implementation:
  "reference"  plain jnp (reference.py: `lax.top_k`, then a sort of the ids), any platform;
  "triton"     GPU kernel (gpu_triton.py): a radix search of the k-th key and a
               compaction, no sort; rows of at most MAX_ROW entries;
  None         the best for the platform: GPU "triton", CPU "triton" interpreted, else
               "reference"; a backend raising NotImplementedError falls back to the next.
interpret: None = True exactly when the platform is CPU (Pallas interpret mode).

`top_set` takes rows of any length: one selection where the row fits MAX_ROW, two levels
beyond (`two_level`).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

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


def sqrt_chunk(n: int, k: int) -> int:
  """T ~ sqrt(N / k), a power of two: both rows of the two levels near sqrt(N k)."""
  return util.next_pow2(max(1, int((n / k) ** 0.5)))


def two_level_chunk(n: int, k: int) -> int:
  """The chunk T `top_set` takes for rows of N > MAX_ROW entries: `sqrt_chunk`, clamped
  where possible so that both levels' rows fit the kernel (N / T and k * T <= MAX_ROW;
  where they cannot, a level whose row is too long takes lax.top_k)."""
  t = sqrt_chunk(n, k)
  lo = util.next_pow2(-(-n // MAX_ROW))           # N / T <= MAX_ROW
  if k > MAX_ROW:
    return max(t, lo)
  hi = 1 << ((MAX_ROW // k).bit_length() - 1)     # k * T <= MAX_ROW
  return t if lo > hi else min(max(t, lo), hi)


def two_level(x, k: int, chunk: int, level):
  """(vals, ids ascending, tau) of lax.top_k(x, k)'s set, found in two levels of
  `level(rows, k) -> (ids ascending, tau)` (a selection of lax.top_k's set; chunk 1: one
  level over the whole row).

  The entries fall in chunks of T = chunk; the top k entries lie in the k chunks of
  highest maximum (a chunk holding a top entry has a maximum at least the k-th value; of
  chunks tied at that value the lower ones hold the lower positions), so the top k of the
  N / T chunk maxima (maxima in the total order, `reference.total_max`: NaN of either
  sign ranked as top_k ranks it), then of those chunks' k * T entries in position order.
  The last chunk is padded with -inf (a row whose real entries there are all -NaN ranks
  that chunk as -inf: an edge where the set may differ)."""
  n = x.shape[-1]
  if chunk == 1:
    ids, tau = level(x, k)
    return jnp.take_along_axis(x, ids, axis=-1), ids, tau
  nc = -(-n // chunk)
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nc * chunk - n)],
                   constant_values=-jnp.inf)
  maxima = reference.total_max(padded.reshape(x.shape[:-1] + (nc, chunk)), axis=-1)
  chunks, _ = level(maxima, min(k, nc))
  pos = (chunks[..., None] * chunk + jnp.arange(chunk)).reshape(x.shape[:-1] + (-1,))
  sub = jnp.take_along_axis(padded, pos, axis=-1)
  pick, tau = level(sub, k)
  return (jnp.take_along_axis(sub, pick, axis=-1), jnp.take_along_axis(pos, pick, axis=-1),
          tau)


def top_set(x, k: int, *, implementation=None, interpret=None):
  """(vals, ids ascending, tau) of the set `lax.top_k(x, k)` picks, for rows x [..., N]
  of any length: `top_select` where N <= MAX_ROW, else in two levels (`two_level` with
  `two_level_chunk`); a level whose row is still longer than MAX_ROW takes lax.top_k and
  a sort of its ids (`reference.top_select`)."""
  if x.ndim < 1:
    raise ValueError(f"x.shape={tuple(x.shape)}: expected [..., N].")
  n = x.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k={k!r}: expected an int in [1, N={n}].")

  def level(rows, kk):
    if rows.shape[-1] > MAX_ROW:
      return reference.top_select(rows, kk)
    return top_select(rows, kk, implementation=implementation, interpret=interpret)

  return two_level(x, k, 1 if n <= MAX_ROW else two_level_chunk(n, k), level)


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  return _BEST.get(platform or jax.default_backend(), ("reference",))
