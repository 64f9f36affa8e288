"""python -m experiments.run --config=smoke.py --workdir=/tmp/smoke

Runtime: about 30 s on 2 CPU cores (mostly compilation). Expected result: the
"covers all" row is bitwise 1.000 with greedy exact 2/2 (the exactness gate passes);
the small points differ from dense (bitwise < 1) on the tiny random model, which has
no trained attention structure. Used by CI (tests/experiments/test_parity_run.py, test_cli.py).

Model: "tiny-random" (a seeded random llama-like model, byte-level tokenizer, 512
context, no download). Grid: top_k (4, 16) x window (8, 32), anchor 1, 2 prompts of 96
tokens, 16 greedy tokens.
"""

from configs import common


def get_config(arg=None):
  common.parse_arg(arg, {})
  return common.parity_config(name="smoke", model="tiny-random", top_k=(4, 16),
                              window=(8, 32), anchor=(1,), lengths=(96,), num_prompts=2,
                              new_tokens=16)


def sweep():
  return common.sweep_of(get_config())
