"""Block orders (DESIGN.md §4): the order a GQA group expands blocks in, and exact top-M.

A GQA group's G query heads share blocks (a kernel reads each block once per group), so
the group ranks blocks by one score, `group_score`; `top_m` picks the M best by one of
several methods with identical results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condensate_jax.softmax import NEG_INF


def group_score(u, head_axis, block_axis):
  """The score a GQA group ranks blocks by: max over its heads of U_gb - max_b' U_gb'.

  Each head's bounds are taken relative to its own best block (softmax is shift
  invariant per head), so a head whose query has a small norm still gets its best blocks
  chosen; a plain max over heads lets the head with the largest |q| take every slot.
  Blocks with no middle key keep -inf.
  """
  best = jnp.max(u, axis=block_axis, keepdims=True)
  rel = u - jnp.where(jnp.isneginf(best), 0.0, best)
  return jnp.max(rel, axis=head_axis)


def group_order(u, n_mid, rank=None):
  """Block order shared by a GQA group (by the bounds u, or by `rank` if given).

  u [B, K, G, T, nb], n_mid [B, T, nb] -> (order [B, K, T, nb] int32 (block ids, best
  first, ties to the lower block), u_sorted [B, K, G, T, nb] (-inf: no middle key),
  n_sorted [B, K, T, nb], tail [B, K, G, T, nb + 1] = log sum_{i >= r} n e^{U} over the
  blocks after position r of the order (the certificate of taking the first r),
  has [B, K, T, nb + 1] bool: position r holds a block with middle keys).
  """
  u = jnp.where(n_mid[:, None, None] > 0, u, NEG_INF)
  rank = u if rank is None else jnp.where(n_mid[:, None, None] > 0, rank, NEG_INF)
  ug = group_score(rank, head_axis=2, block_axis=4)                # [B, K, T, nb]
  order = jnp.argsort(-ug, axis=-1, stable=True).astype(jnp.int32)
  u_sorted = jnp.take_along_axis(u, order[:, :, None], axis=-1)
  n_b = jnp.broadcast_to(n_mid[:, None], ug.shape)
  n_sorted = jnp.take_along_axis(n_b, order, axis=-1)
  terms = jnp.where(n_sorted[:, :, None] > 0,
                    jnp.log(jnp.maximum(n_sorted, 1).astype(jnp.float32))[:, :, None]
                    + u_sorted, NEG_INF)
  tail = jax.lax.cumlogsumexp(terms, axis=terms.ndim - 1, reverse=True)
  pad = [(0, 0)] * (terms.ndim - 1) + [(0, 1)]
  tail = jnp.pad(tail, pad, constant_values=NEG_INF)
  has = jnp.pad(n_sorted > 0, [(0, 0)] * 3 + [(0, 1)])
  return order, u_sorted, n_sorted, tail, has





TOP_M_METHODS = ("top_k", "chunked", "superblock")


def top_m(x, m, method="top_k", chunk=256):
  """Exact top-m along the last axis (values, indices; ties to the lower index), the same
  result as `lax.top_k` by every method:

  "top_k":      one lax.top_k over the row;
  "chunked":    lax.top_k inside chunks of `chunk` entries, then over the m * n_chunks
                candidates (each of the row's top m is among its chunk's top m;
                candidates are laid out chunk by chunk, so ties still go to the lower
                index);
  "superblock": the max of each superblock of `chunk` entries, the top m superblocks by
                it (put back in index order), then the top m of their m * chunk entries.
                Exact: each of the row's top m lies in a superblock whose max is at least
                the m-th value, and at most m superblocks have such a max (ties: the
                lowest-index ones, which hold the lowest-index tied entries).
  Falls back to "top_k" where the row is too short for the method to help.
  """
  if method not in TOP_M_METHODS:
    raise ValueError(f"method={method!r}: expected one of {list(TOP_M_METHODS)}.")
  n = x.shape[-1]
  lead = x.shape[:-1]
  pad = -n % chunk
  n_chunks = (n + pad) // chunk
  if method == "top_k" or n <= chunk or (method == "chunked" and m > chunk) or (
      method == "superblock" and n_chunks <= m):
    return jax.lax.top_k(x, m)
  xp = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)], constant_values=NEG_INF)
  xc = xp.reshape(lead + (n_chunks, chunk))
  if method == "chunked":
    v1, i1 = jax.lax.top_k(xc, m)                                        # [..., C, m]
    i1 = i1 + (jnp.arange(n_chunks) * chunk)[:, None]
    v2, i2 = jax.lax.top_k(v1.reshape(lead + (-1,)), m)
    return v2, jnp.take_along_axis(i1.reshape(lead + (-1,)), i2, axis=-1)
  _, sb = jax.lax.top_k(jnp.max(xc, axis=-1), m)                         # [..., m]
  sb = jnp.sort(sb, axis=-1)                                             # index order
  cand = jnp.take_along_axis(xc, sb[..., None], axis=-2)                 # [..., m, chunk]
  v2, i2 = jax.lax.top_k(cand.reshape(lead + (-1,)), m)
  return v2, jnp.take_along_axis(sb, i2 // chunk, axis=-1) * chunk + i2 % chunk


def superblock_size(n, m):
  """Superblock size for `top_m(..., "superblock")` over n entries, top m: about 16 m
  superblocks (two small sorts of ~16 m entries each), a power of two >= 8."""
  return max(8, 1 << max(0, (n // (16 * max(m, 1))).bit_length() - 1))

