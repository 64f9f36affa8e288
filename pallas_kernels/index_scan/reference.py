"""Index scan, reference (plain jnp): the spec of the op.

Inputs, per batch row b and K/V head k (query head k*G + g belongs to K/V head k):
  qs     [B, K, Gp, D] float32  the group's decode queries times the index's sigma
                                (rows g >= G: padding, any value)
  qmu    [B, K, Gp]    float32  q . mu of the same queries
  packed [B, K, S, D']  uint8   codes packed 8 / bits to a byte, D' = D * bits / 8:
                                byte i holds channels i + n D' (n = 0 .. 8 / bits - 1)
                                at bits n*bits .. (n+1)*bits - 1, each as c + L,
                                L = 2^(bits-1) - 1 (`unpack` gives the signed codes)
  step   [B, K, S]     float32  per-key code step
  kv_lengths [B] int32          the decode query of row b sits at position len_b - 1

  est[b, k, g, j] = scale * (qmu[b, k, g] + step[b, k, j] * sum_i qs[b, k, g, i] c[b, k, j, i])

for the middle keys j of that query, anchor <= j <= len_b - 1 - window; -inf for every
other key and for the padding rows g >= G. float32 [B, K, Gp, S]. (The caller adds the
index's slack to turn est into rigorous bounds: `condensate_jax.selection.index`.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def levels(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def unpack(packed, bits: int):
  """Signed codes int32 [..., D] of packed uint8 [..., D * bits / 8]."""
  per, mask = 8 // bits, (1 << bits) - 1
  x = packed.astype(jnp.int32)
  return jnp.concatenate([((x >> (n * bits)) & mask) - levels(bits) for n in range(per)],
                         axis=-1)


def middle_mask(kv_lengths, num_keys, anchor, window):
  """[B, S] bool: the middle keys of each row's decode query."""
  j = jnp.arange(num_keys, dtype=jnp.int32)
  return (j >= anchor) & (j <= kv_lengths.astype(jnp.int32)[:, None] - 1 - window)


def index_scan(qs, qmu, packed, step, kv_lengths, *, scale, bits, group, anchor, window):
  codes = unpack(packed, bits).astype(jnp.float32)                        # [B, K, S, D]
  dot = jnp.einsum("bkgd,bksd->bkgs", qs.astype(jnp.float32), codes,
                   precision=jax.lax.Precision.HIGHEST)
  est = jnp.float32(scale) * (qmu[..., None] + step[:, :, None, :] * dot)
  keep = middle_mask(kv_lengths, packed.shape[2], anchor, window)[:, None, None, :]
  keep = keep & (jnp.arange(qs.shape[2]) < group)[None, None, :, None]
  return jnp.where(keep, est, -jnp.inf)

