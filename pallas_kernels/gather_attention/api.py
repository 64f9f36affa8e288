"""Gather attention entry point: `implementation=` dispatch and interpret mode.

implementation:
  "reference"   plain jnp (reference.py), any platform;
  "triton"      GPU kernel (gpu_triton.py), Triton lowering of pallas_call;
  "mosaic_tpu"  TPU kernel (tpu_mosaic.py), scalar-prefetched indices drive row DMAs;
  None          the best for the platform: GPU "triton", TPU "mosaic_tpu", CPU "triton"
                interpreted (so the kernel itself runs, slowly, everywhere).
interpret: None = True exactly when the platform is CPU (Pallas interpret mode).
A backend that raises NotImplementedError for its inputs falls back to the next one
("reference" last) when implementation is None; a named implementation never falls back.
"""

from __future__ import annotations

import jax

from pallas_kernels import util
from pallas_kernels.gather_attention import gpu_triton, reference, tpu_mosaic

IMPLEMENTATIONS = {
    "reference": reference.gather_attention,
    "triton": gpu_triton.gather_attention,
    "mosaic_tpu": tpu_mosaic.gather_attention,
}
_BEST = {"gpu": ("triton", "reference"), "tpu": ("mosaic_tpu", "reference"),
         "cpu": ("triton", "reference")}


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  platform = platform or jax.default_backend()
  return _BEST.get(platform, ("reference",))


def gather_attention(q, k, v, indices, valid, *, scale=None, shared_indices=None,
                     shared_valid=None, implementation=None, interpret=None, **kernel_kw):
  """Softmax attention of every query over its selected key rows.

  Args:
    q [B, T, Hq, D]; k, v [B, S, Hkv, D].
    indices, valid [B, Hq, T, N]: per (batch, query head, query) key positions + mask.
    shared_indices, shared_valid [B, Hkv, T, M]: positions attended by every query head
      of a K/V group (read once per group by the kernels); optional.
    scale: score scale, default 1/sqrt(D).
    implementation, interpret: see the module docstring.
    kernel_kw: backend tuning (e.g. num_warps, head_chunk); ignored by "reference".
  Returns:
    o [B, T, Hq, D] in q.dtype, lse [B, Hq, T] float32 (log-sum-exp of the scaled
    scores over the set; -inf and o = 0 for an empty set), so partial results merge.
  """
  kw = dict(scale=scale, shared_indices=shared_indices, shared_valid=shared_valid)
  return util.dispatch("gather_attention", IMPLEMENTATIONS, _BEST, implementation,
                       interpret, (q, k, v, indices, valid), kw, kernel_kw)
