"""Named shape sets for gather attention, shared by the tests and the benchmark.

`ShapeSet` fixes the op's shapes; `make_inputs` builds seeded random inputs for it:
per-head lists of distinct positions, an optional shared list per K/V group, random
validity and, for `ragged`, per-row KV lengths (positions >= length are invalid; the last
row has length 0, so all its queries have an empty set).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ShapeSet:
  name: str
  batch: int
  q_len: int       # T
  kv_len: int      # S
  q_heads: int     # Hq
  kv_heads: int    # Hkv
  head_dim: int    # D
  n_head: int      # per-head list length N
  n_shared: int    # shared list length M (0: no shared list)
  ragged: bool = False

  @property
  def group(self) -> int:
    return self.q_heads // self.kv_heads


# Small sets for the interpret-mode suite (CPU) and the GPU suite.
TEST_SETS = (
    ShapeSet("decode_mha_d64", 2, 1, 64, 4, 4, 64, 8, 8),
    ShapeSet("decode_gqa3_d128", 2, 1, 96, 6, 2, 128, 8, 12),
    ShapeSet("decode_mqa_d256", 1, 1, 80, 4, 1, 256, 16, 5),
    ShapeSet("decode_ragged_gqa", 3, 1, 64, 4, 2, 64, 8, 8, ragged=True),
    ShapeSet("prefill_gqa_d64", 1, 32, 32, 4, 2, 64, 8, 8),
    ShapeSet("prefill_mqa_d128_ragged", 2, 24, 24, 2, 1, 128, 4, 6, ragged=True),
    ShapeSet("decode_no_shared_d64", 2, 1, 48, 4, 2, 64, 12, 0),
)
# The subset run through the (much slower) TPU interpret mode.
TPU_INTERPRET_SETS = ("decode_gqa3_d128", "decode_ragged_gqa", "decode_no_shared_d64")
TEST_SETS_BY_NAME = {s.name: s for s in TEST_SETS}


def make_inputs(shape: ShapeSet, dtype=jnp.float32, seed: int = 0) -> dict:
  """Seeded inputs for `gather_attention(**inputs)` (q, k, v, indices, valid, shared_*)."""
  rng = np.random.default_rng(seed)
  b, t, s, hq, hkv, d = (shape.batch, shape.q_len, shape.kv_len, shape.q_heads,
                         shape.kv_heads, shape.head_dim)
  q = rng.standard_normal((b, t, hq, d))
  k = rng.standard_normal((b, s, hkv, d))
  v = rng.standard_normal((b, s, hkv, d))
  lengths = np.full((b,), s)
  if shape.ragged:
    lengths = rng.integers(1, s + 1, size=b)
    lengths[-1] = 0

  def lists(heads, n):
    idx = np.argsort(rng.random((b, heads, t, s)), axis=-1)[..., :n].astype(np.int32)
    valid = (rng.random(idx.shape) < 0.8) & (idx < lengths[:, None, None, None])
    return jnp.asarray(idx), jnp.asarray(valid)

  indices, valid = lists(hq, shape.n_head)
  out = dict(q=jnp.asarray(q, dtype), k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype),
             indices=indices, valid=valid)
  if shape.n_shared:
    out["shared_indices"], out["shared_valid"] = lists(hkv, shape.n_shared)
  return out


@dataclasses.dataclass(frozen=True)
class BenchCase:
  """One condensate-vs-dense benchmark case (configs/kernel_bench.py)."""
  name: str
  batch: int
  q_len: int       # 1 = decode; == kv_len = causal prefill
  kv_len: int
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128


BENCH_CASES = tuple(
    [BenchCase(f"decode_{s // 1024}k", 1, 1, s) for s in (4096, 16384, 65536, 131072)]
    + [BenchCase("decode_b8_32k", 8, 1, 32768)]
    + [BenchCase(f"prefill_{s // 1024}k", 1, s, s) for s in (1024, 2048, 4096)])
BENCH_CASES_BY_NAME = {c.name: c for c in BENCH_CASES}

# Tiny cases: the benchmark's CPU smoke run (interpret mode; timings meaningless).
SMOKE_BENCH_CASES = (BenchCase("tiny_decode", 1, 1, 256, 4, 2, 64),
                     BenchCase("tiny_prefill", 1, 32, 32, 4, 2, 64))
BENCH_CASES_BY_NAME.update({c.name: c for c in SMOKE_BENCH_CASES})
