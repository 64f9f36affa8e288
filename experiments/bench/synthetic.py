"""Seeded synthetic q/k/v for the benchmarks (and block-selection tests and notebooks).

Random Gaussian keys give flat attention: every block looks alike, block bounds are
loose and block selection is lossy (or, in "bounded"/"certified", must read everything).
Real KV caches are not like that: keys cluster by topic/segment and a query attends
mostly to a few segments. `topic_qkv` models exactly that, and nothing more:
  * the key positions are cut into contiguous segments (mean length `segment` keys);
    segment c of KV head h has a topic vector mu_hc ~ topic_norm * N(0, I);
  * k_j = mu_{h, seg(j)} + key_noise * N(0, I);
  * each query head picks `query_topics` segments at random and
    q = query_gain * (mean of their topic vectors) + query_noise * N(0, I);
  * v ~ N(0, I).
With D = 128 and scale 1/sqrt(D) the defaults put a query's own segments about 11 nats
above the rest (score std about 1.4). Min/max block bounds overshoot a block's best score
by about scale * sum_d |q_d| * (radius of the block in d): large key_noise makes them
loose. Benchmarks print these parameters next to every parity number.

`make_inputs` is what fast_bench feeds its rows (bf16, on device, one batch row at a
time); `normal_qkv` is kernel_bench's seeded NumPy Gaussian input set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def topic_qkv(rng: np.random.Generator, batch: int, q_len: int, kv_len: int,
              q_heads: int, kv_heads: int, head_dim: int, *, segment: int = 256,
              topic_norm: float = 1.0, key_noise: float = 0.1, query_topics: int = 2,
              query_gain: float = 2.0, query_noise: float = 0.3):
  """Returns float32 NumPy q [B, T, Hq, D], k, v [B, S, Hkv, D]."""
  b, t, s, hq, hkv, d = batch, q_len, kv_len, q_heads, kv_heads, head_dim
  n_seg = max(1, int(np.ceil(2 * s / segment)))
  cuts = np.sort(rng.choice(np.arange(1, s), size=min(n_seg - 1, s - 1), replace=False))
  seg = np.searchsorted(cuts, np.arange(s), side="right")            # [S]
  n_seg = int(seg.max()) + 1
  topics = rng.standard_normal((b, n_seg, hkv, d)).astype(np.float32) * topic_norm
  k = topics[:, seg] + key_noise * rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  g = hq // hkv
  picks = rng.integers(0, n_seg, size=(b, t, hq, query_topics))
  heads = np.repeat(np.arange(hkv), g)                                 # [Hq]
  aim = topics[np.arange(b)[:, None, None, None], picks, heads[None, None, :, None]]
  q = query_gain * aim.mean(axis=3)
  q = q + query_noise * rng.standard_normal((b, t, hq, d)).astype(np.float32)
  return q.astype(np.float32), k.astype(np.float32), v


def topic_qkv_jax(key, batch: int, q_len: int, kv_len: int, q_heads: int, kv_heads: int,
                  head_dim: int, *, dtype="bfloat16", segment: int = 256,
                  topic_norm: float = 1.0, key_noise: float = 0.1, query_topics: int = 2,
                  query_gain: float = 2.0, query_noise: float = 0.3):
  """The model of `topic_qkv`, generated on device with jax.random (for long contexts),
  with two differences: segment boundaries are Bernoulli(1 / segment) cuts, and a query
  (at position S - T + t) aims at topics drawn once per segment of its own position, so
  the queries of one segment share their targets (prefill query blocks are coherent)."""
  b, t, s, hq, hkv, d = batch, q_len, kv_len, q_heads, kv_heads, head_dim
  k_cut, k_top, k_kn, k_v, k_pick, k_qn = jax.random.split(key, 6)
  cuts = jax.random.bernoulli(k_cut, 1.0 / segment, (s,)).at[0].set(False)
  seg = jnp.cumsum(cuts.astype(jnp.int32))                             # [S]
  n_max = 4 * s // segment + 16
  seg = jnp.minimum(seg, n_max - 1)
  topics = jax.random.normal(k_top, (b, n_max, hkv, d), jnp.float32) * topic_norm
  k = topics[:, seg] + key_noise * jax.random.normal(k_kn, (b, s, hkv, d), jnp.float32)
  v = jax.random.normal(k_v, (b, s, hkv, d), dtype)
  # a query picks the topics of the segment its own position lies in: consecutive
  # queries of one segment look for the same things (the queries are the last T keys)
  seg_picks = jax.random.randint(k_pick, (b, n_max, hq, query_topics), 0, seg[-1] + 1)
  picks = seg_picks[:, seg[s - t:]]                                    # [B, T, Hq, n]
  heads = jnp.repeat(jnp.arange(hkv), hq // hkv)
  aim = topics[jnp.arange(b)[:, None, None, None], picks, heads[None, None, :, None]]
  q = query_gain * aim.mean(axis=3)
  q = q + query_noise * jax.random.normal(k_qn, (b, t, hq, d), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v


def gaussian_qkv_jax(key, batch, q_len, kv_len, q_heads, kv_heads, head_dim, *,
                     dtype="bfloat16"):
  """i.i.d. N(0, 1) q, k, v: flat attention (the hard case for block selection)."""
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (batch, q_len, q_heads, head_dim), dtype),
          jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), dtype),
          jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), dtype))


def make_inputs(kind, seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim, data):
  """bf16 q, k, v of `kind` "topic" (`topic_qkv_jax` with the parameters `data`) or
  "gaussian" (`gaussian_qkv_jax`); generated one batch row at a time (row b from
  fold_in(PRNGKey(seed), b): bounded float32 temporaries)."""
  rows = []
  for b in range(batch):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), b)
    if kind == "topic":
      gen = functools.partial(topic_qkv_jax, batch=1, q_len=q_len, kv_len=kv_len,
                              q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                              **data)
      if q_len * q_heads * head_dim >= 1 << 31:   # 1M-token prefill: eager temporaries
        gen = jax.jit(gen)                          # would not fit on the GPU
      rows.append(gen(key))
    else:
      rows.append(gaussian_qkv_jax(key, 1, q_len, kv_len, q_heads, kv_heads, head_dim))
  return tuple(jnp.concatenate(parts, 0) for parts in zip(*rows))


def normal_qkv(seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype):
  """i.i.d. N(0, 1) q [B, T, Hq, D], k, v [B, S, Hkv, D] from NumPy's default_rng(seed)
  (drawn in float32, in that order), cast to dtype."""
  rng = np.random.default_rng(seed)
  shapes = ((batch, q_len, q_heads, head_dim), (batch, kv_len, kv_heads, head_dim),
            (batch, kv_len, kv_heads, head_dim))
  return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)
