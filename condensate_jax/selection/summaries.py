"""Block summaries (DESIGN.md §4): per block of P keys and per KV head, the elementwise
min and max of the keys, kept beside the KV cache (built at prefill, appended per token).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from condensate_jax import validation


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kmin", "kmax"],
                   meta_fields=["block_size"])
@dataclasses.dataclass(frozen=True)
class BlockSummaries:
  """Elementwise min / max of the keys of each block, per KV head.

  kmin, kmax: [B, nb, Hkv, D] in the keys' dtype (min and max of key values are key
    values, so no rounding); a block with no key holds +inf / -inf.
  block_size: P, keys per block (static). Block b holds positions b*P .. b*P+P-1.
  """
  kmin: jax.Array
  kmax: jax.Array
  block_size: int

  @property
  def num_blocks(self) -> int:
    return self.kmin.shape[1]

  @property
  def capacity(self) -> int:
    return self.kmin.shape[1] * self.block_size


def num_blocks(num_keys: int, block_size: int) -> int:
  return -(-int(num_keys) // int(block_size))


def build_summaries(k, block_size: int, kv_lengths=None) -> BlockSummaries:
  """Summaries of k [B, S, Hkv, D]; keys at positions >= kv_lengths[b] are ignored."""
  validation.check_keys(k)
  b, s, _, _ = k.shape
  p = validation.check_block_size(block_size, s)
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)
  else:
    kv_lengths = validation.check_int_array("kv_lengths", kv_lengths, (b,), 0, s)
  return build(k, kv_lengths, p)


@functools.partial(jax.jit, static_argnames=("p",))
def build(k, kv_lengths, p):
  """`build_summaries` on validated inputs (traceable; p static)."""
  b, s, hkv, d = k.shape
  nb = num_blocks(s, p)
  pad = nb * p - s
  valid = (jnp.arange(nb * p) < kv_lengths[:, None])[:, :, None, None]
  kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  inf = jnp.array(jnp.inf, k.dtype)
  kmin = jnp.where(valid, kp, inf).reshape(b, nb, p, hkv, d).min(axis=2)
  kmax = jnp.where(valid, kp, -inf).reshape(b, nb, p, hkv, d).max(axis=2)
  nan = jnp.any((valid & jnp.isnan(kp)).reshape(b, nb, p, hkv, d), axis=2)
  return _with_nan(BlockSummaries(kmin, kmax, p), nan)


def _with_nan(summ, nan):
  """NaN where a block holds a NaN key entry: XLA's vectorised min / max reductions on
  CPU skip NaN (seen with jax 0.10.2), and a summary must not hide a NaN key."""
  nan_v = jnp.array(jnp.nan, summ.kmin.dtype)
  return BlockSummaries(jnp.where(nan, nan_v, summ.kmin), jnp.where(nan, nan_v, summ.kmax),
                        summ.block_size)


def empty_summaries(batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                    block_size: int, dtype=jnp.float32) -> BlockSummaries:
  """Summaries of an empty cache of `capacity` positions (every block empty)."""
  for name, value in (("batch", batch), ("capacity", capacity),
                      ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
        1 <= value <= validation.INT32_MAX):
      raise ValueError(f"{name}={value!r}: expected an int in [1, {validation.INT32_MAX}].")
  if jnp.dtype(dtype) not in [jnp.dtype(x) for x in validation.DTYPES]:
    raise ValueError(f"dtype={dtype!r}: expected one of {validation.DTYPE_NAMES}.")
  p = validation.check_block_size(block_size, capacity)
  shape = (batch, num_blocks(capacity, p), num_kv_heads, head_dim)
  return BlockSummaries(jnp.full(shape, jnp.inf, dtype), jnp.full(shape, -jnp.inf, dtype), p)


def append_summaries(summ: BlockSummaries, k_new, positions) -> BlockSummaries:
  """Summaries after writing keys k_new [B, T, Hkv, D] at positions [B, T].

  Equals `build_summaries` of the cache after the write (min/max are order-free), as long
  as no position is overwritten with a different key. Negative positions are skipped
  (padding); concrete positions >= capacity raise, traced ones are dropped.
  """
  if not isinstance(summ, BlockSummaries):
    raise ValueError(f"summ: expected BlockSummaries, got {type(summ).__name__}.")
  validation.check_keys(k_new, "k_new")
  b, t, hkv, d = k_new.shape
  if (b, hkv, d) != (summ.kmin.shape[0], summ.kmin.shape[2], summ.kmin.shape[3]):
    raise ValueError(f"k_new.shape={tuple(k_new.shape)}: expected [B, T, Hkv, D] with "
                     f"B, Hkv, D = {summ.kmin.shape[0]}, {summ.kmin.shape[2]}, "
                     f"{summ.kmin.shape[3]} (the summaries').")
  positions = validation.check_int_array("positions", positions, (b, t), -(2**31 - 1),
                                         summ.capacity - 1)
  return _append(summ, k_new, positions)


@jax.jit
def _append(summ, k_new, positions):
  nb = summ.num_blocks
  blk = jnp.where(positions >= 0, positions // summ.block_size, nb)   # nb: dropped
  rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
  k_new = k_new.astype(summ.kmin.dtype)
  kmin = summ.kmin.at[rows, blk].min(k_new, mode="drop")
  kmax = summ.kmax.at[rows, blk].max(k_new, mode="drop")
  nan = jnp.zeros(kmin.shape, bool).at[rows, blk].max(jnp.isnan(k_new), mode="drop")
  return _with_nan(BlockSummaries(kmin, kmax, summ.block_size),
                   nan | jnp.isnan(summ.kmin) | jnp.isnan(summ.kmax))


def check_summaries(summ, k, spec):
  """`summaries` must be the BlockSummaries of these keys at spec.block_size."""
  if not isinstance(summ, BlockSummaries):
    raise ValueError(f"summaries: expected BlockSummaries or None, got "
                     f"{type(summ).__name__}.")
  if summ.block_size != spec.block_size:
    raise ValueError(f"summaries.block_size={summ.block_size}: expected "
                     f"spec.block_size={spec.block_size}.")
  b, s, hkv, d = k.shape
  want = (b, num_blocks(s, spec.block_size), hkv, d)
  if tuple(summ.kmin.shape) != want or tuple(summ.kmax.shape) != want:
    raise ValueError(f"summaries.kmin.shape={tuple(summ.kmin.shape)}: expected {want} "
                     "([B, ceil(S / block_size), Hkv, D] for these keys).")
