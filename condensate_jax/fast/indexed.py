"""The timed decode step of selection="indexed" (issue #13): the key index scanned once,
the best candidates scored exactly, the top_k of those attended with the anchor and the
window, and a certified eps.

Per decode query head (the sets of the XLA specification, `impl/xla_indexed.py`):
  1. scan      `pallas_kernels.index_scan` reads the packed index (`PackedIndex`,
               bits * D / 8 + 8 bytes per key and K/V head) once: est_j for every middle key
               (on a GPU by default on tensor cores, "triton_mma", ~1.8x faster than
               the CUDA-core scan="triton");
  2. candidates the spec.num_candidates keys of highest est (`candidates`: the set
               lax.top_k picks, found without a sort by `pallas_kernels.top_select`,
               in two levels beyond its 32K-entry rows; a level whose row is still
               longer takes lax.top_k), in position order;
  3. exact     their K rows gathered and scored exactly; the top_k of those (ties to the
               lower position, as in "exact"; the same selection) join the set;
  4. attend    `pallas_kernels.gather_attention` over anchor + window (read once per
               K/V group) and each head's top_k rows (the lists split over programs and
               merged by log-sum-exp: a step has only B * Hkv groups);
  5. eps       delta = sum over non-candidates (est_j <= tau, tau the C-th largest est)
               of exp(est_j + slack_j) + sum over unselected candidates of
               exp(s_j + rounding slack); eps = delta / (Z_set + delta) bounds the dropped
               mass of the set actually chosen (keys tied with tau are counted twice: an
               over-count, never an under-count; delta inflated by
               `xla_indexed.LOG_MARGIN`, as in the specification).
The step reads the index, the candidates' K rows and the set's K/V rows; it trusts the
index to be that of k (a key whose entry is broken is not seen: condensate_attention
checks every key). Non-finite values: a head whose q row is not finite, or that sees a
key whose estimate is NaN (a broken index entry: counted in eps with a NaN bound, whether
or not it was attended), or whose output or lse comes out NaN, gets NaN out, lse and eps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from condensate_jax import finite, geometry, softmax, validation
from condensate_jax.impl import xla_indexed
from condensate_jax.selection import index as index_lib
from condensate_jax.selection.bounds import bound_slack
from condensate_jax.softmax import HIGHEST, NEG_INF
from pallas_kernels import util
from pallas_kernels.gather_attention import api as gather_api
from pallas_kernels.index_scan import api as scan_api
from pallas_kernels.top_select import api as top_api
from pallas_kernels.top_select import reference as top_reference

SCANS = (None, "triton", "triton_mma", "mosaic_gpu", "reference")
SELECTS = (None, "triton", "reference", "xla")


def check_indexed_inputs(q, k, v, index, kv_lengths, spec, scale, scan, select=None):
  """Validates `indexed_decode_step`'s inputs (ValueError naming the argument); returns
  (kv_lengths int32 [B], scale)."""
  validation.check_spec(spec)
  if spec.selection != "indexed":
    raise ValueError(f"spec.selection={spec.selection!r}: indexed_decode_step implements "
                     "selection='indexed'.")
  validation.check_decode_qkv(q, k, v, "indexed_decode_step")
  b, _, _, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  if not isinstance(index, index_lib.PackedIndex):
    raise ValueError(f"index: expected a PackedIndex (selection.index.pack_index), got "
                     f"{type(index).__name__}.")
  if index.bits != spec.index_bits:
    raise ValueError(f"index.bits={index.bits}: expected spec.index_bits={spec.index_bits}.")
  want = {"packed": (b, hkv, s_len, d * index.bits // 8), "step": (b, hkv, s_len),
          "err": (b, hkv, s_len), "mu": (b, hkv, d), "sigma": (b, hkv, d)}
  for name, shape in want.items():
    got = tuple(getattr(index, name).shape)
    if got != shape:
      raise ValueError(f"index.{name}.shape={got}: expected {shape} (the packed index of "
                       f"k [B, S, Hkv, D] = {tuple(k.shape)}).")
  if index.packed.dtype != jnp.uint8:
    raise ValueError(f"index.packed.dtype={index.packed.dtype}: expected uint8.")
  kv_lengths = validation.check_int_array("kv_lengths", kv_lengths, (b,), 1, s_len)
  scale = validation.check_scale(scale, d, optional=False)
  if scan not in SCANS:
    raise ValueError(f"scan={scan!r}: expected one of {list(SCANS)}.")
  if select not in SELECTS:
    raise ValueError(f"select={select!r}: expected one of {list(SELECTS)}.")
  return kv_lengths, scale


def indexed_decode_step(q, k, v, index, kv_lengths, *, spec, scale, scan=None,
                        select=None, return_ids=False):
  """One decode step of selection="indexed" (module docstring).

  q [B, 1, Hq, D]; k, v [B, S, Hkv, D]; index: the `PackedIndex` of k (kept beside the
  cache); kv_lengths [B] (the query sits at position len - 1, causal). scan: the index
  scan's implementation (None: the platform's best in `pallas_kernels.index_scan`, on a
  CPU the Triton kernel interpreted; "triton", "triton_mma"; "reference": plain jnp).
  select: the top-k selections' (None: `pallas_kernels.top_select`, interpreted on a
  CPU; "reference"; "xla": lax.top_k and a sort, the earlier step's). Returns
  out [B, 1, Hq, D], lse [B, Hq] and the certified eps [B, Hq]; with
  return_ids also the chosen middle keys ids [B, Hq, k'] (-1: none) and the number of
  keys scored exactly per head [B, Hq] (anchor + window + candidates)."""
  kv_lengths, scale = check_indexed_inputs(q, k, v, index, kv_lengths, spec, scale, scan,
                                           select)
  return _step(q, k, v, index, kv_lengths, spec=spec, scale=scale, scan=scan,
               select=select, return_ids=bool(return_ids))


def _gather_keys(k, ids):
  """k [B, S, K, D], ids [B, K, G, C] -> rows [B, K, G, C, D]."""
  b, hkv = k.shape[0], k.shape[2]
  return k[jnp.arange(b)[:, None, None, None], ids, jnp.arange(hkv)[None, :, None, None]]


def scan_estimates(q, index, kv_lengths, *, spec, scale, scan=None, **scan_kw):
  """Phase 1 alone (traceable, inputs as `indexed_decode_step`'s): est [B, K, G, S]
  float32, -inf where a key is not a middle key of the row's decode query. scan_kw: the
  scan kernel's tuning (`pallas_kernels.index_scan.api.index_scan`'s kernel_kw), for a
  named scan only (the default chain's kernels take different tuning)."""
  if scan_kw and scan is None:
    raise ValueError(f"scan_kw={scan_kw!r}: kernel tuning needs a named scan (one of "
                     f"{[x for x in SCANS if x]}), not scan=None.")
  b, _, hq, d = q.shape
  hkv = index.packed.shape[1]
  g = hq // hkv
  gp = util.next_pow2(g)
  qg = q[:, 0].astype(jnp.float32).reshape(b, hkv, g, d)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, gp - g)] + [(0, 0)] * (x.ndim - 3))
  qs = qg * index.sigma[:, :, None, :]
  qmu = jnp.einsum("bkgd,bkd->bkg", qg, index.mu, precision=HIGHEST)
  return scan_api.index_scan(pad(qs), pad(qmu), index.packed, index.step, kv_lengths,
                             scale=scale, bits=index.bits, group=g, anchor=spec.anchor,
                             window=spec.window, implementation=scan, **scan_kw)[:, :, :g]


