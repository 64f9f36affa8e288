"""python -m experiments.run --config=pythia_parity.py

Runtime: ~20-40 min on 2 CPU cores, a few minutes on one H100 (estimate; not measured:
the hub is unreachable where this was written). Needs the Hugging Face hub (or
--config.model.path=DIR with config.json + safetensors); offline it stops at once with a
message naming smollm2_parity.py.
Expected result: the "covers all" row is bitwise 1.000 (else the run fails the gate);
the paper claims greedy parity at every point, we report where it holds and where it
breaks (greedy exact / first divergence / max |dlogit| per point).

Model: Pythia-160M (GPT-NeoX), `EleutherAI/pythia-160m` (float32). Grid: top_k (8, 32,
128) x window (16, 64, 256) x anchor (1, 4); 4 built-in prompts at lengths (512, 1920)
tokens; 128 greedy tokens. `:size=small` runs top_k (8, 32) x window (16, 64), anchor 1,
2 prompts of 256 tokens, 32 greedy tokens.
"""

from configs import common

_SIZES = {
    "full": dict(top_k=(8, 32, 128), window=(16, 64, 256), anchor=(1, 4),
                 lengths=(512, 1920), num_prompts=4, new_tokens=128),
    "small": dict(top_k=(8, 32), window=(16, 64), anchor=(1,), lengths=(256,),
                  num_prompts=2, new_tokens=32),
}


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": tuple(_SIZES)})
  return common.parity_config(name="pythia_parity", model="EleutherAI/pythia-160m", dtype="float32",
                              **_SIZES[args.get("size", "full")])


def sweep():
  return common.sweep_of(get_config())
