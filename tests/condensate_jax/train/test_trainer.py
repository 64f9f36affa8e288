"""The training loop: a learnable task is learnt, gradients through condensate attention
match finite differences, accumulation is one big batch, a resumed run repeats an
uninterrupted one bitwise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import condensate_jax as cj
from condensate_jax import models
from condensate_jax.lm import LanguageModel
from condensate_jax.train import functional, trainer
from condensate_jax.weights.tiny import byte_tokenizer, tiny_random
from experiments.results import ResultsStore

SPEC = cj.CondensateSpec(anchor=2, window=4, top_k=4)


def _gpt2(seed=0, width=32):
  cfg = models.GPT2Config(vocab_size=258, width=width, num_layers=2, num_heads=2,
                          mlp_width=4 * width, max_length=128)
  model = models.FAMILIES["gpt2"].Model(cfg, jnp.float32, rngs=nnx.Rngs(seed))
  return LanguageModel(model, cfg, byte_tokenizer(), dtype="float32")


def _nll_loss(fn, attention):
  def loss_fn(params, windows):
    logits = fn.logits(fn.compute(params), windows[:, :-1], attention)
    return jnp.mean(functional.nll_rows(logits, windows[:, 1:])), {}
  return loss_fn


def _copy_task(step, batch=8, length=40, seed=0, period=3, vocab=20):
  """Each window repeats a random 3-token motif of 20 ids: after one period the next
  token is the one 3 back, read by attention; without it the best is log(20) = 3.0."""
  rng = np.random.default_rng([seed, step])
  motif = rng.integers(0, vocab, (batch, period))
  return jnp.asarray(np.tile(motif, (1, length // period + 1))[None, :, :length + 1],
                     jnp.int32)


def test_a_learnable_task_is_learnt_under_condensate_attention():
  fn = functional.Functional(_gpt2())
  cfg = trainer.OptimConfig(learning_rate=1e-2, steps=80, warmup_steps=5, weight_decay=0.0)
  opt = trainer.make_optimizer(cfg)
  step = trainer.make_train_step(_nll_loss(fn, SPEC), opt, trainer.schedule(cfg))
  params, state = fn.params, opt.init(fn.params)
  losses = []
  for s in range(1, cfg.steps + 1):
    params, state, m = step(params, state, _copy_task(s))
    losses.append(float(m["loss"]))
  assert losses[0] > 4.5                      # ~log(258) at initialisation
  assert np.mean(losses[-5:]) < 0.5 * np.log(20), losses[::10]   # it reads the context
  # the last update used the schedule at count steps - 1, near its end value
  assert float(m["lr"]) == pytest.approx(float(trainer.schedule(cfg)(cfg.steps - 1)), rel=1e-6)
  assert float(m["lr"]) < 1.01 * cfg.learning_rate * cfg.min_lr_ratio


@pytest.mark.parametrize("spec", [
    cj.CondensateSpec(anchor=2, window=4, top_k=40),
    cj.CondensateSpec(anchor=2, window=4, selection="blocks", block_size=8, top_blocks=8),
    cj.CondensateSpec(anchor=2, window=4, top_k=40, selection="indexed", candidates=40),
    cj.CondensateSpec(anchor=2, window=4, top_k=40, selection="bounded", block_size=8),
], ids=["exact", "blocks", "indexed", "bounded"])
def test_gradients_with_a_covering_set_are_dense_gradients(spec):
  """Where every set covers every visible key, each mode's backward pass (custom VJPs
  over the selection loops included) must give dense attention's gradient for every
  parameter: a missing or zeroed piece of it fails here, which no finite difference
  along the gradient itself can see."""
  fn = functional.Functional(tiny_random("llamalike", seed=3))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 41)), jnp.int32)
  grad = lambda attention: jax.grad(lambda p: jnp.mean(functional.nll_rows(
      fn.logits(p, tokens[:, :-1], attention), tokens[:, 1:])))(fn.params)
  dense, cond = grad(None), grad(spec)
  for (path, d), c in zip(jax.tree_util.tree_flatten_with_path(dense)[0],
                          jax.tree.leaves(cond)):
    scale = float(jnp.max(jnp.abs(d)))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=0, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("spec", [
    SPEC,
    cj.CondensateSpec(anchor=2, window=4, selection="blocks", block_size=8, top_blocks=2),
    cj.CondensateSpec(anchor=2, window=4, top_k=4, selection="indexed"),
    cj.CondensateSpec(anchor=2, window=4, top_k=4, selection="bounded", block_size=8),
    cj.CondensateSpec(anchor=2, window=4, selection="certified", block_size=8,
                      epsilon=0.05),
], ids=["exact", "blocks", "indexed", "bounded", "certified"])
def test_gradients_through_condensate_attention_match_finite_differences(spec):
  fn = functional.Functional(tiny_random("llamalike", seed=3))
  # sharper queries: score gaps far above the perturbation's, so that no key enters or
  # leaves a set between params -/+ h (the loss is piecewise smooth: the selection flips
  # where two scores cross)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 8 if "q_dnh" in jax.tree_util.keystr(path) else x, fn.params)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 41)), jnp.int32)
  teacher = jax.lax.stop_gradient(fn.logits(fn.params, tokens[:, :-1], None))

  def loss(params):
    student = fn.logits(params, tokens[:, :-1], spec)
    return jnp.mean(functional.kl_rows(teacher, student)) + jnp.mean(
        functional.nll_rows(student, tokens[:, 1:]))

  grads = jax.grad(loss)(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # Direction: half along the gradient, half random. A random direction alone has a
  # derivative ~|g| / sqrt(#params), which float32 rounding of the loss (~1e-6) swamps
  # at any h small enough to keep every set fixed; along the gradient it is ~|g| ~ 10.
  rng = np.random.default_rng(1)
  gnorm = np.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
  direction = jax.tree.map(
      lambda g: g / gnorm + jnp.asarray(rng.normal(size=g.shape), jnp.float32)
      / np.sqrt(sum(x.size for x in jax.tree.leaves(grads))), grads)
  norm = np.sqrt(sum(float(jnp.sum(d * d)) for d in jax.tree.leaves(direction)))
  direction = jax.tree.map(lambda d: d / norm, direction)
  analytic = sum(float(jnp.sum(g * d)) for g, d in
                 zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert abs(analytic) > 1e-1
  # The loss is piecewise smooth (a set changes where two scores cross). The largest h
  # whose one-sided differences agree has no crossing within h on either side.
  base = float(loss(params))
  for h in (1e-4, 3e-5, 1e-5):
    up, down = (float(loss(jax.tree.map(lambda p, d: p + s * h * d, params, direction)))
                for s in (1, -1))
    forward, backward = (up - base) / h, (base - down) / h
    if forward == pytest.approx(backward, rel=1e-2):
      break
  assert forward == pytest.approx(backward, rel=1e-2), "a set changes within 1e-5"
  numeric = (up - down) / (2 * h)
  assert numeric == pytest.approx(analytic, rel=1e-2)


def test_accumulated_microbatches_are_one_batch():
  fn = functional.Functional(_gpt2())
  opt = optax.sgd(0.1)    # a plain step: the parameters show the gradients' agreement
  step = trainer.make_train_step(_nll_loss(fn, SPEC), opt)
  w = _copy_task(1, batch=4)[0]
  p1, _, m1 = step(fn.params, opt.init(fn.params), w.reshape(2, 2, -1))
  p2, _, m2 = step(fn.params, opt.init(fn.params), w[None])
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _fit(workdir, stop_at=None, eval_fn=None):
  fn = functional.Functional(_gpt2())
  cfg = trainer.OptimConfig(learning_rate=1e-3, steps=6, warmup_steps=2)
  opt = trainer.make_optimizer(cfg)
  step = trainer.make_train_step(_nll_loss(fn, SPEC), opt, trainer.schedule(cfg))
  workdir.mkdir(parents=True, exist_ok=True)
  store = ResultsStore(workdir / "metrics.jsonl")
  params, reached = trainer.fit(workdir=workdir, params=fn.params, optimizer=opt,
                                step_fn=step, batch_fn=_copy_task, steps=cfg.steps,
                                store=store, checkpoint_every=3, eval_every=3,
                                eval_fn=eval_fn, progress=False, stop_at=stop_at,
                                metadata={"spec": repr(SPEC)})
  return params, reached, ResultsStore(workdir / "metrics.jsonl")


def test_a_resumed_run_repeats_an_uninterrupted_one_bitwise(tmp_path):
  evals = []
  eval_fn = lambda step, params: evals.append(step) or {"norm": float(
      sum(jnp.sum(p * p) for p in jax.tree.leaves(params)))}
  whole, reached, store_a = _fit(tmp_path / "a", eval_fn=eval_fn)
  assert reached == 6 and evals == [0, 3, 6]
  # interrupted after step 4 (checkpoint at 3): the rerun restarts from step 3
  _, reached, _ = _fit(tmp_path / "b", stop_at=4, eval_fn=eval_fn)
  assert reached == 4
  resumed, reached, store_b = _fit(tmp_path / "b", eval_fn=eval_fn)
  assert reached == 6
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for s in range(1, 7):
    assert store_a.rows[f"train|{s}"]["loss"] == store_b.rows[f"train|{s}"]["loss"]
  assert store_a.rows["eval|6"]["norm"] == store_b.rows["eval|6"]["norm"]
  # a finished run does nothing more
  calls = len(evals)
  _fit(tmp_path / "a", eval_fn=eval_fn)
  assert len(evals) == calls


def test_an_evaluation_interrupted_before_its_checkpoint_is_redone(tmp_path):
  """A run stopped inside the evaluation of step 3 (due before that step's checkpoint)
  redoes step 3 and its evaluation on resume: no evaluation row is lost."""
  crash = {"armed": True}

  def eval_fn(step, params):
    if step == 3 and crash["armed"]:
      crash["armed"] = False
      raise KeyboardInterrupt
    return {"step_seen": step}

  with pytest.raises(KeyboardInterrupt):
    _fit(tmp_path, eval_fn=eval_fn)
  _, reached, store = _fit(tmp_path, eval_fn=eval_fn)
  assert reached == 6
  assert [store.rows[f"eval|{s}"]["step_seen"] for s in (0, 3, 6)] == [0, 3, 6]


def test_weight_decay_spares_biases_and_norms():
  fn = functional.Functional(_gpt2())
  mask = {jax.tree_util.keystr(p): m for p, m in
          jax.tree_util.tree_flatten_with_path(trainer.decay_mask(fn.params))[0]}
  assert mask["['layers'][0]['q_dnh'].value"] and mask["['embed_vd'].value"]
  assert not mask["['layers'][0]['q_bias_nh'].value"]            # 2-D, still a bias
  assert not mask["['layers'][0]['ln_1']['scale_d'].value"]


def test_a_checkpoint_of_another_setting_is_refused(tmp_path):
  _fit(tmp_path, stop_at=3)
  fn = functional.Functional(_gpt2())
  opt = trainer.make_optimizer(trainer.OptimConfig(steps=6, warmup_steps=2))
  with pytest.raises(ValueError, match="written by another setting"):
    trainer.fit(workdir=tmp_path, params=fn.params, optimizer=opt,
                step_fn=trainer.make_train_step(_nll_loss(fn, None), opt),
                batch_fn=_copy_task, steps=6, store=ResultsStore(tmp_path / "m.jsonl"),
                checkpoint_every=3, progress=False, metadata={"spec": "dense"})


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=0.0), "optim.learning_rate"),
    (dict(steps=0), "optim.steps"),
    (dict(steps=10, warmup_steps=11), "optim.warmup_steps"),
    (dict(b2=1.5), "optim.b2"),
    (dict(b1=1.0), "optim.b1"),
    (dict(steps=10, warmup_steps=10), "optim.warmup_steps"),
])
def test_bad_optimizer_settings_name_the_key(kwargs, match):
  with pytest.raises(ValueError, match=match):
    trainer.OptimConfig(**kwargs)


def test_functional_needs_float32_master_weights_and_casts_for_compute():
  with pytest.raises(ValueError, match="float32 master"):
    functional.Functional(tiny_random("llamalike", dtype="bfloat16"))
  fn = functional.Functional(tiny_random("llamalike"), compute_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(fn.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(fn.compute(fn.params))} == {jnp.dtype(jnp.bfloat16)}
  lm = fn.as_lm(fn.params)
  ref = tiny_random("llamalike", dtype="bfloat16")
  tokens = np.arange(24, dtype=np.int32)[None]
  np.testing.assert_array_equal(np.asarray(lm.logits(tokens, SPEC)),
                                np.asarray(ref.logits(tokens, SPEC)))
