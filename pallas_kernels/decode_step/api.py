"""Fused decode step entry point: `implementation=` dispatch and interpret mode.

implementation:
  "reference"  plain jnp (reference.py; dense masks: small shapes only), any platform;
  "triton"     GPU kernels (gpu_triton.py), Triton lowering of pallas_call;
  None         the best for the platform: GPU "triton", CPU "triton" interpreted (so the
               kernel itself runs, slowly, everywhere), else "reference".
interpret: None = True exactly when the platform is CPU (Pallas interpret mode).
With implementation=None a backend raising NotImplementedError (e.g. S != nb * P, a
block size or head dim the kernel does not take) falls back to "reference"; a named
implementation never falls back (its NotImplementedError propagates).
"""

from __future__ import annotations

import types

import jax

from pallas_kernels import util
from pallas_kernels.decode_step import gpu_triton, reference

IMPLEMENTATIONS = types.MappingProxyType({
    "reference": reference.decode_step,
    "triton": gpu_triton.decode_step,
})
_BEST = types.MappingProxyType({"gpu": ("triton", "reference"),
                                "cpu": ("triton", "reference")})


def default_implementations(platform: str | None = None) -> tuple[str, ...]:
  return _BEST.get(platform or jax.default_backend(), ("reference",))


def decode_step(q, k, v, ids, u, kv_lengths, *, block_size, scale, anchor, window,
                top=None, implementation=None, interpret=None, **kernel_kw):
  """Decode attention over anchor, window and the selected blocks, plus eps (see
  reference.py).

  q [B, 1, Hq, D]; k, v [B, S, Hkv, D]; ids [B, Hkv, W] int32 block ids (-1 = none; the
  first `top`, default W, are the selection); u [B, Hkv, G or Gp, nb] float32 bounds;
  kv_lengths [B]. kernel_kw: backend options (finish, with_eps, num_warps, num_stages,
  eps_chunk); ignored by "reference", except with_eps=False, which makes eps None there
  too. Returns out [B, 1, Hq, D] (q's dtype), lse [B, Hq], eps [B, Hq] float32.
  """
  kw = dict(block_size=block_size, scale=scale, anchor=anchor, window=window, top=top)
  out, lse, eps = util.dispatch("decode_step", IMPLEMENTATIONS, _BEST, implementation,
                                 interpret, (q, k, v, ids, u, kv_lengths), kw, kernel_kw)
  if not kernel_kw.get("with_eps", True):
    eps = None
  return out, lse, eps
