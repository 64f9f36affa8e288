"""Block-sparse attention, TPU backend: Mosaic `pallas_call` with scalar-prefetched block ids.

Both ops walk a list of key blocks on the innermost grid axis ("arbitrary"). The block
ids are scalar-prefetched into SMEM (`pltpu.PrefetchScalarGridSpec`, flattened to 1-D);
the K/V BlockSpecs are [P, D] tiles whose index_map reads the id, so the Mosaic pipeline
DMAs (and double-buffers) exactly the listed blocks. An entry with id -1 maps to the
block of the most recent valid entry in grid order (a second, forward-filled id table),
so the pipeline sees an unchanged block index and issues no DMA; the body skips it with
`pl.when`. Online softmax in float32 VMEM scratch (m and l lane-replicated [R, 128], as
jax's TPU flash attention keeps them; acc [R, D]); the last entry writes the outputs.

block_decode: grid (B, Hkv, T, NS, E). The G query heads of a K/V group (zero-padded to
  Gp, a multiple of 8) share every K/V block: scores are one [Gp, D] x [D, P] matmul.
  The E entries of split s: split 0 (with_static) first lists the blocks covering the
  anchor range, then those covering the window range (ranges are not block aligned:
  position masks keep a_lo..a_hi, w_lo..w_hi), then split s's BPS listed blocks masked
  to m_lo..m_hi. Keys are counted once (a window entry drops anchor keys, a middle entry
  of split 0 drops static keys), and the wrapper drops repeated / out-of-range ids, so
  each split's set is exactly the reference's. E = n_a + n_w + BPS with
  n_x = ceil((x + P - 1) / P) blocks for a range of x keys at any alignment; splits > 0
  carry the n_a + n_w static slots as -1 entries (a grid step each, no DMA).
block_prefill: grid (B, Hq, T/P, L): one [P, D] query block of one head against its L
  listed key blocks (lists are per query head, so heads do not share reads here).

Precision: float32 inputs use Precision.HIGHEST; bf16 inputs bf16 matmuls with float32
accumulation (p cast to v's dtype for the second matmul, as flash attention does).

Limits: every id of the call sits in SMEM at once (decode: 2 * B*Hkv*T*NS*E + 8 * B*T
int32, prefill: 3 * B*Hq*ceil(T/P)*L int32); SMEM is small (per core, far below VMEM;
the size depends on the TPU generation), so this suits decode and modest prefill; long
prefill would need the lists streamed per query block (not done).
Shapes a TPU tiles: head dim D a multiple of 128, block size P a multiple of 8 (float32)
or 16 (bfloat16); other dtypes are refused (NotImplementedError, so api.py falls back).
P below 128 leaves lanes of the [R, P] score tile idle; P = 128 suits the MXU best.
anchor / window bound the anchor / window range lengths: longer ranges are cut to their
first anchor / window keys (callers' ranges never are longer).
Verification: TPU interpret mode on CPU (`interpret=pltpu.InterpretParams()`) against
reference.py, and the Pallas -> Mosaic lowering for platform "tpu" via jax.export. The
Mosaic compiler (libtpu) never ran: not compiled or timed on a real TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = float("-inf")
LANES = 128
# CompilerParams is the name in the jax versions this repo runs (0.10, 0.11); older ones
# called it TPUCompilerParams.
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu,
                                                                     "TPUCompilerParams")
_SUBLANES = {"float32": 8, "bfloat16": 16}


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _interpret_params(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  if interpret is False or interpret is None:
    if jax.default_backend() != "tpu":
      raise NotImplementedError("the Mosaic backend needs a TPU (or interpret=True).")
    return False
  return interpret   # a pltpu.InterpretParams


def _check_supported(q, k, v, block_size):
  """ValueError for malformed arguments, NotImplementedError for shapes Mosaic can't tile."""
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, T, Hq, D] and "
                     "k, v [B, S, Hkv, D] of the same shape.")
  b, _, hq, d = q.shape
  if k.shape[0] != b or k.shape[3] != d or hq % k.shape[2]:
    raise ValueError(f"q {q.shape}, k {k.shape}: expected the same B and D and Hq a "
                     "multiple of Hkv.")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size={block_size!r}: expected an int >= 1.")
  name = jnp.dtype(q.dtype).name
  if name not in _SUBLANES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise NotImplementedError(f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: the Mosaic "
                              "kernel takes float32 or bfloat16, the same for q, k, v.")
  if d % LANES:
    raise NotImplementedError(f"head dim D={d}: the Mosaic kernel needs a multiple of "
                              f"{LANES} (K/V blocks are [P, D] tiles of [B, S, Hkv*D]).")
  if block_size % _SUBLANES[name]:
    raise NotImplementedError(f"block_size={block_size}: the Mosaic kernel needs a "
                              f"multiple of {_SUBLANES[name]} for {name}.")


