"""Block-sparse attention entry points: `implementation=` dispatch and interpret mode.

implementation:
  "reference"  plain jnp (reference.py), any platform (dense masks: small shapes only);
  "triton"     GPU kernels (gpu_triton.py), Triton lowering of pallas_call;
  "mosaic_tpu" TPU kernels (tpu_mosaic.py): scalar-prefetched block ids drive the K/V
               BlockSpecs, so the Mosaic pipeline DMAs only the listed [P, D] blocks.
               Tested only in TPU interpret mode on CPU (`implementation="mosaic_tpu",
               interpret=True`, which runs it under `pltpu.InterpretParams()`) and by
               lowering it to Mosaic for platform "tpu" (jax.export); never compiled
               or run on a real TPU, so whether libtpu accepts it and its speed there
               are unverified;
  None         the best for the platform: GPU "triton", TPU "mosaic_tpu", CPU "triton"
               interpreted (so the kernel itself runs, slowly, everywhere), else
               "reference".
interpret: None = True exactly when the platform is CPU (Pallas interpret mode).
With implementation=None a backend raising NotImplementedError (e.g. a block size or head
dim the kernel does not take) falls back to "reference"; a named one never falls back.
"""

from __future__ import annotations

import jax

from pallas_kernels import util
from pallas_kernels.block_sparse import gpu_triton, reference, tpu_mosaic

_BEST = {"gpu": ("triton", "reference"), "tpu": ("mosaic_tpu", "reference"),
         "cpu": ("triton", "reference")}
IMPLEMENTATIONS = ("reference", "triton", "mosaic_tpu")
_MODULES = {"reference": reference, "triton": gpu_triton, "mosaic_tpu": tpu_mosaic}


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  return _BEST.get(platform or jax.default_backend(), ("reference",))


def _dispatch(implementation, interpret, op, args, kw, kernel_kw):
  table = {name: getattr(module, op) for name, module in _MODULES.items()}
  return util.dispatch(op, table, _BEST, implementation, interpret, args, kw, kernel_kw)


def block_decode(q, k, v, blocks, ranges, *, block_size, scale, anchor, window,
                 with_static=True, implementation=None, interpret=None, **kernel_kw):
  """Split-K block decode (see reference.block_decode).

  q [B, T, Hq, D]; k, v [B, S, Hkv, D]; blocks [B, Hkv, T, NS, BPS] int32 block ids
  (-1 = none); ranges [B, T, 6 or 8] int32 (a_lo, a_hi, w_lo, w_hi, m_lo, m_hi).
  anchor, window: static maxima of the anchor / window range lengths.
  Returns o_parts [B, T, Hq, NS, D] float32, lse_parts [B, Hq, T, NS] float32;
  `reference.combine` merges them.
  """
  kw = dict(block_size=block_size, scale=scale, with_static=with_static)
  kernel_kw = dict(kernel_kw, anchor=anchor, window=window)
  return _dispatch(implementation, interpret, "block_decode", (q, k, v, blocks, ranges), kw,
                   kernel_kw)


def block_prefill(q, k, v, kblocks, kflags, *, block_size, anchor, window, scale,
                  implementation=None, interpret=None, **kernel_kw):
  """Block-sparse causal prefill (see reference.block_prefill); returns (o, lse)."""
  kw = dict(block_size=block_size, anchor=anchor, window=window, scale=scale)
  return _dispatch(implementation, interpret, "block_prefill", (q, k, v, kblocks, kflags),
                   kw, kernel_kw)


combine = reference.combine
