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


def get_config(arg=None):
  return common.hub_parity_config(arg, name="pythia_parity", model="EleutherAI/pythia-160m",
                                  full_lengths=(512, 1920))


def sweep():
  return common.sweep_of(get_config())
