"""Does the covers-everything spec give the dense logits bit for bit, at a real model's
shapes, on this device? No weights needed: the programs XLA compiles (and so the kernels
and their rounding) depend on shapes, not values, so a randomly initialised model of a
preset's architecture shows what the parity runner's exactness gate will show.

  python -m experiments.bench.coverage_gate --family=gemma3 --tokens=8064

Prints, for teacher-forced logits with and without return_stats (the parity runner asks
for stats), the fraction of positions bitwise equal to dense and the first differing
position. Exit status 1 when any fraction is below 1.

Seen on an H200 (jax 0.11.2, 2026-12-03, commit b541b0f, then with top_k = tokens through
exact selection's full top-k path; the gate spec now takes its no-top-k path): Gemma 3 270M
at 8064 tokens, 1.000 without stats and 0.0001 with them (first differing position 1).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensate_jax import CondensateSpec
from condensate_jax.lm import LanguageModel
from condensate_jax.models import gemma3, gpt2, llamalike

PRESETS = {"gemma3": (gemma3, gemma3.Gemma3Config.gemma3_270m),
           "smollm2": (llamalike, llamalike.LlamaConfig.smollm2_135m),
           "gpt2": (gpt2, gpt2.GPT2Config.gpt2)}


def _bits(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def run(family: str, tokens: int, seed: int = 0) -> list[dict]:
  """Rows {"stats", "bitwise_frac", "first_diff", "seconds"} for the two stats settings."""
  if family not in PRESETS:
    raise ValueError(f"family={family!r}: expected one of {sorted(PRESETS)}.")
  module, preset = PRESETS[family]
  cfg = preset()
  if isinstance(tokens, bool) or not isinstance(tokens, int) or not (
      2 <= tokens <= cfg.max_length):
    raise ValueError(f"tokens={tokens!r}: expected an int in [2, {cfg.max_length}] "
                     f"({family}'s context).")
  lm = LanguageModel(module.Model(cfg, jnp.float32, rngs=nnx.Rngs(seed)), cfg, None)
  ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, tokens), np.int32)
  dense = _bits(lm.logits(ids)[0])
  # the runner's gate point: top_k = length - anchor - window (grid.grid)
  cover = CondensateSpec(anchor=16, window=64, top_k=max(tokens - 80, 0))
  rows = []
  for stats in (False, True):
    start = time.perf_counter()
    out = lm.logits(ids, attention=cover, return_stats=stats)
    same = np.all(_bits((out[0] if stats else out)[0]) == dense, axis=-1)
    rows.append({"stats": stats, "bitwise_frac": float(same.mean()),
                 "first_diff": None if same.all() else int(np.argmin(same)),
                 "seconds": time.perf_counter() - start})
  return rows


def run_attention(family: str, tokens: int, seed: int = 0) -> list[dict]:
  """The same question one attention call deep, at the preset's head shapes: the gate
  spec through `condensate_attention` against `dense_attention`, for each sliding window
  the family uses (None; Gemma 3's local window) and both stats settings. Rows {"window",
  "stats", "bitwise_frac", "first_diff", "seconds"}; fractions over (position, head)."""
  import jax
  from condensate_jax import attention as attention_lib
  module, preset = PRESETS[family]
  cfg = preset()
  windows = [None] + ([cfg.sliding_window] if getattr(cfg, "sliding_window", None) else [])
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (1, tokens, cfg.num_heads, cfg.head_dim), jnp.float32)
  k = jax.random.normal(keys[1], (1, tokens, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
  v = jax.random.normal(keys[2], (1, tokens, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
  cover = CondensateSpec(anchor=16, window=64, top_k=max(tokens - 80, 0))
  rows = []
  for window in windows:
    dense = _bits(jax.jit(lambda q, k, v, w=window: attention_lib.dense_attention(
        q, k, v, sliding_window=w))(q, k, v))
    for stats in (False, True):
      start = time.perf_counter()
      fn = jax.jit(lambda q, k, v, w=window, s=stats: attention_lib.condensate_attention(
          q, k, v, cover, sliding_window=w, return_stats=s))
      out = fn(q, k, v)
      same = np.all(_bits(out[0] if stats else out) == dense, axis=-1)[0]     # [T, Hq]
      rows.append({"window": window, "stats": stats, "bitwise_frac": float(same.mean()),
                   "first_diff": None if same.all() else int(np.argmin(same.all(-1))),
                   "seconds": time.perf_counter() - start})
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--family", default="gemma3", choices=sorted(PRESETS))
  parser.add_argument("--tokens", type=int, default=8064)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--level", default="model", choices=("model", "attention"),
                      help="model: teacher-forced logits; attention: one attention call "
                      "at the preset's head shapes (no model, seconds to compile)")
  args = parser.parse_args(argv)
  if args.level == "attention":
    rows = run_attention(args.family, args.tokens, args.seed)
    print("| family | tokens | sliding window | return_stats | bitwise (pos, head) | "
          "first differing position | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
      print(f"| {args.family} | {args.tokens} | {r['window']} | {r['stats']} | "
            f"{r['bitwise_frac']:.4f} | {r['first_diff']} | {r['seconds']:.1f} |")
    return 0 if all(r["bitwise_frac"] == 1.0 for r in rows) else 1
  rows = run(args.family, args.tokens, args.seed)
  print("| model | tokens | return_stats | bitwise rows | first differing position | s |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {args.family} (random weights) | {args.tokens} | {r['stats']} | "
          f"{r['bitwise_frac']:.4f} | {r['first_diff']} | {r['seconds']:.1f} |")
  return 0 if all(r["bitwise_frac"] == 1.0 for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
