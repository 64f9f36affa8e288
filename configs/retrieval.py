"""python -m experiments.run --config=retrieval.py --workdir=runs/retrieval

Needle retrieval of the selection modes (issue #13; experiments/bench/retrieval.py): per
query head a few single-key needles at random depths in keys with a shared offset and
outlier channels; needle recall, captured mass, keys scored exactly and certified eps of
exact top-k, "indexed" and "blocks" at one middle-key budget. Runs on a CPU (the XLA
specification; 8K-128K keys, about a minute); `:size=long` adds 512K and 1M (needs ~20 GB
of host memory). Shapes: 32 q / 8 kv heads, d = 128, float32 (the decode shape).

`:size=gpu` (one GPU, a few minutes, mostly compilation): 128K and 1M keys in bfloat16 with
the timed decode steps ("indexed": `fast.indexed_decode_step`; "blocks":
`fast.decode_step`) and cuDNN dense on the same inputs in the same run, each beside the
quality of the step's own output and its byte floor. `timing=true` adds the timed steps
to any size (on a CPU the kernels are interpreted: the times mean nothing, the columns
are checked).
"""

import ml_collections

from configs import common

K = 1024


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": ("default", "long", "smoke", "gpu"),
                                "timing": ("true", "false")})
  size = args.get("size", "default")
  config = ml_collections.ConfigDict()
  config.name = f"retrieval-{size}"
  config.job = "retrieval"
  config.seed = 0
  config.lengths = {"default": (8 * K, 32 * K, 128 * K),
                    "long": (8 * K, 32 * K, 128 * K, 512 * K, 1024 * K),
                    "smoke": (2 * K,), "gpu": (128 * K, 1024 * K)}[size]
  config.modes = ("exact", "indexed", "blocks")
  config.q_heads, config.kv_heads, config.head_dim = (32, 8, 128) if size != "smoke" else (
      4, 2, 32)
  config.dtype = "bfloat16" if size == "gpu" else "float32"
  config.timing = args.get("timing", "true" if size == "gpu" else "false") == "true"
  config.iterations = 20 if size == "gpu" else 2
  config.repeats = 5 if size == "gpu" else 1
  config.attention = ml_collections.ConfigDict()
  config.attention.anchor = 16
  config.attention.window = 64
  config.attention.top_k = 128
  config.attention.index_bits = 4
  config.attention.candidates = 0          # 0: the spec's default, 4 * top_k
  config.attention.block_size = 64         # "blocks": top_blocks = top_k / block_size
  config.data = ml_collections.ConfigDict()
  config.data.needles = 4                  # per query head
  config.data.gain = 1.0                   # needle score: noise stds above the noise max
  config.data.offset = 3.0                 # shared offset of every key (std per channel)
  config.data.outliers = 4                 # outlier channels ...
  config.data.outlier_scale = 8.0          # ... with this std (the rest: 1)
  config.data.query_noise = 0.3
  config.plots = True
  config.resume = "match"
  return config
