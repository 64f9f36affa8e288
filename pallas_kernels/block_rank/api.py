"""Block rank selection entry points: `implementation=` dispatch and interpret mode.

implementation:
  "reference"  plain jnp (reference.py; lax.top_k), any platform;
  "triton"     GPU kernels (gpu_triton.py), Triton lowering of pallas_call;
  None         the best for the platform: GPU "triton", CPU "triton" interpreted (so the
               kernel itself runs, slowly, everywhere), else "reference".
interpret: None = True exactly when the platform is CPU (Pallas interpret mode).
With implementation=None a backend raising NotImplementedError (e.g. a superblock count
that is not a power of two) falls back to "reference"; a named implementation never
falls back (its NotImplementedError propagates).
IMPLEMENTATIONS maps a name to its Ops(superblock_select, rank_select).
"""

from __future__ import annotations

import types
from typing import Callable, NamedTuple

import jax

from pallas_kernels import util
from pallas_kernels.block_rank import gpu_triton, reference


class Ops(NamedTuple):
  superblock_select: Callable
  rank_select: Callable


IMPLEMENTATIONS = types.MappingProxyType({
    "reference": Ops(reference.superblock_select, reference.rank_select),
    "triton": Ops(gpu_triton.superblock_select, gpu_triton.rank_select),
})
_BEST = types.MappingProxyType({"gpu": ("triton", "reference"),
                                "cpu": ("triton", "reference")})


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  return _BEST.get(platform or jax.default_backend(), ("reference",))


def _table(op):
  return {name: getattr(ops, op) for name, ops in IMPLEMENTATIONS.items()}


def superblock_select(sbmax, *, top, heads, implementation=None, interpret=None,
                      **kernel_kw):
  """The top `top` superblocks by group score (see reference.py).

  sbmax [B, K, Gp, nsb] float32 per-row superblock maxima; rows >= heads are ignored.
  kernel_kw: backend tuning (per_program, num_warps); ignored by "reference".
  Returns (sbids [B, K, next_pow2(top)] int32, -1 beyond top; best [B, K, Gp] float32).
  """
  return util.dispatch("superblock_select", _table("superblock_select"), _BEST,
                        implementation, interpret, (sbmax,), dict(top=top, heads=heads),
                        kernel_kw)


def rank_select(sbids, score, best, *, top, superblock, heads, width=None,
                implementation=None, interpret=None, **kernel_kw):
  """The top `top` blocks of the candidate superblocks by group score (see reference.py).

  sbids [B, K, C] int32 candidate superblocks (-1 = none); score [B, K, Gp, nb] float32;
  best [B, K, Gp] float32; superblock: blocks per superblock.
  kernel_kw: backend tuning (num_warps); ignored by "reference".
  Returns ids [B, K, width] int32 (default width top; -1 for -inf scores and beyond top).
  """
  kw = dict(top=top, superblock=superblock, heads=heads, width=width)
  return util.dispatch("rank_select", _table("rank_select"), _BEST, implementation,
                        interpret, (sbids, score, best), kw, kernel_kw)
