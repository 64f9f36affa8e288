"""Pre-training from scratch, dense and under condensate attention (issue #19, item 3):
does the mass an anchor + window + top-k set captures grow during training, and does
training *with* condensate attention change it?

A small model of `config.model` (family and sizes; a byte-level tokenizer, 258 ids) is
initialised once (seed) and trained from those same weights in each arm of config.arms:
  "dense"       trained with dense attention;
  "condensate"  trained under config.attention in every layer.
Each arm is tracked at step 0, every eval.every steps and at the end, always against the
same spec and held-out data of the offline corpus: held-out NLL dense and under the spec;
the set's captured mass (mean, worst), the true dropped mass and the certified eps of the
spec's attention (`metrics.attention_summary`); the greedy parity of the model under the
spec against the same weights dense (match, first divergence, KL at the new positions).

Outputs: metrics.jsonl (rows of both arms, field "arm"), <arm>/checkpoints/ (each arm
resumes exactly), corpus.npz, summary.md (the last evaluation of each arm, and the
trajectory) and pretrain.png (curves of both arms).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from condensate_jax import models
from condensate_jax.lm import LanguageModel
from condensate_jax.train import functional, trainer
from condensate_jax.weights.tiny import byte_tokenizer
from experiments import manifest as manifest_lib
from experiments.bench import tables
from experiments.errors import ConfigError
from experiments.train import common

ARMS = ("dense", "condensate")
PANELS = [("train:loss", "train NLL (the arm's own attention)", False),
          ("eval:nll_dense", "held-out NLL, dense", False),
          ("eval:nll_condensate", "held-out NLL under the spec", False),
          ("eval:captured_mass_mean", "captured mass of the set (mean)", False),
          ("eval:captured_mass_min", "captured mass (worst query)", True),
          ("eval:certified_eps_mean", "certified eps (mean)", True),
          ("eval:greedy_match", "greedy match, spec vs dense (same weights)", False),
          ("eval:kl", "KL(dense || spec) at the new tokens", True),
          ("eval:first_divergence_mean", "mean first divergence", False)]


def build_model(config) -> LanguageModel:
  family = config.model.family
  if family not in models.FAMILIES:
    raise ConfigError(f"config.model.family={family!r}: expected one of "
                      f"{sorted(models.FAMILIES)}.")
  tok = byte_tokenizer()
  try:
    cfg = models.CONFIG_CLASSES[family](vocab_size=tok.get_vocab_size(),
                                         **dict(config.model.arch))
  except (TypeError, ValueError) as err:
    raise ConfigError(f"config.model.arch={dict(config.model.arch)!r}: {err}") from None
  model = models.FAMILIES[family].Model(cfg, jnp.float32, rngs=nnx.Rngs(config.seed))
  return LanguageModel(model, cfg, tok, dtype="float32", name=f"pretrain-{family}")


def make_loss(fn: functional.Functional, attention):
  def loss_fn(params, windows):
    logits = fn.logits(fn.compute(params), windows[:, :-1], attention)
    nll = jnp.mean(functional.nll_rows(logits, windows[:, 1:]))
    return nll, {}
  return loss_fn


def make_eval(fn, spec, prompts, windows, config):
  def eval_fn(step, params):
    lm = fn.as_lm(params)
    par, _ = common.parity(lm, None, lm, spec, prompts, config.eval.new_tokens)
    stats = common.attention_stats(lm, windows[:, :-1], spec)
    nll_d = common.heldout_nll(fn, params, windows, None, config.eval.batch)
    nll_c = common.heldout_nll(fn, params, windows, spec, config.eval.batch)
    return {**par, **stats, "nll_dense": nll_d, "nll_condensate": nll_c,
            "ppl_dense": math.exp(nll_d), "ppl_condensate": math.exp(nll_c)}
  return eval_fn


def table(rows) -> str:
  ev = sorted((r for r in rows if r.get("kind") == "eval"),
              key=lambda r: (r["arm"], r["step"]))
  body = [[r["arm"], str(r["step"]), f"{r['nll_dense']:.3f}", f"{r['nll_condensate']:.3f}",
           f"{r['captured_mass_mean']:.3f}", tables.fmt_num(r["captured_mass_min"]),
           tables.fmt_num(r["certified_eps_mean"]), f"{r['greedy_match']:.3f}",
           f"{r['first_divergence_mean']:.1f}", tables.fmt_num(r["kl"])] for r in ev]
  return tables.markdown(
      ["arm", "step", "NLL dense", "NLL spec", "captured mean", "captured min",
       "eps mean", "greedy match", "first div. mean", "KL(dense||spec)"], body)


def run(config, workdir, progress: bool = True, stop_at=None):
  workdir, store = common.open_run(config, workdir)
  arms = tuple(config.arms)
  if not arms or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
    raise ConfigError(f"config.arms={arms!r}: expected distinct names from {ARMS}.")
  spec = common.make_spec(config.attention)
  optim = common.optim_config(config)
  lm = build_model(config)
  common.check_training_config(config, lm.max_length)
  data = common.load_corpus(config.data, lm, workdir)
  manifest_lib.write_manifest(workdir, config.to_dict(),
                              {"job": "pretrain", "corpus": data.describe()})
  prompts, windows = common.eval_data(data, config)
  fn = functional.Functional(lm, config.model.dtype)
  optimizer = trainer.make_optimizer(optim)
  before = len(store.rows)

  class ArmStore:
    """The store, with this arm's name in every row."""
    def __init__(self, arm):
      self.arm = arm

    def __contains__(self, key):
      return key in store

    def append(self, row):
      store.append({**row, "arm": self.arm})

  for arm in arms:
    attention = spec if arm == "condensate" else None
    step_fn = trainer.make_train_step(make_loss(fn, attention), optimizer,
                                      trainer.schedule(optim))
    common.fit(config, workdir=workdir / arm, params=fn.params, optimizer=optimizer,
                step_fn=step_fn, batch_fn=common.batch_fn(data.train, config.data, config.seed),
                steps=optim.steps, store=ArmStore(arm),
                checkpoint_every=config.checkpoint_every, eval_every=config.eval.every,
                eval_fn=make_eval(fn, spec, prompts, windows, config), key_prefix=f"{arm}|",
                progress=progress, desc=f"{config.name} {arm}",
                metadata={"spec": repr(spec), "corpus": data.digest, "arm": arm},
                stop_at=stop_at)
  return common.finish(config, workdir, store, before, table=table, panels=PANELS,
                       plot_name="pretrain.png", spec=spec,
                       header=f"model: {lm.config}\n\ncorpus: {data.describe()}\n\n")
