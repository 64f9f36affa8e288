"""Non-finite inputs: which queries read them, and outputs and stats that say so.

The rule every entry point holds (README, "Validation"): a query whose attention reads a
non-finite value gets a non-finite output and NaN `captured_mass`, `dropped_mass` and
`dropped_mass_bound`; every other query gets the answer it would get with those values
replaced by anything finite. A query reads its own q row and the k and v rows of every
key it can see (the keys dense attention reads: its selection scores or bounds all of
them), and, in the block modes, the summaries of every block holding a key it can see.
So the condensate outputs are non-finite exactly where the dense outputs are, plus,
where summaries are passed in, the queries that see a block whose summary is broken.

`sanitize` replaces non-finite entries by 0 before any implementation runs (so no NaN
leaks through a 0 * NaN product to a query that does not read it, and no kernel can
turn a NaN into a clean number), and `poison` writes NaN back where `reads_nonfinite`
says. Every function is traceable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from condensate_jax import geometry


def sanitize(x: jax.Array) -> jax.Array:
  """x with every NaN / Inf replaced by 0."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def bad_summary_entries(kmin: jax.Array, kmax: jax.Array) -> jax.Array:
  """Entries of block summaries that no finite keys produce: NaN, kmin = -inf, kmax =
  +inf, or kmin > kmax in a non-empty block (an empty block holds +inf / -inf)."""
  empty = jnp.isposinf(kmin) & jnp.isneginf(kmax)
  return (jnp.isnan(kmin) | jnp.isnan(kmax) | jnp.isneginf(kmin) | jnp.isposinf(kmax)
          | ((kmin > kmax) & ~empty))


def sanitize_summaries(kmin: jax.Array, kmax: jax.Array):
  """(kmin, kmax) with broken entries (`bad_summary_entries`) set to 0."""
  bad = bad_summary_entries(kmin, kmax)
  zero = jnp.zeros((), kmin.dtype)
  return jnp.where(bad, zero, kmin), jnp.where(bad, zero, kmax)


def nonfinite_rows(*xs: jax.Array) -> jax.Array:
  """[B, S, Hkv] bool: rows (last axis) of any of xs [B, S, Hkv, D] with a non-finite
  entry."""
  bad = jnp.zeros(xs[0].shape[:3], bool)
  for x in xs:
    bad = bad | ~jnp.all(jnp.isfinite(x), axis=-1)
  return bad


def count_in_range(bad: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """bad [B, S, K] -> [B, K, T]: bad keys in lo..hi (inclusive, [B, T]; hi < lo: 0;
  positions outside 0..S-1 count nothing, so a shard passes lo, hi minus its offset)."""
  c = jnp.cumsum(bad.astype(jnp.int32), axis=1)
  c = jnp.pad(c, ((0, 0), (1, 0), (0, 0)))                       # c[j] = bad keys < j
  s = bad.shape[1]
  take = lambda idx: jnp.take_along_axis(
      c, jnp.clip(idx, 0, s)[:, :, None], axis=1).transpose(0, 2, 1)
  n = take(hi + 1) - take(lo)
  return jnp.where((hi >= lo)[:, None, :], n, 0)


def sanitize_index(index):
  """(bad [B, S, Hkv] keys whose index entry is not finite, the index with those
  entries zeroed). A non-finite mu or sigma of a (row, KV head) marks all its keys."""
  bad_key = ~jnp.isfinite(index.step) | ~jnp.isfinite(index.err)
  bad_head = (~jnp.all(jnp.isfinite(index.mu), -1) | ~jnp.all(jnp.isfinite(index.sigma), -1)
              | ~jnp.all(index.sigma > 0, -1))                              # [B, Hkv]
  bad = bad_key | bad_head[:, None, :]
  fix = lambda x, good, fill: jnp.where(good, x, jnp.asarray(fill, x.dtype))
  ok_head = ~bad_head[..., None]
  clean = dataclasses.replace(
      index, step=fix(index.step, ~bad, 0.0), err=fix(index.err, ~bad, 0.0),
      mu=fix(index.mu, ok_head, 0.0), sigma=fix(index.sigma, ok_head, 1.0))
  return bad, clean


def reads_nonfinite(q, k, v, q_positions, kv_lengths, *, causal, sliding_window,
                    summaries=None, bad_keys=None) -> jax.Array:
  """[B, T, Hq] bool: the queries whose attention reads a non-finite value (module doc).
  summaries: optional (kmin, kmax, P): block summaries [B, nb, Hkv, D] of P keys each.
  bad_keys: optional [B, S, Hkv] bool: keys whose index entry is broken."""
  hq, s = q.shape[2], k.shape[1]
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=causal,
                                  sliding_window=sliding_window)
  bad = nonfinite_rows(k, v)
  if summaries is not None:
    kmin, kmax, p = summaries
    blocks = jnp.any(bad_summary_entries(kmin, kmax), axis=-1)           # [B, nb, K]
    per_key = jnp.repeat(blocks, p, axis=1)[:, :s]
    bad = bad | jnp.pad(per_key, ((0, 0), (0, s - per_key.shape[1]), (0, 0)))
  if bad_keys is not None:
    bad = bad | bad_keys
  return per_query_head(count_in_range(bad, lo, hi), hq) | ~jnp.all(jnp.isfinite(q), -1)


def per_query_head(counts: jax.Array, hq: int) -> jax.Array:
  """counts [B, K, T] of bad keys read per K/V head -> [B, T, Hq] bool (any read)."""
  return jnp.repeat(counts > 0, hq // counts.shape[1], axis=1).transpose(0, 2, 1)


def poison(out: jax.Array, bad: jax.Array) -> jax.Array:
  """out [B, T, Hq, D] with NaN where bad [B, T, Hq]."""
  return jnp.where(bad[..., None], jnp.array(jnp.nan, out.dtype), out)


def poison_result(result, bad: jax.Array, return_stats: bool):
  """An attention call's result (out, or (out, stats)) with the queries that read a
  non-finite value (`bad`) poisoned, and the stats also where the output overflowed
  (finite inputs, scores or sums beyond float range)."""
  if not return_stats:
    return poison(result, bad)
  out, stats = result
  out = poison(out, bad)
  bad_out = ~jnp.all(jnp.isfinite(out), axis=-1)
  return out, poison_stats(stats, bad_out.transpose(0, 2, 1))


def poison_decode(q, out, lse, eps):
  """A decode step's (out [B, 1, Hq, D], lse, eps [B, Hq]) made NaN together where any of
  them reads a non-finite value: a non-finite q row, a NaN or +inf lse, a NaN eps, a
  non-finite output (lse = -inf is an empty set, not a NaN)."""
  bad = (~jnp.all(jnp.isfinite(q[:, 0]), axis=-1) | jnp.isnan(lse) | jnp.isposinf(lse)
         | jnp.isnan(eps) | ~jnp.all(jnp.isfinite(out[:, 0]), axis=-1))          # [B, Hq]
  return (poison(out, bad[:, None]), jnp.where(bad, jnp.nan, lse),
          jnp.where(bad, jnp.nan, eps))


def poison_stats(stats, bad: jax.Array):
  """AttentionStats with NaN mass fields where bad [B, Hq, T]."""
  nan = lambda x: jnp.where(bad, jnp.nan, x)
  return stats._replace(captured_mass=nan(stats.captured_mass),
                        dropped_mass=nan(stats.dropped_mass),
                        dropped_mass_bound=nan(stats.dropped_mass_bound))
