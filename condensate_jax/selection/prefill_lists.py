"""Key-block lists of the block-sparse causal prefill (DESIGN.md §4): for each block of
query rows, the anchor blocks, the window band and its top-M key blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from condensate_jax.selection import summaries as summaries_lib
from condensate_jax.selection.order import top_m
from condensate_jax.softmax import NEG_INF

# Query blocks ranked per pass of `prefill_lists`: the [Hq, chunk, nk] ranking matrix of a
# pass holds at most this many float32 entries (1M keys: passes of 256 query blocks).
PREFILL_RANK_ENTRIES = 1 << 27


def query_block_centres(q, num_kv_heads: int, p: int):
  """[B, nq, K, G, 2D] float32: per block of p query rows, its centre query
  c = (min + max) / 2 over the rows and |c| (the ranking side of `prefill_lists`)."""
  b, t, hq, d = q.shape
  nq = -(-t // p)
  qq = jnp.pad(q, ((0, 0), (0, nq * p - t), (0, 0), (0, 0))).reshape(b, nq, p, hq, d)
  q_ok = (jnp.arange(nq * p) < t).reshape(1, nq, p, 1, 1)
  qmin = jnp.min(jnp.where(q_ok, qq, jnp.inf), axis=2).astype(jnp.float32)
  qmax = jnp.max(jnp.where(q_ok, qq, -jnp.inf), axis=2).astype(jnp.float32)
  cq = 0.5 * (qmin + qmax)   # [B, nq, Hq, D]; the box over the block's queries is loose
  return jnp.concatenate([cq, jnp.abs(cq)], -1).reshape(b, nq, num_kv_heads,
                                                        hq // num_kv_heads, 2 * d)


def key_block_features(kmin, kmax, dtype):
  """[B, nk, K, 2D] in `dtype`: each key block's box centre and radius (empty boxes 0)."""
  kmn, kmx = kmin.astype(jnp.float32), kmax.astype(jnp.float32)
  empty = ~(kmn <= kmx)
  ck = jnp.where(empty, 0.0, 0.5 * (kmn + kmx))
  rk = jnp.where(empty, 0.0, 0.5 * (kmx - kmn))
  return jnp.concatenate([ck, rk], -1).astype(dtype)


def centre_ranking(qf, kf, dtype):
  """U_IJ = c_I . c_J + |c_I| . r_J [B, Hq, nq, nk] float32 (one matmul in `dtype`)."""
  b, nq, hkv, g, _ = qf.shape
  return jnp.einsum("bikgc,bjkc->bkgij", qf.astype(dtype), kf,
                    preferred_element_type=jnp.float32).reshape(b, hkv * g, nq, kf.shape[1])