# select="xla" keeps the earlier step's candidates: one lax.top_k up to this many keys,
# two levels beyond (XLA's GPU top_k sorts each row: measured on an H200 for 32 rows, any
# k: ~0.08 ms up to 16K keys, 0.32 ms at 64K, 0.98 ms at 128K, 7.6 ms at 1M)
_XLA_FLAT = 16384


def candidates(est, num_candidates, select=None):
  """Phase 2 alone: (vals, ids, tau): the C = min(num_candidates, S) keys of highest
  estimate, the set `lax.top_k(est, C)` picks (total order, ties to the lower position),
  ids [B, K, G, C] in ascending position order, vals their estimates, tau [B, K, G] the
  C-th largest estimate. select: the selection's implementation (None: the Pallas
  kernel, interpreted on a CPU, `top_select.api.top_set`: flat up to its 32K-entry rows,
  two levels beyond; "reference"; "xla": the earlier step's selections, lax.top_k then a
  sort of the ids, flat up to _XLA_FLAT keys: the same sets, the step's sums in another
  order)."""
  s_len = est.shape[-1]
  c = min(num_candidates, s_len)
  if select == "xla":
    chunk = 1 if s_len <= _XLA_FLAT else top_api.sqrt_chunk(s_len, c)
    return top_api.two_level(est, c, chunk, top_reference.top_select)
  return top_api.top_set(est, c, implementation=select)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "scan", "select",
                                             "return_ids"))
