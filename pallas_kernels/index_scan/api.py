"""Index scan entry point: `implementation=` dispatch and interpret mode.

implementation:
  "reference"  plain jnp (reference.py), any platform;
  "triton"     GPU kernel (gpu_triton.py), Triton lowering of pallas_call, float32 sums
               on CUDA cores;
  "triton_mma" GPU kernel (gpu_triton_mma.py), the same on tensor cores (bf16 codes,
               q * sigma in three bf16 parts, float32 accumulation; ~1.8x faster on an
               H200, where its jitted rounding test passed: jax 0.11.2, 2026-12-04);
  "mosaic_gpu" Hopper kernel (gpu_mosaic.py): triton_mma's arithmetic through Mosaic GPU
               (wgmma, TMA pipelining), off the deprecated Triton backend; correct on an
               H200 but 0.84-0.88x triton_mma's speed there (2026-12-04), so opt-in (no
               interpret mode: GPU tests only);
  None         the best for the platform: GPU "triton_mma" (packed rows it refuses:
               "triton"), CPU "triton" interpreted, else
               "reference"; a backend raising NotImplementedError falls back to the next.
interpret: None = True exactly when the platform is CPU (Pallas interpret mode).
"""

from __future__ import annotations

import types

import jax

from pallas_kernels import util
from pallas_kernels.index_scan import gpu_mosaic, gpu_triton, gpu_triton_mma, reference

IMPLEMENTATIONS = types.MappingProxyType({
    "reference": reference.index_scan,
    "triton": gpu_triton.index_scan,
    "triton_mma": gpu_triton_mma.index_scan,
    "mosaic_gpu": gpu_mosaic.index_scan,
})
_BEST = types.MappingProxyType({"gpu": ("triton_mma", "triton", "reference"),
                                "cpu": ("triton", "reference")})


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  return _BEST.get(platform or jax.default_backend(), ("reference",))


def index_scan(qs, qmu, packed, step, kv_lengths, *, scale, bits, group, anchor=0,
               window=0, implementation=None, interpret=None, **kernel_kw):
  """Key-index estimates of decode queries, est [B, K, Gp, S] float32 (see reference.py).
  kernel_kw: backend tuning (block_keys, num_warps, num_stages); ignored by "reference"."""
  kw = dict(scale=scale, bits=bits, group=group, anchor=anchor, window=window)
  return util.dispatch("index_scan", IMPLEMENTATIONS, _BEST, implementation, interpret,
                       (qs, qmu, packed, step, kv_lengths), kw, kernel_kw)
