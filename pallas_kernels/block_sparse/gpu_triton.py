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


def _attend(carry, q, k, v, ok, scale, precision):
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * scale
  return _step(carry, jnp.where(ok[None, :], s, NEG_INF), v, precision)


def _range_chunks(carry, q, k_ref, v_ref, lo, hi, n, chunk, num_keys, scale, precision):
  """Attends keys lo..hi (inclusive, at most n * chunk of them) in n static chunks."""
  for c in range(n):
    pos = lo + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    ok = (pos <= hi) & (pos < num_keys)
    safe = jnp.clip(pos, 0, num_keys - 1)
    carry = _attend(carry, q, k_ref[safe, :], v_ref[safe, :], ok, scale, precision)
  return carry


def _block_read(carry, q, k_ref, v_ref, blk, m_lo, m_hi, block_size, num_keys, scale,
                precision):
  """Attends the middle keys of key block blk (one contiguous [P, D] tile)."""
  start = pl.multiple_of(blk * block_size, block_size)
  pos = start + jnp.arange(block_size, dtype=jnp.int32)
  ok = (pos >= m_lo) & (pos <= m_hi) & (pos < num_keys)
  return _attend(carry, q, k_ref[pl.ds(start, block_size), :],
                 v_ref[pl.ds(start, block_size), :], ok, scale, precision)


def _init(gp, d):
  return (jnp.full((gp,), NEG_INF, jnp.float32), jnp.zeros((gp,), jnp.float32),
          jnp.zeros((gp, d), jnp.float32))


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
  carry = _init(gp, d)
  chunks = functools.partial(_range_chunks, q=q, k_ref=k_ref, v_ref=v_ref, chunk=chunk,
                             num_keys=num_keys, scale=scale, precision=precision)

  if with_static:
    def static_part(carry):
      carry = chunks(carry, lo=ranges_ref[0], hi=ranges_ref[1], n=n_anchor_chunks)
      return chunks(carry, lo=ranges_ref[2], hi=ranges_ref[3], n=n_window_chunks)
    carry = jax.lax.cond(pl.program_id(3) == 0, static_part, lambda c: c, carry)

  m_lo, m_hi = ranges_ref[4], ranges_ref[5]

  def block_step(j, carry):
    blk = blocks_ref[j]
    read = lambda c: _block_read(c, q, k_ref, v_ref, blk, m_lo, m_hi, block_size,
                                 num_keys, scale, precision)
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


