"""Parity of the fast path's sets, on the benchmark's own inputs (outside the timed loop).

For the set a decode or prefill step attended: its true captured mass (float32, from all
scores), the certified eps bound (given by the step, or computed here from the bounds
u of the blocks not attended, as the step does), max |o_set - o_dense| in float32 and,
given the step's output, max |out - o_set| (the kernel's own error at this size).

The set's geometry comes from `condensate_jax.geometry` (anchor / window / middle of a
query); the prefill set is the one the prefill op defines
(`pallas_kernels.block_sparse.reference.prefill_mask`, which tests/experiments checks
`prefill_row_set` against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj
from condensate_jax import fast, geometry, softmax
from condensate_jax.selection import bounds as bounds_lib
from condensate_jax.selection import order as order_lib

NEG_INF = softmax.NEG_INF


def set_parity(s, in_set, v_rows, o_kernel=None):
  """s [..., S] float32 scores (-inf = invisible), in_set [..., S], v_rows [..., S, D]:
  captured mass, max |o_set - o_dense| (float32, from all scores), the max, the set's
  normaliser and (given the kernel's output o_kernel [..., D]) max |o_kernel - o_set|."""
  m = jnp.max(s, -1, keepdims=True)
  e = jnp.exp(s - m)
  e_set = jnp.where(in_set, e, 0.0)
  z, z_set = jnp.sum(e, -1), jnp.sum(e_set, -1)
  o = jnp.einsum("...s,...sd->...d", e, v_rows) / z[..., None]
  o_set = jnp.einsum("...s,...sd->...d", e_set, v_rows) / z_set[..., None]
  k_err = (None if o_kernel is None else
           float(jnp.max(jnp.abs(o_kernel.astype(jnp.float32) - o_set))))
  return z_set / z, jnp.max(jnp.abs(o - o_set), -1), m[..., 0], z_set, k_err


def _query_middle_counts(pos, spec, nb, s_len):
  """Middle keys per block [nb] of one causal query at position pos (no sliding window):
  `geometry.middle_counts` of its visible range 0..pos."""
  lo, hi = jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), pos, jnp.int32)
  return geometry.middle_counts(lo, hi, spec, nb, s_len)[0][0, 0]


def _block_mask(ids, nb, p, s_len):
  """[B, K, S] bool: the keys of the blocks ids [B, K, M] (-1 = none)."""
  b, hkv = ids.shape[:2]
  chosen = jnp.zeros((b, hkv, nb + 1), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None],
      jnp.where(ids >= 0, ids, nb)].set(True)[..., :-1]
  return chosen, jnp.repeat(chosen, p, axis=-1)[..., :s_len]


