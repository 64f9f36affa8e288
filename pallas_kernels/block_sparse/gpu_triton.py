"""Block-sparse attention, GPU backend: `pallas_call` lowered through Triton.

block_decode: one program per (batch b, K/V head h, query t, split s). The G query heads
  of the group (zero-padded to Gp >= 16 rows so scores are one tensor-core dot) share
  every K/V read: split s walks its list of block ids and loads each block once as a
  contiguous [P, D] tile (`pl.ds(blk * P, P)`), split 0 first walks the anchor and window
  ranges in chunks. Online softmax in float32; each split writes its normalised partial
  output and lse (split-K: `reference.combine` merges them). Blocks with id -1 are skipped
  by a `lax.cond`, so they cost no memory traffic.
block_prefill: one program per (b, query head, query block I): a [P, D] query tile, the
  listed key blocks each loaded once as [P, D] tiles, flash-attention online softmax.

Precision: bf16/f16 inputs use tensor-core dots with float32 accumulation (p is cast to
v's dtype for the second dot, as flash attention does); float32 inputs ask for
Precision.HIGHEST (IEEE float32, no TF32). The tile helpers are in triton_common.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.util import next_pow2
from pallas_kernels.block_sparse.triton_common import (
    NEG_INF, block_read, check_supported, dot_precision, range_chunks, softmax_finish,
    softmax_init, softmax_step)


# --------------------------------------------------------------------------- decode


def _decode_kernel(ranges_ref, blocks_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale,
                   block_size, chunk, n_anchor_chunks, n_window_chunks, blocks_per_split,
                   num_keys, with_static, precision):
  # Inputs
  # ranges_ref [8]       int32 (a_lo, a_hi, w_lo, w_hi, m_lo, m_hi, -, -), inclusive
  # blocks_ref [BPS]     int32 block ids of this split, -1 = none
  # q_ref      [Gp, D]   the group's queries (zero rows beyond G)
  # k_ref      [Sp, D]   keys of this K/V head, Sp = ceil(S / P) * P
  # v_ref      [Sp, D]
  # Outputs
  # o_ref      [Gp, D]   float32 partial output of this split
  # lse_ref    [Gp]      float32
  gp, d = q_ref.shape
  q = q_ref[...]
  carry = softmax_init(gp, d)
  chunks = functools.partial(range_chunks, q=q, k_ref=k_ref, v_ref=v_ref, chunk=chunk,
                             num_keys=num_keys, scale=scale, precision=precision)

  if with_static:
    def static_part(carry):
      carry = chunks(carry, lo=ranges_ref[0], hi=ranges_ref[1], n=n_anchor_chunks)
      return chunks(carry, lo=ranges_ref[2], hi=ranges_ref[3], n=n_window_chunks)
    carry = jax.lax.cond(pl.program_id(3) == 0, static_part, lambda c: c, carry)

  m_lo, m_hi = ranges_ref[4], ranges_ref[5]

  def block_step(j, carry):
    blk = blocks_ref[j]
    read = lambda c: block_read(c, q, k_ref, v_ref, blk, m_lo, m_hi, block_size,
                                num_keys, scale, precision)
    return jax.lax.cond(blk >= 0, read, lambda c: c, carry)

  carry = jax.lax.fori_loop(0, blocks_per_split, block_step, carry)
  o, lse = softmax_finish(*carry)
  o_ref[...] = o
  lse_ref[...] = lse



def block_decode(q, k, v, blocks, ranges, *, block_size, scale, anchor, window,
                 with_static=True, interpret=False, num_warps=4, num_stages=2):
  """Triton block decode; semantics of reference.block_decode.

  anchor, window: static upper bounds on the anchor / window range lengths (chunk counts).
  Returns o_parts [B, T, Hq, NS, D] float32, lse_parts [B, Hq, T, NS] float32.
  """
  check_supported(q, block_size, interpret)
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  p = block_size
  g = hq // hkv
  gp = max(16, next_pow2(g))
  ns, bps = blocks.shape[3], blocks.shape[4]
  bpsp = next_pow2(bps)
  nb = -(-s_len // p)
  sp = nb * p
  if sp != s_len:   # blocks are read as whole [P, D] tiles
    pad = ((0, 0), (0, sp - s_len), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  qg = q.reshape(b, t, hkv, g, d)
  if gp != g:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
  blocks = blocks.astype(jnp.int32)
  if bpsp != bps:
    blocks = jnp.pad(blocks, [(0, 0)] * 4 + [(0, bpsp - bps)], constant_values=-1)
  ranges = jnp.pad(ranges.astype(jnp.int32), ((0, 0), (0, 0), (0, 8 - ranges.shape[-1])))
  chunk = max(16, min(64, next_pow2(max(anchor, window, 1))))
  kernel = functools.partial(
      _decode_kernel, scale=float(scale), block_size=p, chunk=chunk,
      n_anchor_chunks=-(-anchor // chunk), n_window_chunks=-(-window // chunk),
      blocks_per_split=bpsp, num_keys=s_len, with_static=with_static,
      precision=dot_precision(q.dtype))
  grid = (b, hkv, t, ns)
  in_specs = [
      pl.BlockSpec((None, None, 8), lambda b_, h, t_, s: (b_, t_, 0)),
      pl.BlockSpec((None, None, None, None, bpsp), lambda b_, h, t_, s: (b_, h, t_, s, 0)),
      pl.BlockSpec((None, None, None, gp, d), lambda b_, h, t_, s: (b_, t_, h, 0, 0)),
      pl.BlockSpec((None, sp, None, d), lambda b_, h, t_, s: (b_, 0, h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda b_, h, t_, s: (b_, 0, h, 0)),
  ]
  out_specs = (
      pl.BlockSpec((None, None, None, None, gp, d), lambda b_, h, t_, s: (b_, t_, h, s, 0, 0)),
      pl.BlockSpec((None, None, None, None, gp), lambda b_, h, t_, s: (b_, h, t_, s, 0)),
  )
  out_shape = (jax.ShapeDtypeStruct((b, t, hkv, ns, gp, d), jnp.float32),
               jax.ShapeDtypeStruct((b, hkv, t, ns, gp), jnp.float32))
  o, lse = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      name="condensate_block_decode")(ranges, blocks, qg, k, v)
  o = o[:, :, :, :, :g].transpose(0, 1, 2, 4, 3, 5).reshape(b, t, hq, ns, d)
  lse = lse[..., :g].transpose(0, 1, 4, 2, 3).reshape(b, hq, t, ns)
  return o, lse


# -------------------------------------------------------------------------- prefill


def _prefill_kernel(kblocks_ref, kflags_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    scale, block_size, n_entries, anchor, window, q_offset, num_keys,
                    precision, skip):
  # Inputs
  # kblocks_ref [L]      int32 key block ids of this query block, -1 = none
  # kflags_ref  [L]      int32 1 = the block's middle keys are attended
  # q_ref       [P, D]   one query block of one head
  # k_ref       [Sp, D]  keys of the head's K/V group
  # v_ref       [Sp, D]
  # Outputs
  # o_ref       [P, D]
  # lse_ref     [P]      float32
  p, d = q_ref.shape
  q = q_ref[...]
  qpos = q_offset + pl.program_id(2) * block_size + jnp.arange(p, dtype=jnp.int32)
  carry = softmax_init(p, d)

  def read(carry, blk, flag):
    start = pl.multiple_of(jnp.maximum(blk, 0) * block_size, block_size)
    kpos = start + jnp.arange(block_size, dtype=jnp.int32)
    i, j = qpos[:, None], kpos[None, :]
    static = (j < anchor) | (j > i - window)
    middle = (j >= anchor) & (j <= i - window) & (flag > 0)
    ok = (j <= i) & (j < num_keys) & (static | middle) & (blk >= 0)
    s = jnp.dot(q, k_ref[pl.ds(start, block_size), :].T,
                preferred_element_type=jnp.float32, precision=precision) * scale
    return softmax_step(carry, jnp.where(ok, s, NEG_INF),
                        v_ref[pl.ds(start, block_size), :], precision)

  def entry(e, carry):
    blk, flag = kblocks_ref[e], kflags_ref[e]
    if skip == "cond":    # an empty entry (-1) costs no memory traffic
      return jax.lax.cond(blk >= 0, lambda c: read(c, blk, flag), lambda c: c, carry)
    return read(carry, blk, flag)   # "mask": block 0 read and masked; loads pipeline

  carry = jax.lax.fori_loop(0, n_entries, entry, carry)
  o, lse = softmax_finish(*carry)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def block_prefill(q, k, v, kblocks, kflags, *, block_size, anchor, window, scale,
                  interpret=False, num_warps=4, num_stages=2, skip="cond"):
  """Triton block-sparse causal prefill; semantics of reference.block_prefill.

  skip: "cond" skips empty list entries (-1) behind a branch (no traffic, but the loop's
  loads cannot be software-pipelined); "mask" reads block 0 for them and masks it."""
  if skip not in ("cond", "mask"):
    raise ValueError(f"skip={skip!r}: expected 'cond' or 'mask'.")
  check_supported(q, block_size, interpret)
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  p = block_size
  g = hq // hkv
  nq = -(-t // p)
  tp = nq * p
  sp = -(-s_len // p) * p
  # Queries are padded at the end to whole blocks; padded rows are discarded.
  if tp != t:
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  if sp != s_len:
    pad = ((0, 0), (0, sp - s_len), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  n_entries = kblocks.shape[-1]
  lp = next_pow2(n_entries)
  if lp != n_entries:
    padw = [(0, 0)] * 3 + [(0, lp - n_entries)]
    kblocks = jnp.pad(kblocks, padw, constant_values=-1)
    kflags = jnp.pad(kflags, padw)
  kernel = functools.partial(
      _prefill_kernel, scale=float(scale), block_size=p, n_entries=lp, anchor=anchor,
      window=window, q_offset=s_len - t, num_keys=s_len, precision=dot_precision(q.dtype),
      skip=skip)
  in_specs = [
      pl.BlockSpec((None, None, None, lp), lambda b_, h, i: (b_, h, i, 0)),
      pl.BlockSpec((None, None, None, lp), lambda b_, h, i: (b_, h, i, 0)),
      pl.BlockSpec((None, p, None, d), lambda b_, h, i: (b_, i, h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda b_, h, i: (b_, 0, h // g, 0)),
      pl.BlockSpec((None, sp, None, d), lambda b_, h, i: (b_, 0, h // g, 0)),
  ]
  out_specs = (pl.BlockSpec((None, p, None, d), lambda b_, h, i: (b_, i, h, 0)),
               pl.BlockSpec((None, None, p), lambda b_, h, i: (b_, h, i)))
  out_shape = (jax.ShapeDtypeStruct((b, tp, hq, d), q.dtype),
               jax.ShapeDtypeStruct((b, hq, tp), jnp.float32))
  o, lse = pl.pallas_call(
      kernel, grid=(b, hq, nq), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      name="condensate_block_prefill")(kblocks.astype(jnp.int32),
                                       kflags.astype(jnp.int32), q, k, v)
  return o[:, :t], lse[:, :, :t]

