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
Precision.HIGHEST (IEEE float32, no TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

NEG_INF = float("-inf")


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _step(carry, s, v, precision):
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


def _finish(m, l, acc):
  ok = l > 0
  l_safe = jnp.where(ok, l, 1.0)
  o = jnp.where(ok[:, None], acc / l_safe[:, None], 0.0)
  lse = jnp.where(ok, jnp.where(m == NEG_INF, 0.0, m) + jnp.log(l_safe), NEG_INF)
  return o, lse


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
  carry = (jnp.full((gp,), NEG_INF, jnp.float32), jnp.zeros((gp,), jnp.float32),
           jnp.zeros((gp, d), jnp.float32))

  def attend(carry, k, v, ok):
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * scale
    return _step(carry, jnp.where(ok[None, :], s, NEG_INF), v, precision)

  def range_chunks(carry, lo, hi, n):
    for c in range(n):   # static, small
      pos = lo + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
      ok = (pos <= hi) & (pos < num_keys)
      safe = jnp.clip(pos, 0, num_keys - 1)
      carry = attend(carry, k_ref[safe, :], v_ref[safe, :], ok)
    return carry

  if with_static:
    def static_part(carry):
      carry = range_chunks(carry, ranges_ref[0], ranges_ref[1], n_anchor_chunks)
      return range_chunks(carry, ranges_ref[2], ranges_ref[3], n_window_chunks)
    carry = jax.lax.cond(pl.program_id(3) == 0, static_part, lambda c: c, carry)

  m_lo, m_hi = ranges_ref[4], ranges_ref[5]

  def block_step(j, carry):
    blk = blocks_ref[j]

    def read(carry):
      start = pl.multiple_of(blk * block_size, block_size)
      pos = start + jnp.arange(block_size, dtype=jnp.int32)
      ok = (pos >= m_lo) & (pos <= m_hi) & (pos < num_keys)
      return attend(carry, k_ref[pl.ds(start, block_size), :],
                    v_ref[pl.ds(start, block_size), :], ok)
    return jax.lax.cond(blk >= 0, read, lambda c: c, carry)

  carry = jax.lax.fori_loop(0, blocks_per_split, block_step, carry)
  o, lse = _finish(*carry)
  o_ref[...] = o
  lse_ref[...] = lse


def _check_backend(interpret):
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError("the Triton backend needs a GPU (or interpret=True).")


def _check_supported(q, block_size, interpret):
  """NotImplementedError (api.py then falls back) where these Triton kernels can't run."""
  _check_backend(interpret)
  d, p = q.shape[-1], block_size
  if p < 16 or p & (p - 1) or d & (d - 1) or d < 16:
    raise NotImplementedError(f"block_size={p}, head dim {d}: the Triton kernel needs "
                              "powers of two >= 16.")


def block_decode(q, k, v, blocks, ranges, *, block_size, scale, anchor, window,
                 with_static=True, interpret=False, num_warps=4, num_stages=2):
  """Triton block decode; semantics of reference.block_decode.

  anchor, window: static upper bounds on the anchor / window range lengths (chunk counts).
  Returns o_parts [B, T, Hq, NS, D] float32, lse_parts [B, Hq, T, NS] float32.
  """
  _check_supported(q, block_size, interpret)
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
      precision=_precision(q.dtype))
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
  carry = (jnp.full((p,), NEG_INF, jnp.float32), jnp.zeros((p,), jnp.float32),
           jnp.zeros((p, d), jnp.float32))

  def read(carry, blk, flag):
    start = pl.multiple_of(jnp.maximum(blk, 0) * block_size, block_size)
    kpos = start + jnp.arange(block_size, dtype=jnp.int32)
    i, j = qpos[:, None], kpos[None, :]
    static = (j < anchor) | (j > i - window)
    middle = (j >= anchor) & (j <= i - window) & (flag > 0)
    ok = (j <= i) & (j < num_keys) & (static | middle) & (blk >= 0)
    s = jnp.dot(q, k_ref[pl.ds(start, block_size), :].T,
                preferred_element_type=jnp.float32, precision=precision) * scale
    return _step(carry, jnp.where(ok, s, NEG_INF), v_ref[pl.ds(start, block_size), :],
                 precision)

  def entry(e, carry):
    blk, flag = kblocks_ref[e], kflags_ref[e]
    if skip == "cond":    # an empty entry (-1) costs no memory traffic
      return jax.lax.cond(blk >= 0, lambda c: read(c, blk, flag), lambda c: c, carry)
    return read(carry, blk, flag)   # "mask": block 0 read and masked; loads pipeline

  carry = jax.lax.fori_loop(0, n_entries, entry, carry)
  o, lse = _finish(*carry)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def block_prefill(q, k, v, kblocks, kflags, *, block_size, anchor, window, scale,
                  interpret=False, num_warps=4, num_stages=2, skip="cond"):
  """Triton block-sparse causal prefill; semantics of reference.block_prefill.

  skip: "cond" skips empty list entries (-1) behind a branch (no traffic, but the loop's
  loads cannot be software-pipelined); "mask" reads block 0 for them and masks it."""
  if skip not in ("cond", "mask"):
    raise ValueError(f"skip={skip!r}: expected 'cond' or 'mask'.")
  _check_supported(q, block_size, interpret)
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
      window=window, q_offset=s_len - t, num_keys=s_len, precision=_precision(q.dtype),
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