def _fetch_ids(ids):
  """Forward fill of the flat id table in grid order: -1 entries take the last valid id
  (0 before the first), so the pipeline keeps the block it already holds."""
  flat = ids.reshape(-1)
  at = jnp.where(flat >= 0, jnp.arange(flat.size, dtype=jnp.int32), -1)
  last = jax.lax.cummax(at, axis=0)
  return jnp.where(last >= 0, flat[jnp.maximum(last, 0)], 0)


def _first_valid(ids, num_blocks, flags=None):
  """Drops (-> -1) ids outside 0..num_blocks-1 and repeats within the last axis (the first
  occurrence stays; with flags it takes the OR of the repeats' flags)."""
  ids = jnp.where((ids >= 0) & (ids < num_blocks), ids, -1)
  n = ids.shape[-1]
  same = (ids[..., :, None] == ids[..., None, :]) & (ids[..., :, None] >= 0)
  earlier = jnp.tril(jnp.ones((n, n), bool), -1)
  ids = jnp.where(jnp.any(same & earlier, -1), -1, ids)
  if flags is None:
    return ids
  return ids, jnp.any(same & (flags[..., None, :] > 0), -1).astype(jnp.int32)


def _online_step(m_sc, l_sc, acc_sc, s, v, precision):
  """One [R, C] tile of scores s (float32, -inf = masked) against v [C, D]."""
  m_prev = m_sc[...]                                           # [R, 128]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_use = jnp.where(m_next == NEG_INF, 0.0, m_next)
  alpha = jnp.exp(m_prev - m_use)                              # 0 where m_prev = -inf
  p = jnp.exp(s - m_use[:, :1])
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
  m_sc[...] = m_next
  pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
  acc_sc[...] = alpha[:, :1] * acc_sc[...] + pv


def _init(m_sc, l_sc, acc_sc):
  m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
  l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
  acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def _finish(m_sc, l_sc, acc_sc, o_ref, lse_ref):
  """o = acc / l (0 for an empty set), lse = m + log l (-inf for an empty set); a NaN
  l stays NaN."""
  m, l = m_sc[...], l_sc[...]
  ok = l != 0
  l_safe = jnp.where(ok, l, 1.0)
  o_ref[...] = jnp.where(ok[:, :1], acc_sc[...] / l_safe[:, :1], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, jnp.where(m == NEG_INF, 0.0, m) + jnp.log(l_safe), NEG_INF)


