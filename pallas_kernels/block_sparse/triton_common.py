"""Triton tile helpers shared by the block-sparse, fused decode-step and bounds kernels.

Online softmax over [R, C] score tiles in float32 (`softmax_init`, `softmax_step`,
`softmax_finish`), the decode reads (`attend` a tile, `range_chunks` a key range in
static chunks, `block_read` one key block as a contiguous [P, D] tile), `group_rows` (a
K/V head's query rows gathered in the kernel) and the NotImplementedError checks that
let an `api.py` fall back. Precision (`dot_precision`): bf16/f16 inputs use tensor-core
dots with float32 accumulation (p is cast to v's dtype for the second dot, as flash
attention does); float32 inputs ask for Precision.HIGHEST (IEEE float32, no TF32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG_INF = float("-inf")


def dot_precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def softmax_step(carry, s, v, precision):
  """Online softmax over one tile: s [R, C] float32 (-inf = masked), v [C, D]."""
  m, l, acc = carry
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
  alpha = jnp.exp(m - m_use)
  p = jnp.exp(s - m_use[:, None])
  l = alpha * l + jnp.sum(p, axis=1)
  pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
               precision=precision)
  return m_new, l, alpha[:, None] * acc + pv


def softmax_finish(m, l, acc):
  # l != 0, not l > 0: a NaN sum (a non-finite score or value) stays NaN, never 0
  ok = l != 0
  l_safe = jnp.where(ok, l, 1.0)
  o = jnp.where(ok[:, None], acc / l_safe[:, None], 0.0)
  lse = jnp.where(ok, jnp.where(m == NEG_INF, 0.0, m) + jnp.log(l_safe), NEG_INF)
  return o, lse


def attend(carry, q, k, v, ok, scale, precision):
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * scale
  return softmax_step(carry, jnp.where(ok[None, :], s, NEG_INF), v, precision)


def range_chunks(carry, q, k_ref, v_ref, lo, hi, n, chunk, num_keys, scale, precision):
  """Attends keys lo..hi (inclusive, at most n * chunk of them) in n static chunks."""
  for c in range(n):
    pos = lo + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    ok = (pos <= hi) & (pos < num_keys)
    safe = jnp.clip(pos, 0, num_keys - 1)
    carry = attend(carry, q, k_ref[safe, :], v_ref[safe, :], ok, scale, precision)
  return carry


def block_read(carry, q, k_ref, v_ref, blk, m_lo, m_hi, block_size, num_keys, scale,
               precision):
  """Attends the middle keys of key block blk (one contiguous [P, D] tile)."""
  start = pl.multiple_of(blk * block_size, block_size)
  pos = start + jnp.arange(block_size, dtype=jnp.int32)
  ok = (pos >= m_lo) & (pos <= m_hi) & (pos < num_keys)
  return attend(carry, q, k_ref[pl.ds(start, block_size), :],
                v_ref[pl.ds(start, block_size), :], ok, scale, precision)


def softmax_init(gp, d):
  return (jnp.full((gp,), NEG_INF, jnp.float32), jnp.zeros((gp,), jnp.float32),
          jnp.zeros((gp, d), jnp.float32))


def check_backend(interpret):
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError("the Triton backend needs a GPU (or interpret=True).")


def check_supported(q, block_size, interpret):
  """NotImplementedError (api.py then falls back) where these Triton kernels can't run."""
  check_backend(interpret)
  d, p = q.shape[-1], block_size
  if p < 16 or p & (p - 1) or d & (d - 1) or d < 16:
    raise NotImplementedError(f"block_size={p}, head dim {d}: the Triton kernel needs "
                              "powers of two >= 16.")


def group_rows(q_ref, g, gp):
  """The K/V head's G query rows of q_ref [Hq, D] as a [Gp, D] tile, zero rows beyond G
  (a gather: no padded copy of q in memory)."""
  row = jnp.arange(gp, dtype=jnp.int32)
  idx = jnp.where(row < g, pl.program_id(1) * g + row, 0)
  return jnp.where((row < g)[:, None], q_ref[idx, :], 0).astype(q_ref.dtype)
