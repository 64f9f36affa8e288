"""The timed block-sparse causal prefill of selection="blocks" (DESIGN.md §4): the
per-query-block lists (`selection.prefill_lists`), then the block-sparse prefill kernel.
"""

from __future__ import annotations

import functools

import jax

from condensate_jax.impl import pallas_blocks
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


@functools.partial(jax.jit, static_argnames=("spec", "scale", "method", "kernel_kw"))
def prefill_step(q, k, v, *, spec, scale, method="superblock", kernel_kw=()):
  """Block-sparse causal prefill (the timed path): lists + kernel. Returns (o, lse)."""
  kblocks, kflags = prefill_lists(q, k, spec, method=method)
  return prefill_attend(q, k, v, kblocks, kflags, spec=spec, scale=scale,
                        kernel_kw=kernel_kw)
