"""Fused decode step, GPU backend: two `pallas_call`s lowered through Triton, no XLA
between them.

Step kernel: one program per (batch b, K/V head h, s < NP = next_pow2(top + 1)). The G
query rows of the group are gathered in the kernel into a [Gp, D] tile (Gp = max(16,
next_pow2(G))); program 0 attends the anchor and window ranges in chunks, program s in
1..top the middle keys of block ids[s - 1] (one contiguous [P, D] tile; -1 skipped by a
`lax.cond`), each writing its normalised partial output and lse; the programs beyond top
(all programs where there are none) also sum shares of the certificate's delta over the
unselected blocks. Finish kernel (one program per query head; or plain jnp with
finish="xla"): merges the partials and turns delta into eps. The semantics are those of
reference.py; the tile helpers are block_sparse/triton_common.py's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.util import next_pow2
from pallas_kernels.block_sparse.triton_common import (
    NEG_INF, block_read, check_supported, dot_precision, group_rows, range_chunks,
    softmax_finish, softmax_init)


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
  q = group_rows(q_ref, group, gp)
  chunks = functools.partial(range_chunks, q=q, k_ref=k_ref, v_ref=v_ref, chunk=chunk,
                             num_keys=num_keys, scale=scale, precision=precision)

  def static_part(carry):     # anchor 0 .. anchor - 1, window hi - window + 1 .. hi
    carry = chunks(carry, lo=0, hi=jnp.minimum(anchor - 1, hi), n=n_anchor_chunks)
    return chunks(carry, lo=jnp.maximum(hi - window + 1, anchor), hi=hi, n=n_window_chunks)

  blk = ids_ref[jnp.maximum(s - 1, 0)]
  read = lambda c: block_read(c, q, k_ref, v_ref, blk, m_lo, m_hi, block_size, num_keys,
                              scale, precision)
  carry = jax.lax.cond(s == 0, static_part,
                       lambda c: jax.lax.cond(blk >= 0, read, lambda c: c, c),
                       softmax_init(gp, d))
  o, lse = softmax_finish(*carry)
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
  # != 0, not > 0, here and in the merge: a NaN bound keeps eps NaN, never 0
  dl_ref[...] = jnp.where(l != 0, jnp.where(m == NEG_INF, 0.0, m) + jnp.log(
      jnp.where(l != 0, l, 1.0)), NEG_INF)


def _merge_row(o_parts, lse_p, dl_p):
  """One query head's merge of `_step_kernel`'s programs: o_parts [NP, D] (normalised
  partials), lse_p / dl_p [NP]. Returns (o [D], lse, eps) with eps = delta / (Z + delta)
  (1 where Z = 0, 0 where delta = 0), as reference.decode_step states it."""
  def lse_of(x):
    m = jnp.max(x)
    m_use = jnp.where(m == NEG_INF, 0.0, m)
    w = jnp.where(x == NEG_INF, 0.0, jnp.exp(x - m_use))
    z = jnp.sum(w)
    return w, z, jnp.where(z != 0, m_use + jnp.log(jnp.where(z != 0, z, 1.0)), NEG_INF)

  w, z, lse = lse_of(lse_p)
  o = jnp.sum(w[:, None] * o_parts, axis=0) / jnp.where(z != 0, z, 1.0)
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
  """Triton fused decode step; semantics of reference.decode_step.

  q [B, 1, Hq, D]; k, v [B, S, Hkv, D] (S = nb * P, nb divisible by 16); ids [B, Hkv, W]
  int32 block ids (-1 = none): the first `top` slots (default W) are the selection; W ==
  next_pow2(top + 1) with -1 beyond `top` (the wide output of block_rank's rank_select)
  is used as is, other widths are padded; u [B, Hkv, Gp or G, nb] float32 bounds (Gp
  rows, as block_bounds returns them, avoid a copy); kv_lengths [B]. finish="triton":
  the merge is a second kernel (one program per query head); "xla": plain jnp.
  with_eps=False skips the certificate (profiling: what eps costs; eps is then None).
  Returns out [B, 1, Hq, D] (q's dtype), lse [B, Hq] and eps [B, Hq] float32.
  """
  if finish not in ("triton", "xla"):
    raise ValueError(f"finish={finish!r}: expected 'triton' or 'xla'.")
  check_supported(q, block_size, interpret)
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
      precision=dot_precision(q.dtype))
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