def _step(q, k, v, index, kv_lengths, *, spec, scale, scan, select, return_ids):
  b, _, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  qg = q[:, 0].astype(jnp.float32).reshape(b, hkv, g, d)
  est = scan_estimates(q, index, kv_lengths, spec=spec, scale=scale, scan=scan)
  # 2. candidates by estimate, then in position order (ties of the exact top-k go to the
  # lower position, as in "exact")
  top_est, cand, tau = candidates(est, spec.num_candidates, select)         # [B, K, G, C]
  c = cand.shape[-1]
  tau = tau[..., None]
  cand_ok = top_est > NEG_INF
  cand = jnp.where(cand_ok, cand, 0)
  # 3. exact scores of the candidates
  rows = _gather_keys(k, cand).astype(jnp.float32)                           # [B,K,G,C,D]
  s_c = jnp.float32(scale) * jnp.einsum("bkgd,bkgcd->bkgc", qg, rows, precision=HIGHEST)
  s_c = jnp.where(cand_ok, s_c, NEG_INF)
  kk = min(spec.top_k, c)
  if select == "xla":
    _, pick = jax.lax.top_k(s_c, kk)                                         # [B, K, G, k']
  else:
    _, pick, _ = top_api.top_set(s_c, kk, implementation=select)
  chosen_ok = jnp.take_along_axis(cand_ok, pick, axis=-1)
  ids = jnp.where(chosen_ok, jnp.take_along_axis(cand, pick, axis=-1), -1)
  # 4. attend anchor + window (shared by the group) and each head's chosen keys
  lo, hi = geometry.visible_range(kv_lengths[:, None] - 1, kv_lengths, causal=True,
                                  sliding_window=None)
  s_idx, s_ok = geometry.static_positions(lo, hi, spec, s_len)               # [B, 1, N]
  shared = lambda x: jnp.broadcast_to(x[:, None], (b, hkv) + x.shape[1:])
  out, lse = gather_api.gather_attention(
      q, k, v, jnp.maximum(ids, 0).reshape(b, hq, 1, kk), chosen_ok.reshape(b, hq, 1, kk),
      scale=scale, shared_indices=shared(s_idx), shared_valid=shared(s_ok))
  lse = lse.reshape(b, hkv, g)
  # 5. eps: non-candidates by the index's bound, unselected candidates by their score
  a_err, a_step, a_one = (x[:, 0, ..., None] for x in index_lib.slack_coefficients(
      qg[:, None], index.mu, index.sigma, index.bits, scale))                # [B, K, G, 1]
  upper = est + a_err * index.err[:, :, None] + a_step * index.step[:, :, None] + a_one
  # every middle key not above tau; a NaN estimate (a broken index entry, wherever top_k
  # ranked it) lands here with a NaN bound, so eps (and out) come out NaN, as in the spec
  rest = ~(est > tau) & ~jnp.isneginf(est)
  delta_rest = jax.nn.logsumexp(jnp.where(rest, upper, NEG_INF), axis=-1)
  chosen = jnp.put_along_axis(jnp.zeros(s_c.shape, bool), pick, chosen_ok, axis=-1,
                              inplace=False)
  magnitude = jnp.einsum("bkgd,bkgcd->bkgc", jnp.abs(qg), jnp.abs(rows), precision=HIGHEST)
  cand_upper = s_c + jnp.float32(bound_slack(d) * scale) * magnitude
  delta_cand = jax.nn.logsumexp(jnp.where(cand_ok & ~chosen, cand_upper, NEG_INF), axis=-1)
  log_delta = jnp.logaddexp(delta_rest, delta_cand)
  log_delta = jnp.where(jnp.isneginf(log_delta), NEG_INF, log_delta + xla_indexed.LOG_MARGIN)
  eps = softmax.log_delta_to_eps(log_delta, lse)
  # one check makes out, lse and eps agree on non-finite values (module docstring)
  out, lse, eps = finite.poison_decode(q, out, lse.reshape(b, hq), eps.reshape(b, hq))
  if not return_ids:
    return out, lse, eps
  n_static = jnp.sum(s_ok, axis=-1, dtype=jnp.int32)                        # [B, 1]
  scored = n_static + jnp.sum(cand_ok, axis=-1, dtype=jnp.int32).reshape(b, hq)
  return out, lse, eps, ids.reshape(b, hq, kk), scored