def _step_kernel(len_ref, ids_ref, q_ref, k_ref, v_ref, u_ref, o_ref, lse_ref, dl_ref, *,
                 scale, block_size, chunk, n_anchor_chunks, n_window_chunks, anchor,
                 window, num_keys, eps_chunk, n_prog, top, group, with_eps, precision):
  # One decode step of a (b, K/V head): program 0 attends the anchor and window (first:
  # it is the longest), program s in 1..top the block ids[s - 1]; the programs beyond top
  # (there are NP - 1 - top, NP a power of two) sum the certificate in shares (all
  # programs do where there are none).
  # Inputs
  # len_ref  []         int32 kv length of this batch row
  # ids_ref  [NP]       int32 selected block ids, -1 = none (NP = n_prog)
  # q_ref    [Hq, D]    the decode queries of the batch row (the group's rows gathered)
  # k_ref    [Sp, D], v_ref [Sp, D]
  # u_ref    [Gp, nb]   float32 block bounds, -inf: no middle key
  # Outputs
  # o_ref    [Gp, D]    float32 partial output of this program
  # lse_ref  [Gp]       float32 its lse
  # dl_ref   [Gp]       float32 log sum over this program's share of the unselected
  #                     blocks of n_b exp(U_b) (-inf: none)
  gp, d = o_ref.shape
  nb = u_ref.shape[1]
  s = pl.program_id(2)
  hi = len_ref[...] - 1
  m_lo, m_hi = anchor, jnp.minimum(hi - window, num_keys - 1)
  q = _group_rows(q_ref, group, gp)
  chunks = functools.partial(_range_chunks, q=q, k_ref=k_ref, v_ref=v_ref, chunk=chunk,
                             num_keys=num_keys, scale=scale, precision=precision)

  def static_part(carry):     # static_ranges with lo = 0
    carry = chunks(carry, lo=0, hi=jnp.minimum(anchor - 1, hi), n=n_anchor_chunks)
    return chunks(carry, lo=jnp.maximum(hi - window + 1, anchor), hi=hi, n=n_window_chunks)

  blk = ids_ref[jnp.maximum(s - 1, 0)]
  read = lambda c: _block_read(c, q, k_ref, v_ref, blk, m_lo, m_hi, block_size, num_keys,
                               scale, precision)
  carry = jax.lax.cond(s == 0, static_part,
                       lambda c: jax.lax.cond(blk >= 0, read, lambda c: c, c),
                       _init(gp, d))
  o, lse = _finish(*carry)
  o_ref[...] = o
  lse_ref[...] = lse

  # certificate share: chunks e, e + n_eps, ... of eps_chunk blocks, where e is this
  # program's place among the n_eps programs that sum it
  ids = ids_ref[...]
  first = top + 1 if n_prog > top + 1 else 0
  n_eps = n_prog - first
  e = s - first

  def eps_part(i, ml):
    m, l = ml
    c = e + i * n_eps
    j = c * eps_chunk + jnp.arange(eps_chunk, dtype=jnp.int32)
    chosen = jnp.max(((ids[None, :] == j[:, None]) & (ids[None, :] >= 0)).astype(
        jnp.int32), axis=1) > 0
    start = j * block_size
    n = jnp.minimum(m_hi, start + block_size - 1) - jnp.maximum(m_lo, start) + 1
    drop = chosen | (n <= 0) | (j >= nb) | (e < 0)
    uu = u_ref[:, pl.ds(pl.multiple_of(jnp.clip(c, 0, nb // eps_chunk - 1) * eps_chunk,
                                       eps_chunk), eps_chunk)]
    t = jnp.where(drop[None, :], NEG_INF,
                  uu + jnp.log(jnp.maximum(n, 1).astype(jnp.float32))[None, :])
    m_new = jnp.maximum(m, jnp.max(t, axis=1))
    m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
    l = l * jnp.exp(m - m_use) + jnp.sum(jnp.exp(t - m_use[:, None]), axis=1)
    return m_new, l

  n_chunks = nb // eps_chunk if with_eps else 0
  init = (jnp.full((gp,), NEG_INF, jnp.float32), jnp.zeros((gp,), jnp.float32))
  m, l = jax.lax.cond(
      e >= 0, lambda ml: jax.lax.fori_loop(0, -(-n_chunks // n_eps), eps_part, ml),
      lambda ml: ml, init) if n_chunks else init
  dl_ref[...] = jnp.where(l > 0, jnp.where(m == NEG_INF, 0.0, m) + jnp.log(
      jnp.where(l > 0, l, 1.0)), NEG_INF)


def _merge_row(o_parts, lse_p, dl_p):
  """One query head's merge of `_step_kernel`'s programs: o_parts [NP, D] (normalised
  partials), lse_p / dl_p [NP]. Returns (o [D], lse, eps) as `blocks_pallas` computes
  them (eps = delta / (Z + delta), blocks._log_delta_to_eps)."""
  def lse_of(x):
    m = jnp.max(x)
    m_use = jnp.where(m == NEG_INF, 0.0, m)
    w = jnp.where(x == NEG_INF, 0.0, jnp.exp(x - m_use))
    z = jnp.sum(w)
    return w, z, jnp.where(z > 0, m_use + jnp.log(jnp.where(z > 0, z, 1.0)), NEG_INF)

  w, z, lse = lse_of(lse_p)
  o = jnp.sum(w[:, None] * o_parts, axis=0) / jnp.where(z > 0, z, 1.0)
  log_delta = lse_of(dl_p)[2]
  eps = jnp.where(lse == NEG_INF, 1.0,
                  1.0 / (1.0 + jnp.exp(jnp.where(lse == NEG_INF, 0.0, lse) - log_delta)))
  return o, lse, jnp.where(log_delta == NEG_INF, 0.0, eps)


def _step_finish_kernel(o_ref, lse_ref, dl_ref, out_ref, lse_out_ref, eps_ref):
  # Merges the programs of `_step_kernel` for one query head (program (b, K/V head, g)):
  # o_ref [NP, Gp, D], lse_ref / dl_ref [NP, Gp] of the (b, K/V head);
  # out_ref [D] (the query's dtype), lse_out_ref / eps_ref [] (scalars)
  h = pl.program_id(2)
  o, lse, eps = _merge_row(o_ref[:, h, :], lse_ref[:, h], dl_ref[:, h])
  out_ref[...] = o.astype(out_ref.dtype)
  lse_out_ref[...] = lse
  eps_ref[...] = eps


def decode_step(q, k, v, ids, u, kv_lengths, *, block_size, scale, anchor, window,
                top=None, interpret=False, num_warps=4, num_stages=2, eps_chunk=128,
                finish="triton", with_eps=True):
  """One fused decode step over selected blocks: two kernels, no XLA in between.

  q [B, 1, Hq, D]; k, v [B, S, Hkv, D] (S = nb * P); ids [B, Hkv, W] int32 block ids
  (-1 = none): the first `top` slots (default W) are the selection; W == next_pow2(top
  + 1) with -1 beyond `top` (as `rank_select(width=...)` writes them) is used as is,
  other widths are padded; u [B, Hkv, Gp or G, nb] float32 bounds (-inf where a block
  holds no middle key; Gp rows as `block_bounds` returns them avoid a copy); kv_lengths
  [B]. The sets of `blocks_pallas.decode_attend` (causal decode: anchor 0..anchor-1,
  window the last `window` keys, middle keys of the ids' blocks); the certificate from
  the unselected blocks' bounds. finish="triton": the merge is a second kernel (one
  program per query head); "xla": plain jnp. with_eps=False skips the certificate
  (profiling: what eps costs; eps is then None). Returns out [B, 1, Hq, D] (q's dtype),
  lse [B, Hq] and eps [B, Hq]."""
  if finish not in ("triton", "xla"):
    raise ValueError(f"finish={finish!r}: expected 'triton' or 'xla'.")
  _check_supported(q, block_size, interpret)
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  gp = max(16, next_pow2(g))
  p = block_size
  nb = u.shape[-1]
  top = ids.shape[-1] if top is None else top
  if t != 1 or s_len != nb * p or nb % 16:
    raise NotImplementedError(f"T={t}, S={s_len}, nb={nb}: the fused decode step needs "
                              "one query, S = nb * P and nb divisible by 16.")
  if u.shape[2] != gp:
    u = jnp.pad(u, ((0, 0), (0, 0), (0, gp - u.shape[2]), (0, 0)), constant_values=NEG_INF)
  # programs: anchor + window, one per selected slot, then (up to a power of two) eps
  n_prog = next_pow2(top + 1)
  if ids.shape[-1] != n_prog:
    ids = jnp.pad(ids[..., :top].astype(jnp.int32), ((0, 0), (0, 0), (0, n_prog - top)),
                  constant_values=-1)
  chunk = max(16, min(64, next_pow2(max(anchor, window, 1))))
  kernel = functools.partial(
      _step_kernel, scale=float(scale), block_size=p, chunk=chunk,
      n_anchor_chunks=-(-anchor // chunk), n_window_chunks=-(-window // chunk),
      anchor=anchor, window=window, num_keys=s_len, group=g,
      eps_chunk=min(eps_chunk, nb & -nb), n_prog=n_prog, top=top, with_eps=with_eps,
      precision=_precision(q.dtype))
  part = lambda *shape: jax.ShapeDtypeStruct((b, hkv, n_prog) + shape, jnp.float32)
  o, lse, dl = pl.pallas_call(
      kernel, grid=(b, hkv, n_prog),
      in_specs=[pl.BlockSpec((None,), lambda b_, h, s: (b_,)),
                pl.BlockSpec((None, None, n_prog), lambda b_, h, s: (b_, h, 0)),
                pl.BlockSpec((None, hq, d), lambda b_, h, s: (b_, 0, 0)),
                pl.BlockSpec((None, s_len, None, d), lambda b_, h, s: (b_, 0, h, 0)),
                pl.BlockSpec((None, s_len, None, d), lambda b_, h, s: (b_, 0, h, 0)),
                pl.BlockSpec((None, None, gp, nb), lambda b_, h, s: (b_, h, 0, 0))],
      out_specs=(pl.BlockSpec((None, None, None, gp, d), lambda b_, h, s: (b_, h, s, 0, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda b_, h, s: (b_, h, s, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda b_, h, s: (b_, h, s, 0))),
      out_shape=(part(gp, d), part(gp), part(gp)), interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      name="condensate_decode_step")(jnp.asarray(kv_lengths, jnp.int32).reshape(b), ids,
                                     q.reshape(b, hq, d), k, v, u.astype(jnp.float32))
  if finish == "xla":
    o, lse, dl = (x[:, :, :, :g] for x in (o, lse, dl))
    out, lse_out, eps = jax.vmap(jax.vmap(jax.vmap(_merge_row, (1, 1, 1)), (0, 0, 0)),
                                 (0, 0, 0))(o, lse, dl)
    out = out.astype(q.dtype)
  else:
    row = lambda *blk: pl.BlockSpec((None, None) + blk,
                                    lambda b_, h, g_: (b_, h) + (0,) * len(blk))
    out, lse_out, eps = pl.pallas_call(
        _step_finish_kernel, grid=(b, hkv, g),
        in_specs=[row(n_prog, gp, d), row(n_prog, gp), row(n_prog, gp)],
        out_specs=(pl.BlockSpec((None, None, None, d), lambda b_, h, g_: (b_, h, g_, 0)),
                   pl.BlockSpec((None, None, None), lambda b_, h, g_: (b_, h, g_)),
                   pl.BlockSpec((None, None, None), lambda b_, h, g_: (b_, h, g_))),
        out_shape=(jax.ShapeDtypeStruct((b, hkv, g, d), q.dtype),
                   jax.ShapeDtypeStruct((b, hkv, g), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, g), jnp.float32)),
        interpret=interpret,
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="condensate_decode_finish")(o, lse, dl)
  eps = eps.reshape(b, hq) if with_eps else None
  return out.reshape(b, 1, hq, d), lse_out.reshape(b, hq), eps


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
  carry = _init(p, d)

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


def _group_rows(q_ref, g, gp):
  """The K/V head's G query rows of q_ref [Hq, D] as a [Gp, D] tile, zero rows beyond G
  (a gather: no padded copy of q in memory)."""
  row = jnp.arange(gp, dtype=jnp.int32)
  idx = jnp.where(row < g, pl.program_id(1) * g + row, 0)
  return jnp.where((row < g)[:, None], q_ref[idx, :], 0).astype(q_ref.dtype)


def _bounds_kernel(q_ref, kmin_ref, kmax_ref, *refs, scale, slack, precision, dtype,
                   group, block_size, anchor, window, num_keys, with_centre, masked,
                   superblock):
  # q_ref      [Hq, D]   the decode queries of batch row b, unscaled
  # kmin_ref   [C, D]    min / max summaries of C consecutive blocks of one K/V head
  # kmax_ref   [C, D]
  # len_ref    []        (masked only) int32 kv length of the row
  # Outputs
  # u_ref      [Gp, C]   float32 upper bounds on scale * q.k over each block
  #                      (masked: -inf where the block holds no middle key)
  # c_ref      [Gp, C]   (with_centre) float32 scale * q.(min + max) / 2, the centre score
  # sbmax_ref  [Gp, C/X] (superblock X) max of the ranking score (c or u) per X blocks
  len_ref = refs[0] if masked else None
  u_ref, *rest = refs[1:] if masked else refs
  c_ref = rest.pop(0) if with_centre else None
  sbmax_ref = rest.pop(0) if superblock else None
  gp, c = u_ref.shape
  q = _group_rows(q_ref, group, gp).astype(dtype)
  zero = jnp.zeros_like(q)
  qp, qn = jnp.maximum(q, zero), jnp.minimum(q, zero)        # exact in any dtype
  mn, mx = kmin_ref[...].astype(dtype), kmax_ref[...].astype(dtype)

  def dot(a, b):
    return jnp.dot(a, b.T, preferred_element_type=jnp.float32, precision=precision)

  # sum_d max(q_d mn_d, q_d mx_d) = q+ . mx + q- . mn (q_d >= 0 picks the max end)
  up, un = dot(qp, mx), dot(qn, mn)
  # rounding slack: relative to sum_d |q_d| |picked end| (a product of two values of
  # the summaries' dtype is exact in float32 for bf16/f16; only the accumulation rounds)
  a = dot(qp, jnp.abs(mx)) - dot(qn, jnp.abs(mn))
  u = scale * (up + un) + (slack * scale) * a
  if with_centre:
    # q.(mn + mx) / 2 from the same four products: q+.mx + q-.mn + q+.mn + q-.mx
    cen = (0.5 * scale) * (up + un + dot(qp, mn) + dot(qn, mx))
  if masked:   # middle keys of the decode query at len - 1: anchor .. len - 1 - window
    start = (pl.program_id(2) * c + jnp.arange(c, dtype=jnp.int32)) * block_size
    m_hi = jnp.minimum(len_ref[...] - 1 - window, num_keys - 1)
    # blocks.middle_counts > 0 (also right when no key is middle: m_hi < anchor)
    has = jnp.minimum(start + block_size - 1, m_hi) >= jnp.maximum(start, anchor)
    u = jnp.where(has[None, :], u, NEG_INF)
    if with_centre:
      cen = jnp.where(has[None, :], cen, NEG_INF)
  u_ref[...] = u
  if with_centre:
    c_ref[...] = cen
  if superblock:
    score = cen if with_centre else u
    sbmax_ref[...] = jnp.max(score.reshape(gp, c // superblock, superblock), axis=2)


def block_bounds(q, kmin, kmax, *, scale, slack, with_centre=False, kv_lengths=None,
                 block_size=None, anchor=0, window=0, superblock=None, chunk=128,
                 interpret=False, num_warps=4, num_stages=1):
  """U [B, K, Gp, nb] float32 for decode queries q [B, Hq, D] against min/max summaries
  [B, nb, K, D] (rows beyond G are padding): the box bound as tensor-core matmuls
  (q+ . max + q- . min) plus `slack` times sum_d |q_d| |picked end|, all times `scale`;
  with_centre also returns scale * q.(min + max) / 2 (a ranking score, not a bound).
  The summaries are read once, in their cache layout; q's rows are gathered in the
  kernel. nb must be divisible by 16 (`chunk` shrinks to fit).

  kv_lengths [B] (with the key block_size, anchor and window): blocks holding no middle
  key of the decode query at position kv_lengths - 1 (keys anchor .. len - 1 - window)
  get -inf, u and centre; without it empty blocks (min > max) give values that callers
  mask. superblock X (a power of two dividing nb): also returns the max of the ranking
  score (the centre with with_centre, else u) over each run of X blocks,
  [B, K, Gp, nb / X]. Returns u, or the tuple (u, [centre], [superblock max])."""
  _check_backend(interpret)
  b, hq, d = q.shape
  nb, hkv = kmin.shape[1], kmin.shape[2]
  g = hq // hkv
  gp = max(16, next_pow2(g))
  c = min(chunk, nb & -nb)          # largest power of two dividing nb, at most chunk
  if c < 16 or d < 16 or d & (d - 1):
    raise NotImplementedError(f"num_blocks={nb}, head dim {d}: the bounds kernel needs "
                              "num_blocks divisible by 16 and a power-of-two head dim.")
  if superblock is not None:
    x = int(superblock)
    if x < 1 or x & (x - 1) or nb % x:
      raise NotImplementedError(f"superblock={superblock}: expected a power of two "
                                f"dividing num_blocks={nb}.")
    c = max(c, x)
  masked = kv_lengths is not None
  if masked and not block_size:
    raise ValueError("block_bounds: kv_lengths needs block_size (keys per block).")
  dt = jnp.promote_types(q.dtype, kmin.dtype)    # never round q or the summaries
  kernel = functools.partial(
      _bounds_kernel, scale=float(scale), slack=float(slack), precision=_precision(dt),
      dtype=dt, group=g, block_size=block_size, anchor=anchor, window=window,
      num_keys=nb * (block_size or 1), with_centre=with_centre, masked=masked,
      superblock=superblock)
  in_specs = [pl.BlockSpec((None, hq, d), lambda b_, h, i: (b_, 0, 0)),
              pl.BlockSpec((None, c, None, d), lambda b_, h, i: (b_, i, h, 0)),
              pl.BlockSpec((None, c, None, d), lambda b_, h, i: (b_, i, h, 0))]
  args = [q, kmin, kmax]
  if masked:
    in_specs.append(pl.BlockSpec((None,), lambda b_, h, i: (b_,)))
    args.append(jnp.asarray(kv_lengths, jnp.int32).reshape(b))
  out = pl.BlockSpec((None, None, gp, c), lambda b_, h, i: (b_, h, 0, i))
  shape = jax.ShapeDtypeStruct((b, hkv, gp, nb), jnp.float32)
  out_specs, out_shape = [out], [shape]
  if with_centre:
    out_specs.append(out)
    out_shape.append(shape)
  if superblock:
    out_specs.append(pl.BlockSpec((None, None, gp, c // superblock),
                                  lambda b_, h, i: (b_, h, 0, i)))
    out_shape.append(jax.ShapeDtypeStruct((b, hkv, gp, nb // superblock), jnp.float32))
  return pl.pallas_call(
      kernel, grid=(b, hkv, nb // c), in_specs=in_specs,
      out_specs=tuple(out_specs) if len(out_specs) > 1 else out,
      out_shape=tuple(out_shape) if len(out_shape) > 1 else shape,
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps,
                                                  num_stages=num_stages),
      name="condensate_block_bounds")(*args)


# --------------------------------------------------------------------------- select


def _ranks(r_own, i_own, r_all, i_all, ok_all):
  """Rank of each own entry among all entries in lax.top_k's order (value descending,
  ties to the lower index): the count of valid entries before it. Distinct ranks."""
  before = ok_all[None, :] & ((r_all[None, :] > r_own[:, None]) | (
      (r_all[None, :] == r_own[:, None]) & (i_all[None, :] < i_own[:, None])))
  return jnp.sum(before.astype(jnp.int32), axis=1)


def _fill_tail(ref, top):
  """Program 0 writes -1 to slots top .. of a 1-D int32 output ref."""
  w = ref.shape[0]
  if w > top:
    slot = jnp.arange(w, dtype=jnp.int32)
    plgpu_triton.store(ref.at[slot], jnp.full((w,), -1, jnp.int32),
                       mask=(slot >= top) & (pl.program_id(2) == 0))


def _superblock_kernel(sbmax_ref, sbids_ref, best_ref, *, per_program, top, heads):
  # Inputs
  # sbmax_ref [Gp, nsb]  float32 per-head max ranking score of each superblock
  # Outputs
  # sbids_ref [Mp]       int32 slot r <- the superblock of rank r (r < top), then -1
  # best_ref  [Gp]       float32 each head's best score, 0 where it has none (every
  #                      program writes the same values)
  gp, nsb = sbmax_ref.shape
  row = jnp.arange(gp, dtype=jnp.int32)
  x = sbmax_ref[...]
  best = jnp.max(x, axis=1)
  best = jnp.where(best == NEG_INF, 0.0, best)
  # blocks.group_score of a superblock max: max over heads of (max - best)
  r_all = jnp.max(jnp.where((row < heads)[:, None], x - best[:, None], NEG_INF), axis=0)
  i_all = jnp.arange(nsb, dtype=jnp.int32)
  own = pl.program_id(2) * per_program + jnp.arange(per_program, dtype=jnp.int32)
  x_own = sbmax_ref[:, pl.ds(pl.multiple_of(pl.program_id(2) * per_program, per_program),
                             per_program)]
  r_own = jnp.max(jnp.where((row < heads)[:, None], x_own - best[:, None], NEG_INF), axis=0)
  rank = _ranks(r_own, own, r_all, i_all, i_all >= 0)
  plgpu_triton.store(sbids_ref.at[rank], own, mask=rank < top)
  _fill_tail(sbids_ref, top)
  best_ref[...] = best


def superblock_select(sbmax, *, top, heads, per_program=64, interpret=False, num_warps=4):
  """The `top` superblocks per (batch, K/V head) by group score (max over the first
  `heads` rows of sbmax - each head's best), as `lax.top_k` would pick them, without a
  sort: each program ranks `per_program` superblocks against all of them.
  sbmax [B, K, Gp, nsb] float32 (nsb a power of two). Returns (sbids [B, K, Mp]: the top
  superblocks in rank order, then -1 up to Mp = next_pow2(top) (`rank_select` takes it
  as is); best [B, K, Gp]: each head's max over all superblocks, 0 where -inf)."""
  _check_backend(interpret)
  b, hkv, gp, nsb = sbmax.shape
  if nsb & (nsb - 1) or nsb < top:
    raise NotImplementedError(f"{nsb} superblocks, top={top}: expected a power of two "
                              "and at least `top`.")
  per = min(per_program, nsb)
  mp = next_pow2(top)
  kernel = functools.partial(_superblock_kernel, per_program=per, top=top, heads=heads)
  sbids, best = pl.pallas_call(
      kernel, grid=(b, hkv, nsb // per),
      in_specs=[pl.BlockSpec((None, None, gp, nsb), lambda b_, h, j: (b_, h, 0, 0))],
      out_specs=(pl.BlockSpec((None, None, mp), lambda b_, h, j: (b_, h, 0)),
                 pl.BlockSpec((None, None, gp), lambda b_, h, j: (b_, h, 0))),
      out_shape=(jax.ShapeDtypeStruct((b, hkv, mp), jnp.int32),
                 jax.ShapeDtypeStruct((b, hkv, gp), jnp.float32)),
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      name="condensate_superblock_select")(sbmax.astype(jnp.float32))
  return sbids, best


def _rank_kernel(sbids_ref, score_ref, best_ref, ids_ref, *, superblock, top, heads):
  # Inputs
  # sbids_ref [Cp]      int32 candidate superblocks of this (b, K/V head), -1 = padding
  # score_ref [Gp, nb]  float32 ranking scores (-inf: no middle key)
  # best_ref  [Gp]      float32 each head's best score (0 where it has none)
  # Outputs
  # ids_ref   [W]       int32 slot r <- the block of rank r (r < top); -1: -inf score;
  #                     slots top .. W - 1: -1 (written by program 0)
  x = superblock
  n = sbids_ref.shape[0] * x
  i = jnp.arange(n, dtype=jnp.int32)
  c_sb = sbids_ref[i // x]                       # gather: candidate superblock per entry
  c_idx = jnp.maximum(c_sb, 0) * x + i % x
  own_sb = sbids_ref[pl.program_id(2)]
  own_idx = jnp.maximum(own_sb, 0) * x + jnp.arange(x, dtype=jnp.int32)

  def group_score(idx):   # blocks.group_score: max over heads of score - best
    r = score_ref[0, idx] - best_ref[0]
    for h in range(1, heads):
      r = jnp.maximum(r, score_ref[h, idx] - best_ref[h])
    return r

  r_o = group_score(own_idx)
  # candidate ranks are distinct, so slots 0..top-1 are written once each
  rank = _ranks(r_o, own_idx, group_score(c_idx), c_idx, c_sb >= 0)
  val = jnp.where(r_o == NEG_INF, -1, own_idx)
  plgpu_triton.store(ids_ref.at[rank], val, mask=(rank < top) & (own_sb >= 0))
  _fill_tail(ids_ref, top)


def rank_select(sbids, score, best, *, top, superblock, heads, width=None, interpret=False,
                num_warps=4):
  """Top-`top` blocks per (batch, K/V head) from candidate superblocks, as `lax.top_k`
  orders them (group score descending, ties to the lower block id), without a sort.

  sbids [B, K, C] int32: the candidate superblocks (each holding `superblock` consecutive
  blocks; must contain every block of the top `top`, e.g. the top superblocks by their
  max, see `blocks_pallas.top_m`); score [B, K, Gp, nb] float32 per-head ranking scores
  (-inf: no middle key); best [B, K, Gp]: each head's max score (0 where -inf); rows
  >= `heads` are ignored. The group score of a block is max_h (score - best) as in
  `blocks.group_score`. One program per candidate superblock ranks its blocks against
  every candidate (comparisons, no sort) and writes block ids to their rank's slot.
  Returns ids [B, K, width] int32 (width >= top, a power of two; default top): the top
  blocks in rank order (-1 where the score is -inf), then -1."""
  _check_backend(interpret)
  b, hkv, n_c = sbids.shape
  gp, nb = score.shape[2], score.shape[3]
  x = int(superblock)
  width = top if width is None else width
  if x < 1 or x & (x - 1) or nb % x or n_c * x < top or width < top:
    raise NotImplementedError(f"superblock={superblock}, {n_c} candidates, top={top}, "
                              f"width={width}: expected a power of two dividing "
                              "num_blocks, at least `top` candidate blocks, width >= top.")
  cp, wp = next_pow2(n_c), next_pow2(width)
  sbids = jnp.pad(sbids.astype(jnp.int32), ((0, 0), (0, 0), (0, cp - n_c)),
                  constant_values=-1)
  kernel = functools.partial(_rank_kernel, superblock=x, top=top, heads=heads)
  ids = pl.pallas_call(
      kernel, grid=(b, hkv, n_c),
      in_specs=[pl.BlockSpec((None, None, cp), lambda b_, h, j: (b_, h, 0)),
                pl.BlockSpec((None, None, gp, nb), lambda b_, h, j: (b_, h, 0, 0)),
                pl.BlockSpec((None, None, gp), lambda b_, h, j: (b_, h, 0))],
      out_specs=pl.BlockSpec((None, None, wp), lambda b_, h, j: (b_, h, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, wp), jnp.int32),
      interpret=interpret,
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      name="condensate_rank_select")(sbids, score.astype(jnp.float32),
                                     best.astype(jnp.float32))
  return ids[..., :width] if wp != width else ids
