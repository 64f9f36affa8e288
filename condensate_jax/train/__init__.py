"""Training under condensate attention (issue #19): an offline corpus, a functional model
with float32 master weights, AdamW with warmup + cosine, exact-resume checkpoints.

  from condensate_jax import train
  fn = train.Functional(lm, compute_dtype="bfloat16")
  step = train.make_train_step(loss_fn, train.make_optimizer(train.OptimConfig(...)))

The jobs built on it: `python -m experiments.run --config=distill.py` and
`--config=pretrain.py` (experiments/train/).
"""

from condensate_jax.train import checkpoint, corpus
from condensate_jax.train.functional import Functional, kl_rows, nll_rows
from condensate_jax.train.trainer import (OptimConfig, fit, make_optimizer,
                                          make_train_step, schedule)

__all__ = ["checkpoint", "corpus", "Functional", "kl_rows", "nll_rows", "OptimConfig",
           "fit", "make_optimizer", "make_train_step", "schedule"]
