"""Top-k selection, GPU backend: `pallas_call` lowered through Triton.

One program per row holds the row (padded to a power of two Np with the lowest key) in
registers:
  1. keys: the float bits as int32, negative floats' magnitude bits flipped, so that
     signed int order is the total order of floats (reference.py);
  2. the k-th largest key t, bit by bit from the sign down (32 counting passes:
     t |= 1 << b while at least k keys are >= t | 1 << b);
  3. the set: keys > t, and of the keys == t the first k - #(> t) by position (a
     cumulative count), stored at their rank in position order (a cumulative sum);
     entries out of the set go to distinct slots past k, masked out, so no two lanes
     ever name one slot (interpret mode scatters where the GPU masks).
No sort; the work is 33 passes over the row plus two scans, independent of k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.block_sparse.triton_common import check_backend
from pallas_kernels.top_select import reference
from pallas_kernels.util import next_pow2

MAX_ROW = 32768           # entries of a row held in one program's registers
_INT_MIN = -(2 ** 31)
_LOWEST = -1              # bits 0xFFFFFFFF: -NaN of the largest payload, key INT_MIN


def _kernel(x_ref, ids_ref, tau_ref, *, k):
  # x_ref   [Np] float32 row (entries >= N: padding of the lowest key)
  # ids_ref [Np] int32   out: slots [0, k) get the set's positions in ascending order
  # tau_ref []   float32 out: the k-th largest entry
  (np_,) = x_ref.shape
  key = reference.order_keys(x_ref[...])
  count = lambda c: jnp.sum((key >= c).astype(jnp.int32))
  t = jnp.where(count(jnp.int32(0)) >= k, jnp.int32(0), jnp.int32(_INT_MIN))
  for b in range(30, -1, -1):
    c = t | jnp.int32(1 << b)
    t = jnp.where(count(c) >= k, c, t)
  above = key > t
  tied = key == t
  take = above | (tied & (jnp.cumsum(tied.astype(jnp.int32))
                          <= k - jnp.sum(above.astype(jnp.int32))))
  rank = jnp.cumsum(take.astype(jnp.int32)) - 1
  pos = jnp.arange(np_, dtype=jnp.int32)
  slot = jnp.where(take, rank, k + pos - rank - 1)      # distinct: out of the set past k
  plgpu_triton.store(ids_ref.at[slot], pos, mask=take)
  tau_ref[...] = reference.from_order_keys(t)           # the key of t back to its bits


def top_select(x, k, *, interpret=False, num_warps=None):
  """Triton top-k selection; semantics of reference.top_select. Rows of N <= MAX_ROW
  entries (NotImplementedError beyond: api.py then falls back)."""
  check_backend(interpret)
  lead, n = x.shape[:-1], x.shape[-1]
  if n > MAX_ROW:
    raise NotImplementedError(f"N={n}: the Triton top-k selection holds rows of at most "
                              f"{MAX_ROW} entries.")
  np_ = max(next_pow2(n), 16)
  rows = 1
  for s in lead:
    rows *= s
  xr = x.astype(jnp.float32).reshape(rows, n)
  if np_ > n:
    pad = jax.lax.bitcast_convert_type(jnp.full((rows, np_ - n), _LOWEST, jnp.int32),
                                       jnp.float32)
    xr = jnp.concatenate([xr, pad], axis=1)
  if num_warps is None:                 # ~32 entries per thread, 4 .. 16 warps
    num_warps = min(16, max(4, np_ // 1024))
  ids, tau = pl.pallas_call(
      functools.partial(_kernel, k=int(k)), grid=(rows,),
      in_specs=[pl.BlockSpec((None, np_), lambda r: (r, 0))],
      out_specs=[pl.BlockSpec((None, np_), lambda r: (r, 0)),
                 pl.BlockSpec((None,), lambda r: (r,))],
      out_shape=[jax.ShapeDtypeStruct((rows, np_), jnp.int32),
                 jax.ShapeDtypeStruct((rows,), jnp.float32)],
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      name="condensate_top_select")(xr)
  return ids[:, :k].reshape(lead + (k,)), tau.reshape(lead)
