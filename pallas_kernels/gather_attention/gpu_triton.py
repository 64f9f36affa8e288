"""Gather attention, GPU backend: `pallas_call` lowered through Triton.

One program per (batch b, K/V head h, query t) handles the G query heads of the group:
  1. shared list (anchor ∪ window in condensate attention): each chunk of `shared_chunk`
     positions is gathered ONCE as [C, D] rows of K and V and scored against all G heads —
     a K/V row is read once per group, not once per head;
  2. per-head lists (the dynamic top-k): each chunk gathers [G, C, D] rows (each head its
     own positions; rows that coincide across heads are read per head, through L2).
Scores and the weighted sum are float32 elementwise products + reductions (exact IEEE
float32, no TF32); softmax is online over chunks (running max m, normaliser l, acc).
Invalid slots (-1) load row 0 and are masked to -inf. Block dims are powers of two: G and
D are zero-padded to powers of two, lists to chunk multiples.
Decode (few programs): `splits` programs per (b, h, t), each over every splits-th chunk of
both lists, their partial softmaxes merged by log-sum-exp afterwards (`merge_splits`), so
that a step's B * Hkv programs do not leave most of the GPU idle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.util import next_pow2
from pallas_kernels.gather_attention import layout
from pallas_kernels.gather_attention.reference import check_args


def _kernel(q_ref, k_ref, v_ref, hidx_ref, sidx_ref, *rest, scale, head_chunk,
            shared_chunk, n_head_chunks, n_shared_chunks, splits=1):
  # Inputs
  # q_ref    [Gp, D]   the group's queries at one position
  # k_ref    [S, D]    keys of this K/V head (gathered by row index)
  # v_ref    [S, D]
  # hidx_ref [Gp, Nh]  per-head positions, -1 = unused
  # sidx_ref [Ns]      positions shared by the group, -1 = unused
  # (optional aliased output buffers, never read)
  # Outputs
  # o_ref    [Gp, D]
  # lse_ref  [Gp]
  o_ref, lse_ref = rest[-2:]
  gp, d = q_ref.shape
  q = q_ref[...].astype(jnp.float32)
  carry = (jnp.full((gp,), -jnp.inf, jnp.float32), jnp.zeros((gp,), jnp.float32),
           jnp.zeros((gp, d), jnp.float32))

  def shared_step(c, carry):
    idx = sidx_ref[pl.ds(c * shared_chunk, shared_chunk)]              # [C]
    ok = idx >= 0
    safe = jnp.where(ok, idx, 0)
    k_rows = k_ref[safe, :].astype(jnp.float32)                        # [C, D]
    v_rows = v_ref[safe, :].astype(jnp.float32)
    s = jnp.sum(q[:, None, :] * k_rows[None, :, :], axis=2) * scale      # [Gp, C]
    s = jnp.where(ok[None, :], s, -jnp.inf)
    return layout.online_softmax_step(
        carry, s, lambda p: jnp.sum(p[:, :, None] * v_rows[None, :, :], axis=1))

  def head_step(c, carry):
    idx = hidx_ref[:, pl.ds(c * head_chunk, head_chunk)]               # [Gp, C]
    ok = idx >= 0
    safe = jnp.where(ok, idx, 0)
    k_rows = k_ref[safe, :].astype(jnp.float32)                        # [Gp, C, D]
    v_rows = v_ref[safe, :].astype(jnp.float32)
    s = jnp.sum(q[:, None, :] * k_rows, axis=2) * scale                 # [Gp, C]
    s = jnp.where(ok, s, -jnp.inf)
    return layout.online_softmax_step(
        carry, s, lambda p: jnp.sum(p[:, :, None] * v_rows, axis=1))

  if splits == 1:
    if n_shared_chunks:
      carry = jax.lax.fori_loop(0, n_shared_chunks, shared_step, carry)
    if n_head_chunks:
      carry = jax.lax.fori_loop(0, n_head_chunks, head_step, carry)
  else:
    # this program's part of the lists: chunks sp, sp + splits, sp + 2 splits, ...
    sp = pl.program_id(3)
    strided = lambda step: (lambda i, c: step(sp + i * splits, c))
    for n, step in ((n_shared_chunks, shared_step), (n_head_chunks, head_step)):
      if n:
        carry = jax.lax.fori_loop(0, (n - sp + splits - 1) // splits, strided(step), carry)
  o, lse = layout.finish(*carry)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _chunk(gp, d, budget=8192):
  """Largest power-of-two chunk C with Gp*C*D <= budget elements (>= 1, <= 64)."""
  c = 64
  while c > 1 and gp * c * d > budget:
    c //= 2
  return c


# programs the auto split aims for (a few per SM of a large GPU)
_TARGET_PROGRAMS = 256


def auto_splits(programs, n_chunks):
  """Splits of the lists over programs: a power of two with programs * splits near
  _TARGET_PROGRAMS, at most the number of chunks of the longer list (1: no split)."""
  want = max(1, -(-_TARGET_PROGRAMS // max(1, programs)))
  return max(1, min(next_pow2(want), 1 << (max(1, n_chunks).bit_length() - 1)))


def merge_splits(o, lse):
  """Partial results over disjoint parts of a set -> the set's: o [..., S, Gp, D] float32
  (normalised per part, 0 for an empty part), lse [..., S, Gp] (-inf: empty part) ->
  o [..., Gp, D], lse [..., Gp]. A NaN part makes both NaN; every part empty gives 0 and
  -inf (as `layout.finish`)."""
  m = jnp.max(lse, axis=-2)
  w = jnp.exp(lse - jnp.where(jnp.isneginf(m), 0.0, m)[..., None, :])   # 0: empty part
  return layout.finish(m, jnp.sum(w, axis=-2), jnp.sum(w[..., None] * o, axis=-3))


def gather_attention(q, k, v, indices, valid, *, scale=None, shared_indices=None,
                     shared_valid=None, interpret=False, num_warps=4, num_stages=2,
                     head_chunk=None, shared_chunk=None, out_init=None, splits=None):
  """Triton gather attention; same semantics as reference.gather_attention.

  splits: programs per (batch, K/V head, query), each over every splits-th chunk of both
  lists, merged by log-sum-exp (`merge_splits`; float rounding apart from one program);
  None: `auto_splits` (a decode step's few programs spread over the GPU), 1 when out_init
  is given. out_init: optional (o, lse) buffers in the kernel's output layout
  ([B,T,Hkv,Gp,Dp], [B,Hkv,T,Gp]) aliased to the outputs, e.g. NaN-filled to prove every
  element is written (tests; splits 1 only). `interpret=True` runs the kernel in Pallas
  interpret mode (CPU).
  """
  scale = check_args(q, k, v, indices, valid, shared_indices, shared_valid, scale)
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError("the Triton backend needs a GPU (or interpret=True).")
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  gp, dp = next_pow2(hq // hkv), next_pow2(d)
  head_chunk = head_chunk or _chunk(gp, dp)
  shared_chunk = shared_chunk or _chunk(gp, dp)
  for name, c in (("head_chunk", head_chunk), ("shared_chunk", shared_chunk)):
    if c < 1 or c & (c - 1):
      raise ValueError(f"{name}={c}: expected a power of two >= 1.")
  gq = layout.group(q, k, v, indices, valid, shared_indices, shared_valid,
                    pad_heads_to="pow2", pad_dim_to="pow2", head_chunk=head_chunk,
                    shared_chunk=shared_chunk)
  s_len = k.shape[1]
  nh, ns = gq.hidx.shape[-1], gq.sidx.shape[-1]
  n_head_chunks = nh // head_chunk if gq.n_head else 0
  n_shared_chunks = ns // shared_chunk if gq.n_shared else 0
  if splits is None:
    splits = 1 if out_init is not None else auto_splits(
        b * hkv * t, max(n_head_chunks, n_shared_chunks))
  if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
    raise ValueError(f"splits={splits!r}: expected an int >= 1.")
  if out_init is not None and splits != 1:
    raise ValueError(f"out_init with splits={splits}: out_init is the unsplit layout "
                     "(splits=1).")
  kernel = functools.partial(
      _kernel, scale=scale, head_chunk=head_chunk, shared_chunk=shared_chunk,
      n_head_chunks=n_head_chunks, n_shared_chunks=n_shared_chunks, splits=splits)
  split = splits > 1
  ix = (lambda f: (lambda b_, h, t_, s_: f(b_, h, t_))) if split else (lambda f: f)
  q_spec = pl.BlockSpec((None, None, None, gp, dp), ix(lambda b_, h, t_: (b_, t_, h, 0, 0)))
  kv_spec = pl.BlockSpec((None, s_len, None, dp), ix(lambda b_, h, t_: (b_, 0, h, 0)))
  in_specs = [q_spec, kv_spec, kv_spec,
              pl.BlockSpec((None, None, gp, None, nh),
                           ix(lambda b_, h, t_: (b_, h, 0, t_, 0))),
              pl.BlockSpec((None, None, None, ns), ix(lambda b_, h, t_: (b_, h, t_, 0)))]
  args = [gq.q, gq.k, gq.v, gq.hidx, gq.sidx]
  params = plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if split:
    o, lse = pl.pallas_call(
        kernel, grid=(b, hkv, t, splits), in_specs=in_specs,
        out_shape=(jax.ShapeDtypeStruct((b, t, hkv, splits, gp, dp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, t, splits, gp), jnp.float32)),
        out_specs=(pl.BlockSpec((None, None, None, None, gp, dp),
                                lambda b_, h, t_, s_: (b_, t_, h, s_, 0, 0)),
                   pl.BlockSpec((None, None, None, None, gp),
                                lambda b_, h, t_, s_: (b_, h, t_, s_, 0))),
        interpret=interpret, compiler_params=params,
        name="condensate_gather_attention_split")(*args)
    o, lse = merge_splits(o, lse.transpose(0, 2, 1, 3, 4))   # lse as o: [B, T, Hkv, S, Gp]
    return layout.ungroup(o.astype(q.dtype), lse.transpose(0, 2, 1, 3), q.shape)
  lse_spec = pl.BlockSpec((None, None, None, gp), lambda b_, h, t_: (b_, h, t_, 0))
  out_shape = (jax.ShapeDtypeStruct((b, t, hkv, gp, dp), q.dtype),
               jax.ShapeDtypeStruct((b, hkv, t, gp), jnp.float32))
  aliases = {}
  if out_init is not None:
    in_specs += [q_spec, lse_spec]
    args += list(out_init)
    aliases = {5: 0, 6: 1}
  o, lse = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b, hkv, t), in_specs=in_specs,
      out_specs=(q_spec, lse_spec), input_output_aliases=aliases, interpret=interpret,
      compiler_params=params, name="condensate_gather_attention")(*args)
  return layout.ungroup(o, lse, q.shape)


def out_layout(q_shape, num_kv_heads):
  """Shapes of the kernel's raw outputs, for building `out_init` buffers."""
  b, t, hq, d = q_shape
  gp, dp = next_pow2(hq // num_kv_heads), next_pow2(d)
  return (b, t, num_kv_heads, gp, dp), (b, num_kv_heads, t, gp)
