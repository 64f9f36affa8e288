"""The timed block-sparse causal prefill of selection="blocks" (DESIGN.md §4): the
per-query-block lists (`selection.prefill_lists`), then the block-sparse prefill kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from condensate_jax import finite, validation
from condensate_jax.impl import pallas_blocks
from condensate_jax.selection import order as order_lib
from condensate_jax.selection.prefill_lists import prefill_lists
from pallas_kernels.block_sparse import api as _bs_api


@functools.partial(jax.jit, static_argnames=("spec", "scale", "kernel_kw"))
def prefill_attend(q, k, v, kblocks, kflags, *, spec, scale, kernel_kw=()):
  """The prefill kernel alone on given lists (kernel_kw: a tuple of (name, value) pairs
  for the Triton kernel, e.g. (("skip", "mask"), ("num_stages", 3))). Returns (o, lse)."""
  return _bs_api.block_prefill(q, k, v, kblocks, kflags, block_size=spec.block_size,
                               anchor=spec.anchor, window=spec.window, scale=scale,
                               implementation=pallas_blocks.KERNEL_IMPLEMENTATION,
                               **dict(kernel_kw))


def prefill_step(q, k, v, *, spec, scale, method="superblock", kernel_kw=()):
  """Block-sparse causal prefill (the timed path): lists + kernel. Returns (o, lse).

  q [B, T, Hq, D] are the last T of the keys k, v [B, S, Hkv, D] (T <= S). Inputs are
  validated first. Non-finite values (`finite.py`): q, k and v are zeroed there before
  the lists and the kernel, and a query that reads one (its q row, or the k or v row of
  a key at or before its position) gets NaN o and lse; the others are unaffected."""
  validation.check_fast_spec(spec, "prefill_step")
  validation.check_qkv(q, k, v)
  t, s_len = q.shape[1], k.shape[1]
  if not 1 <= t <= s_len:
    raise ValueError(f"q.shape[1]={t}: expected 1 <= T <= S = {s_len} (the queries are "
                     "the last T keys).")
  scale = validation.check_scale(scale, q.shape[3], optional=False)
  if method not in order_lib.TOP_M_METHODS:
    raise ValueError(f"method={method!r}: expected one of {list(order_lib.TOP_M_METHODS)}.")
  kernel_kw = tuple(kernel_kw)
  if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
             for x in kernel_kw):
    raise ValueError(f"kernel_kw={kernel_kw!r}: expected (name, value) pairs.")
  return _prefill_step(q, k, v, spec=spec, scale=scale, method=method,
                       kernel_kw=kernel_kw)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "method", "kernel_kw"))
def _prefill_step(q, k, v, *, spec, scale, method, kernel_kw):
  b, t = q.shape[:2]
  s_len = k.shape[1]
  positions = jnp.broadcast_to(s_len - t + jnp.arange(t, dtype=jnp.int32), (b, t))
  bad = finite.reads_nonfinite(q, k, v, positions, jnp.full((b,), s_len, jnp.int32),
                               causal=True, sliding_window=None)            # [B, T, Hq]
  q, k, v = finite.sanitize(q), finite.sanitize(k), finite.sanitize(v)
  kblocks, kflags = prefill_lists(q, k, spec, method=method)
  o, lse = prefill_attend(q, k, v, kblocks, kflags, spec=spec, scale=scale,
                          kernel_kw=kernel_kw)
  # o [B, T, Hq, D], lse [B, Hq, T] (block_sparse.reference.block_prefill)
  return finite.poison(o, bad), jnp.where(bad.transpose(0, 2, 1), jnp.nan, lse)
