"""Top-k selection, reference (plain jnp): the spec of the op.

Input x [..., N] float32, 1 <= k <= N. The set of a row is the k positions
`jax.lax.top_k(x, k)` returns: the k largest in the total order of floats
(-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN, as XLA's top_k ranks them, except its
GPU kernel for k <= 16 and N >= 1024: see `total_top_k`), entries of equal bits taken
from the lower position first. Returns
  ids  [..., k] int32    the set's positions in ascending order;
  tau  [...]    float32  the k-th largest entry (the set's smallest; bits as in x).
Values of the set are x at ids (`jnp.take_along_axis(x, ids, -1)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def order_keys(x):
  """float32 -> int32 keys whose signed order is the total order of floats above (the
  magnitude bits of negative floats flipped); the map is its own inverse on int32."""
  u = jax.lax.bitcast_convert_type(x, jnp.int32)
  return u ^ ((u >> 31) & 0x7FFFFFFF)


def from_order_keys(key):
  """The inverse of `order_keys`."""
  return jax.lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), jnp.float32)


def total_max(x, axis):
  """The largest entry along `axis` in the total order (+NaN above +inf, -NaN below
  -inf, +0 above -0), bits as in x: the maximum `lax.top_k` ranks first."""
  return from_order_keys(jnp.max(order_keys(x.astype(jnp.float32)), axis=axis))


def total_top_k(x, k: int):
  """(vals, ids) of the k largest entries of x [..., N] in the total order above (ties to
  the lower position), values first: `lax.top_k` ranked on the int32 `order_keys`. On
  float rows XLA's GPU top_k takes a special kernel for float32 / bfloat16 with k <= 16
  and N >= 1024 that compares raw floats (NaN anywhere, -0 == +0; openxla/xla#48119, seen
  on an H200, jax 0.11.2); integer rows take the stable sort on every platform."""
  x = x.astype(jnp.float32)
  _, ids = jax.lax.top_k(order_keys(x), k)
  return jnp.take_along_axis(x, ids, axis=-1), ids.astype(jnp.int32)


def top_select(x, k: int):
  vals, ids = total_top_k(x, k)
  return jnp.sort(ids, axis=-1), vals[..., -1]
