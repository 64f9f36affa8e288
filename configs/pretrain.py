"""python -m experiments.run --config=pretrain.py[:size=smoke|gpu]

Pre-train a small GPT-2-like model from scratch twice from the same initial weights,
dense and under condensate attention, and watch the condensate form (issue #19): held-out
NLL dense and under the spec, the set's captured mass and certified eps, and the greedy
parity of each model under the spec against itself dense, over training. Job:
experiments/train/pretrain.py.

Sizes:
  gpu    GPT-2 family, width 256, 4 layers, 4 heads (head dim 64), MLP 1024, byte-level
         tokens (3.5M parameters), 512-token windows, batch 32, 2000 steps per arm,
         spec anchor 4 + window 64 + top-k 32 (one H200: ~2 min per arm);
  smoke  width 32, 2 layers, 96-token windows, 12 steps per arm on a CPU (seconds): the
         loss falls; a rerun resumes each arm from its checkpoint.
Expected (measured on an H200, README "Learned condensate"; 4.3 min for both arms): the
set's captured mass 0.61 -> 0.99 within 500 steps in both arms, certified eps 0.49 ->
~0.055; greedy parity under the spec 52-72% after that; the condensate arm's NLL under its
own spec (1.40) no better than the dense arm's under it (1.37).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": ("gpu", "smoke")})
  size = args.get("size", "gpu")
  smoke = size == "smoke"
  c = ml_collections.ConfigDict()
  c.name = f"pretrain-{size}"
  c.job = "pretrain"
  c.seed = 0
  c.model = dict(family="gpt2", dtype="float32" if smoke else "bfloat16",
                 arch=dict(width=32 if smoke else 256, num_layers=2 if smoke else 4,
                           num_heads=2 if smoke else 4, mlp_width=128 if smoke else 1024,
                           max_length=128 if smoke else 1024))
  c.arms = ("dense", "condensate")
  c.attention = (dict(anchor=2, window=8, top_k=8) if smoke
                 else dict(anchor=4, window=64, top_k=32))
  c.data = common.training_data(smoke, seq_len=96 if smoke else 512,
                                batch=4 if smoke else 32)
  c.optim = common.adamw(learning_rate=3e-3 if smoke else 1e-3,
                         steps=12 if smoke else 2000, warmup_steps=2 if smoke else 100,
                         weight_decay=0.1)
  c.eval = dict(every=6 if smoke else 250, prompts=2 if smoke else 8,
                prompt_len=48 if smoke else 384, new_tokens=6 if smoke else 32,
                windows=2 if smoke else 8, batch=2 if smoke else 8)
  c.checkpoint_every = 6 if smoke else 250
  c.plots = True
  return c