def _scores(q, k, scale, precision):
  """q [R, D] x k [C, D] -> [R, C] float32 (one MXU matmul, k transposed in the dot)."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32)
  return s * scale


def _inside(pos, lo, hi):
  return (pos >= lo) & (pos <= hi)


# --------------------------------------------------------------------------- decode


def _decode_kernel(ids_ref, fetch_ref, ranges_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                   m_sc, l_sc, acc_sc, *, scale, block_size, num_keys, num_kv_heads,
                   num_queries, num_splits, n_anchor, n_static, with_static, precision):
  # Scalar prefetch (SMEM)
  # ids_ref    [B*Hkv*T*NS*E]  block id of each entry, -1 = none
  # fetch_ref  [B*Hkv*T*NS*E]  block the pipeline holds at each entry (only index_maps)
  # ranges_ref [B*T*8]         a_lo, a_hi, w_lo, w_hi, m_lo, m_hi (inclusive, clipped)
  # Inputs
  # q_ref      [Gp, D]         the group's queries (zero rows beyond G)
  # k_ref      [P, D]          key block fetch_ref[entry] of this K/V head
  # v_ref      [P, D]
  # Outputs
  # o_ref      [Gp, D]         float32 partial output of this split
  # lse_ref    [Gp, 128]       float32, lane-replicated
  # Scratch
  # m_sc, l_sc [Gp, 128]       running max / sum, lane-replicated
  # acc_sc     [Gp, D]         running weighted sum of v
  b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  split, e = pl.program_id(3), pl.program_id(4)
  n_entries = pl.num_programs(4)

  flat = (((b * num_kv_heads + h) * num_queries + t) * num_splits + split) * n_entries + e
  blk = ids_ref[flat]

  def keys_ok():
    r = (b * num_queries + t) * 8
    a_lo, a_hi = ranges_ref[r], ranges_ref[r + 1]
    w_lo, w_hi = ranges_ref[r + 2], ranges_ref[r + 3]
    m_lo, m_hi = ranges_ref[r + 4], ranges_ref[r + 5]
    is_anchor = e < n_anchor
    is_window = (e >= n_anchor) & (e < n_static)
    # the entry's key range, and up to two ranges it must not count again
    lo = jnp.where(is_anchor, a_lo, jnp.where(is_window, w_lo, m_lo))
    hi = jnp.where(is_anchor, a_hi, jnp.where(is_window, w_hi, m_hi))
    drop_static = (split == 0) & (e >= n_static) if with_static else False
    x1_lo = jnp.where(is_window | drop_static, a_lo, 0)
    x1_hi = jnp.where(is_window | drop_static, a_hi, -1)
    x2_lo = jnp.where(drop_static, w_lo, 0)
    x2_hi = jnp.where(drop_static, w_hi, -1)
    pos = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    return (_inside(pos, lo, hi) & ~_inside(pos, x1_lo, x1_hi)
            & ~_inside(pos, x2_lo, x2_hi) & (pos < num_keys))

  _entry_step(e, n_entries, blk, keys_ok, q_ref, k_ref, v_ref, o_ref, lse_ref,
              (m_sc, l_sc, acc_sc), block_size=block_size, num_keys=num_keys,
              scale=scale, precision=precision)


def _entry_step(e, n_entries, blk, keys_ok, q_ref, k_ref, v_ref, o_ref, lse_ref, scratch,
                *, block_size, num_keys, scale, precision):
  """One grid step over list entry e of n_entries (both kernels): reset the scratch at
  the first entry; for a listed block (blk >= 0) one online-softmax step over the fetched
  [P, D] block with the keys keys_ok() admits ([1, P] or [R, P] bool); write o and lse
  at the last entry."""

  @pl.when(e == 0)
  def _():
    _init(*scratch)

  @pl.when(blk >= 0)
  def _():
    v = v_ref[...]
    if num_keys % block_size:   # rows past S of the last block are not data
      row = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
      v = jnp.where(row < num_keys, v, jnp.zeros_like(v))
    scores = _scores(q_ref[...], k_ref[...], scale, precision)
    _online_step(*scratch, jnp.where(keys_ok(), scores, NEG_INF), v, precision)

  @pl.when(e == n_entries - 1)
  def _():
    _finish(*scratch, o_ref, lse_ref)


def _range_blocks(lo, hi, n, block_size):
  """[..., n] ids of the blocks covering lo..hi (-1 past hi or for an empty range)."""
  first = lo // block_size
  ids = first[..., None] + jnp.arange(n, dtype=jnp.int32)
  ok = (hi >= lo)[..., None] & (ids <= (hi // block_size)[..., None])
  return jnp.where(ok, ids, -1)


def _n_range_blocks(length, block_size, num_blocks):
  """Blocks a range of at most `length` keys can touch at any alignment."""
  return 0 if length <= 0 else min((length + 2 * block_size - 2) // block_size, num_blocks)


def block_decode(q, k, v, blocks, ranges, *, block_size, scale, anchor, window,
                 with_static=True, interpret=False):
  """Mosaic TPU block decode; semantics of reference.block_decode.

  anchor, window: static upper bounds on the anchor / window range lengths.
  interpret: False (compile for TPU), True (TPU interpret mode with default
  `pltpu.InterpretParams()`, CPU) or a `pltpu.InterpretParams`.
  Returns o_parts [B, T, Hq, NS, D] float32, lse_parts [B, Hq, T, NS] float32.
  """
  _check_supported(q, k, v, block_size)
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  if blocks.ndim != 5 or blocks.shape[:3] != (b, hkv, t):
    raise ValueError(f"blocks {blocks.shape}: expected [B, Hkv, T, NS, BPS] = "
                     f"[{b}, {hkv}, {t}, NS, BPS].")
  if ranges.shape not in ((b, t, 6), (b, t, 8)):
    raise ValueError(f"ranges {ranges.shape}: expected [B, T, 6 or 8] = [{b}, {t}, 6].")
  for name, val in (("anchor", anchor), ("window", window)):
    if isinstance(val, bool) or not isinstance(val, int) or val < 0:
      raise ValueError(f"{name}={val!r}: expected an int >= 0.")
  interpret = _interpret_params(interpret)
  p = block_size
  g = hq // hkv
  gp = -(-g // 8) * 8
  ns = blocks.shape[3]
  nb = -(-s_len // p)
  if ns == 0 or t == 0:   # nothing to compute (an empty grid would write nothing)
    return (jnp.zeros((b, t, hq, ns, d), jnp.float32),
            jnp.zeros((b, hq, t, ns), jnp.float32))

  # Ranges clipped to the keys (and to the anchor / window bounds), then entry ids.
  r = ranges.astype(jnp.int32)
  last = s_len - 1
  a_lo = jnp.maximum(r[..., 0], 0)
  a_hi = jnp.minimum(jnp.minimum(r[..., 1], a_lo + anchor - 1), last)
  w_lo = jnp.maximum(r[..., 2], 0)
  w_hi = jnp.minimum(jnp.minimum(r[..., 3], w_lo + window - 1), last)
  m_lo, m_hi = jnp.maximum(r[..., 4], 0), jnp.minimum(r[..., 5], last)
  zero = jnp.zeros_like(a_lo)
  flat_ranges = jnp.stack([a_lo, a_hi, w_lo, w_hi, m_lo, m_hi, zero, zero], -1).reshape(-1)
  n_anchor = _n_range_blocks(anchor, p, nb) if with_static else 0
  n_window = _n_range_blocks(window, p, nb) if with_static else 0
  ids = _first_valid(blocks.astype(jnp.int32), nb)                    # [B, Hkv, T, NS, BPS]
  if n_anchor + n_window:
    static = jnp.concatenate([_range_blocks(a_lo, a_hi, n_anchor, p),
                              _range_blocks(w_lo, w_hi, n_window, p)], -1)   # [B, T, n]
    static = jnp.broadcast_to(static[:, None, :, None], (b, hkv, t, ns, static.shape[-1]))
    static = jnp.where((jnp.arange(ns) == 0)[:, None], static, -1)
    ids = jnp.concatenate([static, ids], -1)
  if ids.shape[-1] == 0:   # one skipped entry, so every split still writes o = 0, -inf
    ids = jnp.full(ids.shape[:-1] + (1,), -1, jnp.int32)
  n_entries = ids.shape[-1]
  ids = ids.reshape(-1)
  fetch = _fetch_ids(ids)

  qg = q.reshape(b, t, hkv, g, d)
  if gp != g:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
  kf, vf = k.reshape(b, s_len, hkv * d), v.reshape(b, s_len, hkv * d)   # free reshapes

  def kv_map(b_, h, t_, s, e, ids_ref, fetch_ref, ranges_ref):
    del ids_ref, ranges_ref
    return b_, fetch_ref[(((b_ * hkv + h) * t + t_) * ns + s) * n_entries + e], h

  kernel = functools.partial(
      _decode_kernel, scale=float(scale), block_size=p, num_keys=s_len, num_kv_heads=hkv,
      num_queries=t, num_splits=ns, n_anchor=n_anchor, n_static=n_anchor + n_window,
      with_static=with_static, precision=_precision(q.dtype))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, hkv, t, ns, n_entries),
      in_specs=[pl.BlockSpec((None, None, None, gp, d),
                             lambda b_, h, t_, *_: (b_, t_, h, 0, 0)),
                pl.BlockSpec((None, p, d), kv_map),
                pl.BlockSpec((None, p, d), kv_map)],
      out_specs=(pl.BlockSpec((None, None, None, None, gp, d),
                              lambda b_, h, t_, s, *_: (b_, t_, h, s, 0, 0)),
                 pl.BlockSpec((None, None, None, None, gp, LANES),
                              lambda b_, h, t_, s, *_: (b_, h, t_, s, 0, 0))),
      scratch_shapes=[pltpu.VMEM((gp, LANES), jnp.float32),
                      pltpu.VMEM((gp, LANES), jnp.float32),
                      pltpu.VMEM((gp, d), jnp.float32)])
  o, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct((b, t, hkv, ns, gp, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, t, ns, gp, LANES), jnp.float32)),
      interpret=interpret,
      compiler_params=_CompilerParams(dimension_semantics=(
          "parallel", "parallel", "parallel", "parallel", "arbitrary")),
      name="condensate_block_decode_tpu")(ids, fetch, flat_ranges, qg, kf, vf)
  o = o[:, :, :, :, :g].transpose(0, 1, 2, 4, 3, 5).reshape(b, t, hq, ns, d)
  lse = lse[..., :g, 0].transpose(0, 1, 4, 2, 3).reshape(b, hq, t, ns)
  return o, lse


# -------------------------------------------------------------------------- prefill


def _prefill_kernel(ids_ref, flags_ref, fetch_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                    m_sc, l_sc, acc_sc, *, scale, block_size, num_heads, num_qblocks,
                    anchor, window, q_offset, num_keys, precision):
  # Scalar prefetch (SMEM)
  # ids_ref   [B*Hq*NQ*L]  key block id of each entry, -1 = none
  # flags_ref [B*Hq*NQ*L]  1 = the block's middle keys are attended
  # fetch_ref [B*Hq*NQ*L]  block the pipeline holds at each entry (only index_maps)
  # Inputs
  # q_ref     [P, D]       query block I of one head
  # k_ref     [P, D]       key block fetch_ref[entry] of the head's K/V group
  # v_ref     [P, D]
  # Outputs
  # o_ref     [P, D]       q.dtype
  # lse_ref   [P, 128]     float32, lane-replicated
  # Scratch
  # m_sc, l_sc [P, 128];  acc_sc [P, D]
  b, h, i, e = (pl.program_id(a) for a in range(4))
  n_entries = pl.num_programs(3)

  flat = ((b * num_heads + h) * num_qblocks + i) * n_entries + e
  blk = ids_ref[flat]

  def keys_ok():
    qpos = (q_offset + i * block_size
            + jax.lax.broadcasted_iota(jnp.int32, (block_size, 1), 0))
    kpos = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    static = (kpos < anchor) | (kpos > qpos - window)
    middle = (kpos >= anchor) & (kpos <= qpos - window) & (flags_ref[flat] > 0)
    return (kpos <= qpos) & (kpos < num_keys) & (static | middle)

  _entry_step(e, n_entries, blk, keys_ok, q_ref, k_ref, v_ref, o_ref, lse_ref,
              (m_sc, l_sc, acc_sc), block_size=block_size, num_keys=num_keys,
              scale=scale, precision=precision)


def block_prefill(q, k, v, kblocks, kflags, *, block_size, anchor, window, scale,
                  interpret=False):
  """Mosaic TPU block-sparse causal prefill; semantics of reference.block_prefill.

  kblocks, kflags [B, Hq (or 1), ceil(T / P), L] int32. Returns o [B, T, Hq, D] (q.dtype),
  lse [B, Hq, T] float32.
  """
  _check_supported(q, k, v, block_size)
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  p = block_size
  g = hq // hkv
  nq = -(-t // p)
  nb = -(-s_len // p)
  if t > s_len:
    raise ValueError(f"q has T={t} queries but k only S={s_len} keys: expected T <= S.")
  if (kblocks.ndim != 4 or kblocks.shape != kflags.shape or kblocks.shape[0] != b
      or kblocks.shape[1] not in (1, hq) or kblocks.shape[2] != nq):
    raise ValueError(f"kblocks {kblocks.shape}, kflags {kflags.shape}: expected equal "
                     f"shapes [B, Hq or 1, ceil(T/P), L] = [{b}, {hq}, {nq}, L].")
  for name, val in (("anchor", anchor), ("window", window)):
    if isinstance(val, bool) or not isinstance(val, int):
      raise ValueError(f"{name}={val!r}: expected an int.")
  interpret = _interpret_params(interpret)
  if t == 0:
    return jnp.zeros(q.shape, q.dtype), jnp.zeros((b, hq, 0), jnp.float32)
  if kblocks.shape[-1] == 0:   # one skipped entry, so every query block is written
    kblocks = kflags = jnp.full(kblocks.shape[:-1] + (1,), -1, jnp.int32)
  n_entries = kblocks.shape[-1]
  shape = (b, hq, nq, n_entries)
  ids, flags = _first_valid(jnp.broadcast_to(kblocks.astype(jnp.int32), shape), nb,
                            jnp.broadcast_to(kflags.astype(jnp.int32), shape))
  ids, flags = ids.reshape(-1), flags.reshape(-1)
  fetch = _fetch_ids(ids)
  tp = nq * p
  if tp != t:   # whole query blocks; rows past T are dropped below
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  qf = q.reshape(b, tp, hq * d)
  kf, vf = k.reshape(b, s_len, hkv * d), v.reshape(b, s_len, hkv * d)

  def kv_map(b_, h, i, e, ids_ref, flags_ref, fetch_ref):
    del ids_ref, flags_ref
    # lax.div (truncating, h >= 0): jnp's floor division lowers through sign(), which
    # Mosaic only lowers when it can query the TPU generation
    return b_, fetch_ref[((b_ * hq + h) * nq + i) * n_entries + e], jax.lax.div(h, g)

  kernel = functools.partial(
      _prefill_kernel, scale=float(scale), block_size=p, num_heads=hq, num_qblocks=nq,
      anchor=anchor, window=window, q_offset=s_len - t, num_keys=s_len,
      precision=_precision(q.dtype))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, hq, nq, n_entries),
      in_specs=[pl.BlockSpec((None, p, d), lambda b_, h, i, *_: (b_, i, h)),
                pl.BlockSpec((None, p, d), kv_map),
                pl.BlockSpec((None, p, d), kv_map)],
      out_specs=(pl.BlockSpec((None, p, d), lambda b_, h, i, *_: (b_, i, h)),
                 pl.BlockSpec((None, None, p, LANES), lambda b_, h, i, *_: (b_, h, i, 0))),
      scratch_shapes=[pltpu.VMEM((p, LANES), jnp.float32),
                      pltpu.VMEM((p, LANES), jnp.float32),
                      pltpu.VMEM((p, d), jnp.float32)])
  o, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct((b, tp, hq * d), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tp, LANES), jnp.float32)),
      interpret=interpret,
      compiler_params=_CompilerParams(dimension_semantics=(
          "parallel", "parallel", "parallel", "arbitrary")),
      name="condensate_block_prefill_tpu")(ids, flags, fetch, qf, kf, vf)
  return o.reshape(b, tp, hq, d)[:, :t], lse[:, :, :t, 0]
