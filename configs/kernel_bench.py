"""python -m experiments.run --config=kernel_bench.py --workdir=runs/kernel_bench

Condensate gather-attention kernel (implementation="pallas": XLA exact top-k selection +
Pallas Triton gather kernel) against dense XLA (`cj.dense_attention`) and cuDNN
(`jax.nn.dot_product_attention(implementation="cudnn")`) on the same GPU in the same run;
bf16, 32 query / 8 KV heads, d=128, spec anchor=1 window=64 top_k=32.

Runtime: about 3-4 minutes on one H100 (mostly compilation). Expected result (see
BENCHMARKS.md): the exact condensate path is SLOWER than dense at every length — its
selection scores all of K (and in prefill materialises the T x S scores) before the gather
kernel runs; the gather kernel alone is far below dense time only at long decode.

`kernel_bench.py:cases=smoke` runs two tiny cases (CPU: interpret mode, timings
meaningless) to check the plumbing; `cases=decode` / `cases=prefill` run one half.
Job: experiments/bench/kernel_bench.py.
"""

import ml_collections

from configs import common

_CASES = {
    "full": ("decode_4k", "decode_16k", "decode_64k", "decode_128k", "decode_b8_32k",
             "prefill_1k", "prefill_2k", "prefill_4k"),
    "decode": ("decode_4k", "decode_16k", "decode_64k", "decode_128k", "decode_b8_32k"),
    "prefill": ("prefill_1k", "prefill_2k", "prefill_4k"),
    "smoke": ("tiny_decode", "tiny_prefill"),
}


def get_config(arg=None):
  args = common.parse_arg(arg, {"cases": tuple(_CASES)})
  config = ml_collections.ConfigDict()
  config.name = "kernel_bench"
  config.job = "kernel_bench"
  config.seed = 0
  config.dtype = "bfloat16"
  config.cases = _CASES[args.get("cases", "full")]
  config.attention = ml_collections.ConfigDict()
  config.attention.anchor = 1
  config.attention.window = 64
  config.attention.top_k = 32
  # Timing (experiments.bench.timing.time_loop): median over `repeats` timed jitted loops
  # of `iterations` chained calls, after `warmup` untimed loops.
  config.warmup = 3
  config.iterations = 10
  config.repeats = 7
  if args.get("cases") == "smoke":
    config.warmup, config.iterations, config.repeats = 1, 1, 2
  return config
