"""Distillation into a condensate budget (issue #19, item 2): can a short fine-tune teach a
model to keep its greedy tokens under condensate attention, and at what cost to its dense
quality?

Student: the model with `config.attention` (a CondensateSpec: any selection mode, pillar
layers optional) in every layer, float32 master weights, compute in config.model.dtype.
Teacher: the same weights, dense and frozen. Loss per training window of the offline
corpus (`condensate_jax.train.corpus`): loss.kl * KL(teacher || student) of the
next-token distributions at every position + loss.lm * the student's next-token NLL.
Gradients flow through attention over the selected set (the selection is a constant per
step). Evaluation at step 0 (the original weights: "before"), every eval.every steps and
at the end, on held-out prompts of the corpus, of the student under the spec against the
teacher: the parity runner's levels (greedy match, exact prompts, first divergence, KL
and top-1 agreement with both fed the teacher's tokens); of the student run dense against
the teacher (what the fine-tune cost the dense model); held-out perplexity of the student
dense and under the spec.

Outputs in the workdir: metrics.jsonl (a row per step and per evaluation, crash-safe),
checkpoints/ (resumes exactly), corpus.npz, summary.md (the evaluation table) and
distill.png (curves).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from condensate_jax.train import functional, trainer
from experiments import manifest as manifest_lib
from experiments.bench import tables
from experiments.errors import ConfigError
from experiments.train import common

PANELS = [("train:kl", "train KL(teacher || student)", True),
          ("eval:kl", "held-out KL(teacher || student), teacher's tokens", True),
          ("eval:greedy_match", "greedy match with the teacher", False),
          ("eval:first_divergence_mean", "mean first divergence (tokens)", False),
          ("eval:ppl_dense", "held-out perplexity, student dense", False),
          ("eval:dense_kl", "KL(teacher || student dense)", True)]


def _load(config):
  from condensate_jax.weights.registry import load_model  # pylint: disable=import-outside-toplevel
  return load_model(config.model.path or config.model.name, dtype="float32")


def make_loss(fn: functional.Functional, spec, weights):
  try:
    w_kl, w_lm = float(weights.kl), float(weights.lm)
  except (TypeError, ValueError):
    w_kl = w_lm = -1.0
  if not (w_kl >= 0 and w_lm >= 0 and w_kl + w_lm > 0):
    raise ConfigError(f"config.loss={dict(weights)!r}: expected numbers kl, lm >= 0, not "
                      "both 0.")

  def loss_fn(params, windows, teacher_params):
    tokens = windows[:, :-1]
    teacher = jax.lax.stop_gradient(functional.forward(fn.graphdef, teacher_params, fn.rest,
                                                       tokens, None))
    student = fn.logits(fn.compute(params), tokens, spec)
    kl = jnp.mean(functional.kl_rows(teacher, student))
    nll = jnp.mean(functional.nll_rows(student, windows[:, 1:]))
    return w_kl * kl + w_lm * nll, {"kl": kl, "nll": nll}

  return loss_fn


def make_eval(fn, spec, prompts, windows, config):
  teacher_lm = fn.as_lm(fn.params)
  cache = {}

  def eval_fn(step, params):
    student = fn.as_lm(params)
    cond, cache["tokens"] = common.parity(teacher_lm, None, student, spec, prompts,
                                          config.eval.new_tokens, cache.get("tokens"))
    dense, _ = common.parity(teacher_lm, None, student, None, prompts,
                             config.eval.new_tokens, cache["tokens"])
    nll_d = common.heldout_nll(fn, params, windows, None, config.eval.batch)
    nll_c = common.heldout_nll(fn, params, windows, spec, config.eval.batch)
    return {**cond, "dense_greedy_match": dense["greedy_match"], "dense_kl": dense["kl"],
            "nll_dense": nll_d, "nll_condensate": nll_c, "ppl_dense": math.exp(nll_d),
            "ppl_condensate": math.exp(nll_c)}

  return eval_fn


def table(rows) -> str:
  ev = sorted((r for r in rows if r.get("kind") == "eval"), key=lambda r: r["step"])
  body = [[str(r["step"]), f"{r['greedy_match']:.3f}", f"{r['greedy_exact']:.2f}",
           f"{r['first_divergence_min']} / {r['first_divergence_mean']:.1f}",
           tables.fmt_num(r["kl"]), f"{r['top1']:.3f}", f"{r['dense_greedy_match']:.3f}",
           tables.fmt_num(r["dense_kl"]), f"{r['ppl_dense']:.3f}",
           f"{r['ppl_condensate']:.3f}"] for r in ev]
  return tables.markdown(
      ["step", "greedy match", "exact prompts", "first div. min / mean", "KL vs teacher",
       "top-1", "dense: greedy match", "dense: KL vs teacher", "ppl dense",
       "ppl condensate"], body)


def run(config, workdir, progress: bool = True, stop_at=None):
  workdir, store = common.open_run(config, workdir)
  spec = common.make_spec(config.attention)
  optim = common.optim_config(config)
  lm = _load(config)
  common.check_training_config(config, lm.max_length)
  fn = functional.Functional(lm, config.model.dtype)
  data = common.load_corpus(config.data, lm, workdir)
  manifest_lib.write_manifest(workdir, config.to_dict(),
                              {"job": "distill", "corpus": data.describe()})
  prompts, windows = common.eval_data(data, config)
  optimizer = trainer.make_optimizer(optim)
  step_fn = trainer.make_train_step(make_loss(fn, spec, config.loss), optimizer,
                                    trainer.schedule(optim))
  before = len(store.rows)
  common.fit(config, workdir=workdir, params=fn.params, optimizer=optimizer, step_fn=step_fn,
              batch_fn=common.batch_fn(data.train, config.data, config.seed),
              steps=optim.steps, store=store, checkpoint_every=config.checkpoint_every,
              eval_every=config.eval.every,
              eval_fn=make_eval(fn, spec, prompts, windows, config),
              extra=(fn.compute(fn.params),), progress=progress, desc=config.name,
              metadata={"spec": repr(spec), "corpus": data.digest}, stop_at=stop_at)
  return common.finish(config, workdir, store, before, table=table, panels=PANELS,
                       plot_name="distill.png", spec=spec,
                       header=f"corpus: {data.describe()}\n\n")
