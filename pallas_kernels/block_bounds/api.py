"""Block bounds entry point: `implementation=` dispatch and interpret mode.

implementation:
  "reference"  plain jnp (reference.py), any platform;
  "triton"     GPU kernel (gpu_triton.py), Triton lowering of pallas_call;
  None         the best for the platform: GPU "triton", CPU "triton" interpreted (so the
               kernel itself runs, slowly, everywhere), else "reference".
interpret: None = True exactly when the platform is CPU (Pallas interpret mode).
With implementation=None a backend raising NotImplementedError (e.g. nb not divisible by
16) falls back to "reference"; a named implementation never falls back (its
NotImplementedError propagates).
"""

from __future__ import annotations

import types

import jax

from pallas_kernels import util
from pallas_kernels.block_bounds import gpu_triton, reference

IMPLEMENTATIONS = types.MappingProxyType({
    "reference": reference.block_bounds,
    "triton": gpu_triton.block_bounds,
})
_BEST = types.MappingProxyType({"gpu": ("triton", "reference"),
                                "cpu": ("triton", "reference")})


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  return _BEST.get(platform or jax.default_backend(), ("reference",))


def block_bounds(q, kmin, kmax, *, scale, slack, with_centre=False, kv_lengths=None,
                 block_size=None, anchor=0, window=0, superblock=None,
                 implementation=None, interpret=None, **kernel_kw):
  """Box bounds of decode queries over key blocks (see reference.py).

  q [B, Hq, D]; kmin, kmax [B, nb, K, D]; kv_lengths [B] (with block_size, anchor,
  window): -inf for blocks without middle keys; superblock X: also the per-X-blocks max.
  kernel_kw: backend tuning (chunk, num_warps, num_stages); ignored by "reference".
  Returns u [B, K, Gp, nb] float32 (rows >= G: padding), or the tuple
  (u, [centre], [superblock max]).
  """
  kw = dict(scale=scale, slack=slack, with_centre=with_centre, kv_lengths=kv_lengths,
            block_size=block_size, anchor=anchor, window=window, superblock=superblock)
  return util.dispatch("block_bounds", IMPLEMENTATIONS, _BEST, implementation, interpret,
                        (q, kmin, kmax), kw, kernel_kw)