def decode_parity(q, k, v, ids, eps, spec, u=None, out=None):
  """Captured mass of the selected set (all scores, float32), the certified eps (given,
  or computed here from the bounds u [B, K, G, nb] as decode_attend does),
  max |o_set - o_dense| in float32 and, given the step's output out [B, 1, Hq, D],
  max |out - o_set| (the kernel's own error at this size); also the mass of the same
  number of blocks ranked by the block centre q.c_b instead of the bound."""
  b, _, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  p = spec.block_size
  nb = s_len // p
  qg = q[:, 0].reshape(b, hkv, g, d)
  s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
  # the static part of a decode query's set (position S - 1: anchor + window)
  lengths = jnp.full((b,), s_len, jnp.int32)
  lo, hi, n_mid = geometry.decode_ranges(lengths, spec, nb, s_len)
  masks = geometry.static_masks(lo, hi, s_len, spec)                   # [B, 1, 1, 1, S]
  static = (masks.anchor | masks.window)[:, :, 0, 0]                   # [B, 1, S]
  chosen, in_blocks = _block_mask(ids, nb, p, s_len)
  in_set = static | in_blocks                                          # [B, K, S]
  vt = v.transpose(0, 2, 1, 3).astype(jnp.float32)[:, :, None]          # [B, K, 1, S, D]
  o_k = None if out is None else out[:, 0].reshape(b, hkv, g, d)
  cap, err, m, z_set, k_err = set_parity(s, in_set[:, :, None], vt, o_k)
  if eps is None:
    n_mid = n_mid[0, 0]                                                # [nb] (one length)
    terms = jnp.where(chosen[:, :, None] | (n_mid == 0), NEG_INF,
                      u + jnp.log(jnp.maximum(n_mid, 1)))                 # [B, K, G, nb]
    log_delta = jax.nn.logsumexp(terms, axis=-1) - m                     # [B, K, G]
    eps = softmax.log_delta_to_eps(log_delta, jnp.log(z_set))
  # diagnostic, not timed: the same M blocks ranked by the block centre q.c_b instead of
  # the upper bound (blocks straddling two segments have loose min/max boxes)
  summ = cj.build_summaries(k, p)
  cen = bounds_lib.block_centres(q, summ, d**-0.5)[:, :, :, 0]           # [B, K, G, nb]
  _, ids_c = jax.lax.top_k(order_lib.group_score(cen, head_axis=2, block_axis=3),
                           ids.shape[-1])
  in_set_c = static | _block_mask(ids_c, nb, p, s_len)[1]
  cap_c = set_parity(s, in_set_c[:, :, None], vt)[0]
  return dict(kernel_err=k_err, captured_centre_rank_mean=float(cap_c.mean()),
              captured_centre_rank_min=float(cap_c.min()),
              captured_mean=float(cap.mean()), captured_min=float(cap.min()),
              dropped_max=float(1 - cap.min()), eps_bound_max=float(eps.max()),
              eps_bound_median=float(jnp.median(eps)), max_abs_err=float(err.max()),
              set_keys=int(in_set[0, 0].sum()))


def indexed_parity(q, k, v, ids, eps, spec, out=None):
  """decode_parity for the indexed step: the set is anchor + window + each head's chosen
  middle keys ids [B, Hq, k'] (-1 = none); eps [B, Hq] the step's certificate."""
  b, _, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  s = jnp.einsum("bkgd,bskd->bkgs", q[:, 0].reshape(b, hkv, g, d), k,
                 preferred_element_type=jnp.float32) * (d**-0.5)
  lengths = jnp.full((b,), s_len, jnp.int32)
  lo, hi = geometry.visible_range(lengths[:, None] - 1, lengths, causal=True,
                                  sliding_window=None)
  masks = geometry.static_masks(lo, hi, s_len, spec)
  static = (masks.anchor | masks.window)[:, :, :, 0]                    # [B, 1, 1, S]
  ids = ids.reshape(b, hkv, g, -1)
  chosen = jnp.put_along_axis(jnp.zeros((b, hkv, g, s_len + 1), bool),
                              jnp.where(ids >= 0, ids, s_len), True, axis=-1, inplace=False)
  in_set = static | chosen[..., :-1]
  vt = v.transpose(0, 2, 1, 3).astype(jnp.float32)[:, :, None]          # [B, K, 1, S, D]
  o_k = None if out is None else out[:, 0].reshape(b, hkv, g, d)
  cap, err, _, _, k_err = set_parity(s, in_set, vt, o_k)
  eps = jnp.asarray(eps, jnp.float32)
  return dict(kernel_err=k_err, captured_mean=float(cap.mean()),
              captured_min=float(cap.min()), dropped_max=float(1 - cap.min()),
              eps_bound_max=float(eps.max()), eps_bound_median=float(jnp.median(eps)),
              eps_covers_dropped=bool(jnp.all(eps.reshape(cap.shape) >= 1 - cap - 1e-6)),
              max_abs_err=float(err.max()))