def static_block_counts(spec, p: int):
  """(anchor blocks, window band blocks) listed for every query block of p rows."""
  n_anchor = -(-spec.anchor // p) if spec.anchor else 0
  n_band = (p + max(spec.window, 1) - 2) // p + 2 if spec.window else 0
  return n_anchor, n_band


def query_block_rows(off, i, p: int, t: int, n_keys, spec):
  """(band0, last) of query blocks i (off, n_keys [B, 1, 1]: the first query's position
  and the row's keys): the first block of the window band of each block's first row,
  and its last row's position (clipped to the row's last key)."""
  first = off + i * p
  last = jnp.minimum(off + jnp.minimum(i * p + p, t) - 1, n_keys - 1)
  return jnp.maximum(first - spec.window + 1, 0) // p, last


def holds_middle(j, last, p: int, spec):
  """Key blocks j holding a middle key of a query block whose last row sits at last."""
  return (j * p <= last - spec.window) & (j * p + p - 1 >= spec.anchor)


@functools.partial(jax.jit, static_argnames=("spec", "method", "chunk", "max_entries"))
def prefill_lists(q, k, spec, *, kmin=None, kmax=None, method="superblock", chunk=16,
                  max_entries=PREFILL_RANK_ENTRIES, q_offset=None, kv_lengths=None):
  """Key-block lists of the block-sparse prefill (causal, queries = the last T keys).

  Each query block is ranked against the key-block summaries by the bound of its centre
  query c = (min + max) / 2 over the block's queries: U_IJ = c.c_J + |c|.r_J (one
  matmul). This is a ranking heuristic, not a bound for every query of the block: the
  full box bound (adding r_q terms) overshoots by ~scale * sum_d r_qd |c_kd| and then
  ranks by key norm rather than alignment (measured: captured mass fell). Each query
  block takes its spec.top_blocks best blocks among those holding middle keys of its
  queries, plus the anchor blocks and the window band (`top_m` with `method` / `chunk`:
  the same lists by every method). Query blocks are ranked in passes of at most
  `max_entries` ranking entries (long prompts: the full matrix would not fit).
  q_offset [B] (default S - T): query row t sits at position q_offset + t; kv_lengths [B]
  (default S): keys at or beyond it are ignored (a cache with room to spare).
  Certificates come per query from the per-query bounds (see the benchmark's parity).
  Returns kblocks, kflags [B, Hq, nq, L] int32 (deduplicated; flag 1 = the block's middle
  keys are attended).
  """
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  p = spec.block_size
  nq, nk = -(-t // p), -(-s_len // p)
  off = jnp.broadcast_to(jnp.asarray(s_len - t if q_offset is None else q_offset,
                                     jnp.int32), (b,))[:, None, None]      # [B, 1, 1]
  n_keys = jnp.broadcast_to(jnp.asarray(s_len if kv_lengths is None else kv_lengths,
                                        jnp.int32), (b,))
  if kmin is None:
    summ = summaries_lib.build(k, n_keys, p)
    kmin, kmax = summ.kmin, summ.kmax
  n_keys = n_keys[:, None, None]
  qf = query_block_centres(q, hkv, p)                                  # [B,nq,K,G,2D]
  kf = key_block_features(kmin, kmax, q.dtype)                          # [B, nk, K, 2D]
  m = min(spec.top_blocks, nk)
  n_anchor, n_band = static_block_counts(spec, p)
  j = jnp.arange(nk)[None, :]

  def lists(qf_c, i0):
    """Lists of query blocks i0 .. i0 + nc - 1 (qf_c [B, nc, K, G, 2D])."""
    nc = qf_c.shape[1]
    u = centre_ranking(qf_c, kf, q.dtype)                                # [B,Hq,nc,nk]
    i = i0 + jnp.arange(nc)[:, None]                                      # [nc, 1]
    band0, last = query_block_rows(off, i, p, t, n_keys, spec)          # [B, nc, 1]
    has_mid = holds_middle(j, last, p, spec)
    top_u, top = top_m(jnp.where(has_mid[:, None], u, NEG_INF), m, method, chunk)
    top = jnp.where(jnp.isneginf(top_u), -1, top)
    anchor = jnp.broadcast_to(jnp.arange(n_anchor), (b, nc, n_anchor))
    band = band0 + jnp.arange(n_band)
    band = jnp.where(band <= last // p, band, -1)                         # [B, nc, nbd]
    static = jnp.concatenate([anchor, band], -1)
    static = jnp.broadcast_to(static[:, None], (b, hq) + static.shape[1:]).astype(jnp.int32)
    ids = jnp.concatenate([static, top.astype(jnp.int32)], -1)          # [B, H, nc, L]
    flags = jnp.concatenate([jnp.zeros_like(static), jnp.ones_like(top)], -1)
    same = (ids[..., :, None] == ids[..., None, :]) & (ids[..., :, None] >= 0)
    n_ent = ids.shape[-1]
    earlier = jnp.tril(jnp.ones((n_ent, n_ent), bool), -1)
    dup = jnp.any(same & earlier, -1)
    flag = jnp.any(same & (flags[..., None, :] > 0), -1)
    ids = jnp.where(dup, -1, ids)
    return ids, jnp.where(ids >= 0, flag, False).astype(jnp.int32)

  nc = max(1, min(nq, max_entries // max(1, hq * nk)))
  if nc >= nq:
    return lists(qf, 0)
  n_pass = -(-nq // nc)
  qf = jnp.pad(qf, ((0, 0), (0, n_pass * nc - nq), (0, 0), (0, 0), (0, 0)))
  qf = qf.reshape(b, n_pass, nc, hkv, hq // hkv, 2 * d).transpose(1, 0, 2, 3, 4, 5)
  ids, flags = jax.lax.map(lambda x: lists(x[0], x[1] * nc), (qf, jnp.arange(n_pass)))
  # [n_pass, B, H, nc, L] -> [B, H, nq, L]
  fix = lambda x: x.transpose(1, 2, 0, 3, 4).reshape(b, hq, n_pass * nc, -1)[:, :, :nq]
  return fix(ids), fix(flags)

