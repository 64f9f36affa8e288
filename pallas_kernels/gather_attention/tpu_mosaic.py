"""Gather attention, TPU backend: Mosaic `pallas_call` with scalar prefetch.

The index lists are scalar-prefetched into SMEM (flattened to 1-D); K and V stay in HBM
(`memory_space=pl.ANY`). One grid step per (batch b, K/V head h, query t) handles the G
query heads of the group; per chunk of C list entries it issues one row DMA per entry,
K/V row `[b, idx, h, :]` -> VMEM scratch, driven by the prefetched index, then waits for
them and runs one online-softmax step:
  shared list (anchor ∪ window): rows [C, D] DMA'd once per group, scores for all G heads
    by one MXU matmul [G, D] x [D, C] (float32, Precision.HIGHEST);
  per-head lists (top-k): rows [G, C, D], scores by elementwise product + lane reduction.
Invalid slots (-1) fetch row 0 and are masked to -inf.

Limits: every index of the call sits in SMEM at once (B*Hkv*T*(G*Nh + Ns) int32), so on a
real TPU this suits decode and modest prefill; long prefill needs the lists streamed per
query block (not done). Tested only in TPU interpret mode on CPU
(`interpret=pltpu.InterpretParams()`); never compiled for a real TPU here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gather_attention import layout
from pallas_kernels.gather_attention.reference import check_args

_HIGHEST = jax.lax.Precision.HIGHEST


def _kernel(sidx_ref, hidx_ref, q_ref, k_hbm, v_hbm, *rest, scale, chunk, n_head_chunks,
            n_shared_chunks, num_kv_heads, num_queries, g, nh, ns):
  # Scalar prefetch (SMEM)
  # sidx_ref [B*Hkv*T*Ns]      shared positions, -1 = unused
  # hidx_ref [B*Hkv*G*T*Nh]    per-head positions, -1 = unused
  # Inputs
  # q_ref    [G, D]            VMEM block: the group's queries at one position
  # k_hbm    [B, S, Hkv, D]    HBM (pl.ANY), read by row DMAs
  # v_hbm    [B, S, Hkv, D]
  # (optional aliased output buffers, never read)
  # Outputs
  # o_ref    [G, D]
  # lse_ref  [1, G]
  # Scratch
  # ks, vs   [C, D]            shared rows
  # kh, vh   [G, C, D]         per-head rows
  # sem      DMA semaphores [2]
  o_ref, lse_ref, ks, vs, kh, vh, sem = rest[-7:]
  b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  d = q_ref.shape[-1]
  q = q_ref[...].astype(jnp.float32)
  carry = (jnp.full((g,), -jnp.inf, jnp.float32), jnp.zeros((g,), jnp.float32),
           jnp.zeros((g, d), jnp.float32))
  s_base = ((b * num_kv_heads + h) * num_queries + t) * ns

  def row_copies(pos, k_dst, v_dst):
    return (pltpu.make_async_copy(k_hbm.at[b, pl.ds(pos, 1), h], k_dst, sem.at[0]),
            pltpu.make_async_copy(v_hbm.at[b, pl.ds(pos, 1), h], v_dst, sem.at[1]))

  def fetch(read_pos, dst_k, dst_v, n):
    """Starts n row DMAs (row i -> dst_*(i)), then waits for all of them."""
    def start(i, _):
      for cp in row_copies(jnp.maximum(read_pos(i), 0), dst_k(i), dst_v(i)):
        cp.start()
      return 0

    def wait(i, _):
      for cp in row_copies(0, dst_k(i), dst_v(i)):
        cp.wait()
      return 0

    jax.lax.fori_loop(0, n, start, 0)
    jax.lax.fori_loop(0, n, wait, 0)

  def shared_step(c, carry):
    fetch(lambda i: sidx_ref[s_base + c * chunk + i],
          lambda i: ks.at[pl.ds(i, 1)], lambda i: vs.at[pl.ds(i, 1)], chunk)
    pos = jnp.stack([sidx_ref[s_base + c * chunk + i] for i in range(chunk)])
    s = jax.lax.dot_general(q, ks[...].astype(jnp.float32), (((1,), (1,)), ((), ())),
                            precision=_HIGHEST, preferred_element_type=jnp.float32)
    s = jnp.where((pos >= 0)[None, :], s * scale, -jnp.inf)              # [G, C]
    v_rows = vs[...].astype(jnp.float32)
    return layout.online_softmax_step(
        carry, s, lambda p: jax.lax.dot_general(
            p, v_rows, (((1,), (0,)), ((), ())), precision=_HIGHEST,
            preferred_element_type=jnp.float32))

  def head_pos(c, gi, i):
    return hidx_ref[(((b * num_kv_heads + h) * g + gi) * num_queries + t) * nh
                    + c * chunk + i]

  def head_step(c, carry):
    fetch(lambda j: head_pos(c, j // chunk, j % chunk),
          lambda j: kh.at[j // chunk, pl.ds(j % chunk, 1)],
          lambda j: vh.at[j // chunk, pl.ds(j % chunk, 1)], g * chunk)
    pos = jnp.stack([jnp.stack([head_pos(c, gi, i) for i in range(chunk)])
                     for gi in range(g)])                                 # [G, C]
    s = jnp.sum(q[:, None, :] * kh[...].astype(jnp.float32), axis=2) * scale
    s = jnp.where(pos >= 0, s, -jnp.inf)
    v_rows = vh[...].astype(jnp.float32)
    return layout.online_softmax_step(
        carry, s, lambda p: jnp.sum(p[:, :, None] * v_rows, axis=1))

  if n_shared_chunks:
    carry = jax.lax.fori_loop(0, n_shared_chunks, shared_step, carry)
  if n_head_chunks:
    carry = jax.lax.fori_loop(0, n_head_chunks, head_step, carry)
  o, lse = layout.finish(*carry)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[None, :]


def gather_attention(q, k, v, indices, valid, *, scale=None, shared_indices=None,
                     shared_valid=None, interpret=False, chunk=8, out_init=None):
  """Mosaic TPU gather attention; same semantics as reference.gather_attention.

  interpret: False (compile for TPU), True (TPU interpret mode with default
  `pltpu.InterpretParams()`, CPU) or a `pltpu.InterpretParams`.
  out_init: optional (o [B,T,Hkv,G,D], lse [B,Hkv,T,1,G]) buffers aliased to the outputs.
  """
  scale = check_args(q, k, v, indices, valid, shared_indices, shared_valid, scale)
  if interpret is True:
    interpret = pltpu.InterpretParams()
  if not interpret and jax.default_backend() != "tpu":
    raise NotImplementedError("the Mosaic backend needs a TPU (or interpret=True).")
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk={chunk!r}: expected an int >= 1.")
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  gq = layout.group(q, k, v, indices, valid, shared_indices, shared_valid,
                    head_chunk=chunk, shared_chunk=chunk)
  nh, ns = gq.hidx.shape[-1], gq.sidx.shape[-1]
  kernel = functools.partial(
      _kernel, scale=scale, chunk=chunk,
      n_head_chunks=nh // chunk if gq.n_head else 0,
      n_shared_chunks=ns // chunk if gq.n_shared else 0,
      num_kv_heads=hkv, num_queries=t, g=g, nh=nh, ns=ns)
  q_spec = pl.BlockSpec((None, None, None, g, d), lambda b_, h, t_, *_: (b_, t_, h, 0, 0))
  lse_spec = pl.BlockSpec((None, None, None, 1, g), lambda b_, h, t_, *_: (b_, h, t_, 0, 0))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  in_specs = [q_spec, hbm, hbm]
  args = [gq.sidx.reshape(-1), gq.hidx.reshape(-1), gq.q, gq.k, gq.v]
  aliases = {}
  if out_init is not None:
    in_specs += [q_spec, lse_spec]
    args += list(out_init)
    aliases = {5: 0, 6: 1}
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, hkv, t), in_specs=in_specs,
      out_specs=(q_spec, lse_spec),
      scratch_shapes=[pltpu.VMEM((chunk, d), k.dtype), pltpu.VMEM((chunk, d), k.dtype),
                      pltpu.VMEM((g, chunk, d), k.dtype), pltpu.VMEM((g, chunk, d), k.dtype),
                      pltpu.SemaphoreType.DMA((2,))])
  o, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct((b, t, hkv, g, d), q.dtype),
                 jax.ShapeDtypeStruct((b, hkv, t, 1, g), jnp.float32)),
      input_output_aliases=aliases, interpret=interpret,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      name="condensate_gather_attention_tpu")(*args)
  return layout.ungroup(o, lse[:, :, :, 0, :], q.shape)


def out_layout(q_shape, num_kv_heads):
  b, t, hq, d = q_shape
  g = hq // num_kv_heads
  return (b, t, num_kv_heads, g, d), (b, num_kv_heads, t, 1, g)