def listed_blocks(lists, flags, nb):
  """lists, flags [B, H, L] (a query block's key-block list, -1 = none) -> (listed,
  flagged) [B, H, nb] bool: the block is listed; it is listed with its middle keys
  attended (flag > 0)."""
  hit = lists[..., None] == jnp.arange(nb)                              # [B, H, L, nb]
  return jnp.any(hit, -2), jnp.any(hit & (flags[..., None] > 0), -2)


def prefill_row_set(r, t, s_len, kblocks, kflags, spec):
  """[B, H, S] bool: the set of prefill query row r (position S - T + r) under the lists
  of its query block, as the prefill op defines it
  (`pallas_kernels.block_sparse.reference.prefill_mask`: in a listed block, the anchor
  and window keys, and the middle keys where the block is flagged), with the query's
  anchor / window / middle from `geometry.static_masks`. Row by row at fixed shapes (the
  op's mask of one query takes shapes that change with its position: a compile each)."""
  p = spec.block_size
  pos = s_len - t + r
  lo, hi = jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), pos, jnp.int32)
  masks = geometry.static_masks(lo, hi, s_len, spec)                   # [1, 1, 1, 1, S]
  anchor, window, middle = (x[:, :, 0, 0] for x in (masks.anchor, masks.window,
                                                   masks.middle))      # [1, 1, S]
  listed, flagged = (jnp.repeat(x, p, axis=-1)[..., :s_len] for x in listed_blocks(
      kblocks[:, :, r // p], kflags[:, :, r // p], -(-s_len // p)))
  return listed & (anchor | window | (flagged & middle))


def prefill_parity(q, k, v, spec, kblocks, kflags, n_rows=32, out=None):
  """Sampled query rows: captured mass of the set, the per-query certified eps (from
  per-query bounds of the blocks not attended), max |o_set - o_dense| in float32 and,
  given the step's output out [B, T, H, D], max |out - o_set| on those rows."""
  b, t, h, d = q.shape
  s_len = k.shape[1]
  p = spec.block_size
  scale = d**-0.5
  summ = cj.build_summaries(k, p)
  rows = np.unique(np.linspace(t // 8, t - 1, n_rows).astype(int))
  j = jnp.arange(s_len)
  vt = v.transpose(0, 2, 1, 3).astype(jnp.float32)                      # [B, H, S, D]
  caps, epss, errs, k_errs = [], [], [], []
  for r in rows:
    r = int(r)
    pos = s_len - t + r
    in_set = prefill_row_set(r, t, s_len, kblocks, kflags, spec)
    s = jnp.einsum("bhd,bshd->bhs", q[:, r], k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(j <= pos, s, NEG_INF)
    cap, err, m, z_set, k_err = set_parity(s, in_set, vt, None if out is None else out[:, r])
    caps.append(cap)
    errs.append(err)
    k_errs.append(k_err)
    # certificate: blocks holding middle keys of this query whose middle keys were not
    # attended, each bounded by its per-query U_b
    u = fast.fast_bounds(q[:, r], summ.kmin, summ.kmax, scale)[:, :, 0]   # [B, H, nb]
    nbk = summ.num_blocks
    n_mid = _query_middle_counts(pos, spec, nbk, s_len)
    taken = listed_blocks(kblocks[:, :, r // p], kflags[:, :, r // p], nbk)[1]
    terms = jnp.where((n_mid > 0) & ~taken,
                      u - m[..., None] + jnp.log(jnp.maximum(n_mid, 1)), NEG_INF)
    epss.append(softmax.log_delta_to_eps(jax.nn.logsumexp(terms, -1), jnp.log(z_set)))
  cap, eps, err = jnp.stack(caps), jnp.stack(epss), jnp.stack(errs)
  return dict(captured_mean=float(cap.mean()), captured_min=float(cap.min()),
              dropped_max=float(1 - cap.min()), eps_bound_max=float(eps.max()),
              eps_bound_median=float(jnp.median(eps)), max_abs_err=float(err.max()),
              kernel_err=None if out is None else max(k_errs), parity_rows=len(rows))
