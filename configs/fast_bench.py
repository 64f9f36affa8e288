"""python -m experiments.run --config=fast_bench.py --workdir=runs/fast_bench

Fast path (block selection, DESIGN.md §4): condensate decode (selection="blocks": block
summaries -> top-M blocks per GQA group -> split-K Pallas kernel) and block-sparse causal
prefill against cuDNN and XLA dense on one GPU, in one run, selection included; beside
each: the physical floor (bytes / measured bandwidth, FLOPs / measured matmul rate) and
parity on the same inputs (captured mass, certified eps, max |o - o_cudnn|).

Runtime on one H100/H200: `cases=full` about 6-8 minutes (mostly compilation and the
1M-key cases); `cases=decode` / `cases=prefill` half each; `cases=quick` about 2 minutes;
`cases=smoke` runs tiny cases anywhere (CPU: interpret mode, timings meaningless).
Expected result: see BENCHMARKS.md "## Fast path (block selection)".

Inputs: topic-structured synthetic q/k/v (condensate_jax/blocks_data.py: contiguous key
segments around random topic vectors, each query aimed at 2 segments; parameters in
`data` below, printed with every row); one Gaussian decode row for contrast (flat
attention: block selection is lossy there).
Shapes: decode 32 q / 8 kv heads, prefill 32 heads, d=128, bf16 (DESIGN.md §5).
"""

import ml_collections

from configs import common

K = 1024
_DECODE = [dict(op="decode", batch=b, kv_len=s, block_size=64, top_blocks=16)
           for b in (1, 8) for s in (8 * K, 32 * K, 128 * K, 512 * K, 1024 * K)]
_DECODE_P128 = [dict(op="decode", batch=1, kv_len=s, block_size=128, top_blocks=8)
                for s in (128 * K, 1024 * K)]
_GAUSS = [dict(op="decode", batch=1, kv_len=128 * K, block_size=64, top_blocks=16,
               inputs="gaussian")]
_PREFILL = [dict(op="prefill", batch=1, kv_len=s, block_size=64, top_blocks=8)
            for s in (8 * K, 32 * K, 128 * K)]
_CASES = {
    "full": _DECODE + _DECODE_P128 + _GAUSS + _PREFILL,
    "decode": _DECODE + _DECODE_P128 + _GAUSS,
    "prefill": _PREFILL,
    # the full grid ordered by importance (a run cut short keeps the key rows)
    "ordered": [_DECODE[2], _DECODE[4], _PREFILL[2], _DECODE[7], _DECODE_P128[1],
                _DECODE[0], _DECODE[1], _DECODE[3], _PREFILL[0], _PREFILL[1], _GAUSS[0],
                _DECODE_P128[0], _DECODE[9], _DECODE[5], _DECODE[6], _DECODE[8]],
    "quick": [_DECODE[0], _DECODE[2], _DECODE[4], _DECODE_P128[1], _PREFILL[0]],
    "smoke": [dict(op="decode", batch=2, kv_len=256, block_size=16, top_blocks=2),
              dict(op="prefill", batch=1, kv_len=64, block_size=16, top_blocks=1)],
}


def get_config(arg=None):
  args = common.parse_arg(arg, {"cases": tuple(_CASES)})
  name = args.get("cases", "full")
  config = ml_collections.ConfigDict()
  config.name = f"fast_bench_{name}"
  config.job = "fast_bench"
  config.seed = 0
  config.cases = tuple(_CASES[name])
  config.q_heads, config.kv_heads, config.head_dim = 32, 8, 128
  config.prefill_heads = 32
  config.anchor, config.window = 16, 64
  config.data = dict(segment=256, topic_norm=1.0, key_noise=0.1, query_topics=2,
                     query_gain=2.0, query_noise=0.3)
  # median over `repeats` jitted loops of `iterations` calls (prefill above 16K keys:
  # `prefill_iterations`); XLA dense prefill only up to prefill_xla_max keys (T x S scores)
  config.iterations, config.prefill_iterations, config.repeats = 20, 5, 5
  config.prefill_xla_max = 16 * K
  if name == "smoke":
    config.q_heads, config.kv_heads, config.head_dim, config.prefill_heads = 4, 2, 32, 2
    config.data.segment = 32
    config.iterations, config.prefill_iterations, config.repeats = 2, 1, 2
  return config