# --------------------------------------------------------------------------- bounds


def _bounds_kernel(q_ref, kmin_ref, kmax_ref, u_ref, *c_ref, scale, slack, precision):
  # q_ref    [Gp, D]   the group's decode queries (zero rows beyond G), unscaled
  # kmin_ref [C, D]    min / max summaries of C consecutive blocks of one K/V head
  # kmax_ref [C, D]
  # u_ref    [Gp, C]   float32 upper bounds on scale * q.k over each block
  # c_ref    [Gp, C]   (optional) float32 scale * q.(min + max) / 2, the centre score
  q = q_ref[...]
  zero = jnp.zeros_like(q)
  qp, qn = jnp.maximum(q, zero), jnp.minimum(q, zero)        # exact in any dtype
  mn, mx = kmin_ref[...], kmax_ref[...]

  def dot(a, b):
    return jnp.dot(a, b.T, preferred_element_type=jnp.float32, precision=precision)

  # sum_d max(q_d mn_d, q_d mx_d) = q+ . mx + q- . mn (q_d >= 0 picks the max end)
  up, un = dot(qp, mx), dot(qn, mn)
  # rounding slack: relative to sum_d |q_d| |picked end| (a product of two values of
  # the summaries' dtype is exact in float32 for bf16/f16; only the accumulation rounds)
  a = dot(qp, jnp.abs(mx)) - dot(qn, jnp.abs(mn))
  u_ref[...] = scale * (up + un) + (slack * scale) * a
  if c_ref:
    # q.(mn + mx) / 2 from the same four products: q+.mx + q-.mn + q+.mn + q-.mx
    c_ref[0][...] = (0.5 * scale) * (up + un + dot(qp, mn) + dot(qn, mx))


def block_bounds(q, kmin, kmax, *, scale, slack, with_centre=False, chunk=128,
                 interpret=False, num_warps=4, num_stages=1):
  """U [B, K, Gp, nb] float32 for decode queries q [B, Hq, D] against min/max summaries
  [B, nb, K, D] (rows beyond G are padding): the box bound as tensor-core matmuls
  (q+ . max + q- . min) plus `slack` times sum_d |q_d| |picked end|, all times `scale`;
  with_centre also returns scale * q.(min + max) / 2 (a ranking score, not a bound).
  Empty blocks (min > max) give values that callers mask. The summaries are read once,
  in their cache layout. nb must be divisible by 16 (`chunk` shrinks to fit)."""
  _check_backend(interpret)
  b, hq, d = q.shape
  nb, hkv = kmin.shape[1], kmin.shape[2]
  g = hq // hkv
  gp = max(16, next_pow2(g))
  c = min(chunk, nb & -nb)          # largest power of two dividing nb, at most chunk
  if c < 16 or d < 16 or d & (d - 1):
    raise NotImplementedError(f"num_blocks={nb}, head dim {d}: the bounds kernel needs "
                              "num_blocks divisible by 16 and a power-of-two head dim.")
  dt = jnp.promote_types(q.dtype, kmin.dtype)    # never round q or the summaries
  qg = q.reshape(b, hkv, g, d).astype(dt)
  if gp != g:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  kernel = functools.partial(_bounds_kernel, scale=float(scale), slack=float(slack),
                             precision=_precision(dt))
  out = pl.BlockSpec((None, None, gp, c), lambda b_, h, i: (b_, h, 0, i))
  shape = jax.ShapeDtypeStruct((b, hkv, gp, nb), jnp.float32)
  res = pl.pallas_call(
      kernel, grid=(b, hkv, nb // c),
      in_specs=[pl.BlockSpec((None, None, gp, d), lambda b_, h, i: (b_, h, 0, 0)),
                pl.BlockSpec((None, c, None, d), lambda b_, h, i: (b_, i, h, 0)),
                pl.BlockSpec((None, c, None, d), lambda b_, h, i: (b_, i, h, 0))],
      out_specs=(out, out) if with_centre else out,
      out_shape=(shape, shape) if with_centre else shape,
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      name="condensate_block_bounds")(qg, kmin.astype(dt), kmax.astype(dt))
  return res
