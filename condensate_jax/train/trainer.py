"""The training loop shared by the distillation and pre-training jobs (issue #19).

  opt = make_optimizer(OptimConfig(...))          # AdamW, warmup + cosine, clipping
  step = make_train_step(loss_fn, opt)            # jitted: (params, opt_state, batch) ->
                                                  #   (params, opt_state, metrics)
  fit(workdir=..., params=..., optimizer=opt, step_fn=step, batch_fn=..., steps=...)

The model runs functionally: the caller splits it once (`nnx.split(model, nnx.Param,
...)`) and `loss_fn(params, microbatch)` merges inside. Gradient accumulation: a batch is
[A, ...] microbatches; the step scans them, averages the gradients and applies one
update (the same update as one batch of A times the rows, to float32 summation order).
Master parameters and optimizer state stay float32; a bfloat16 run casts a copy of the
parameters inside loss_fn (`Functional.compute`), so gradients arrive in float32.

`fit` checkpoints (`checkpoint.save`, atomic) every `checkpoint_every` steps and at the
end, resumes from the newest checkpoint of the workdir, logs one row per step to
metrics.jsonl (`experiments.results.ResultsStore` rows: crash-safe) and calls `eval_fn`
at step 0, every `eval_every` steps and at the end. Batches are a function of the step
alone (`batch_fn(step)`), so a resumed run repeats an uninterrupted one bitwise.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from condensate_jax.train import checkpoint


def _check(name, value, kind, lo=None, hi=None, open_lo=False, open_hi=False):
  ok = not isinstance(value, bool) and isinstance(value, kind)
  if ok and lo is not None:
    ok = value > lo if open_lo else value >= lo
  if ok and hi is not None:
    ok = value < hi if open_hi else value <= hi
  if not ok:
    rng = "" if lo is None else (f" > {lo}" if open_lo else f" >= {lo}")
    rng += "" if hi is None else (f" and < {hi}" if open_hi else f" and <= {hi}")
    raise ValueError(f"{name}={value!r}: expected a {getattr(kind, '__name__', 'number')}"
                     f"{rng}.")
  return value


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW on a linear warmup then cosine decay to min_lr_ratio * learning_rate, after
  clipping the global gradient norm to clip_norm (0: no clipping). Weight decay applies to
  matrices only (ndim >= 2; not to norms, biases)."""
  learning_rate: float = 3e-4
  steps: int = 1000
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8

  def __post_init__(self):
    num = (int, float, np.floating)
    _check("optim.learning_rate", self.learning_rate, num, 0, open_lo=True)
    _check("optim.steps", self.steps, (int, np.integer), 1)
    _check("optim.warmup_steps", self.warmup_steps, (int, np.integer), 0, self.steps,
           open_hi=True)     # the cosine decay needs steps after the warmup
    _check("optim.min_lr_ratio", self.min_lr_ratio, num, 0, 1)
    _check("optim.weight_decay", self.weight_decay, num, 0)
    _check("optim.clip_norm", self.clip_norm, num, 0)
    _check("optim.b1", self.b1, num, 0, 1, open_hi=True)   # 1: the moments never move
    _check("optim.b2", self.b2, num, 0, 1, open_hi=True)
    _check("optim.eps", self.eps, num, 0, open_lo=True)


def schedule(cfg: OptimConfig):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if cfg.warmup_steps else cfg.learning_rate,
      peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.steps, end_value=cfg.learning_rate * cfg.min_lr_ratio)


_NO_DECAY = ("bias", "scale", "norm")


def decay_mask(params):
  """True for the parameters weight decay applies to: matrices (ndim >= 2) whose path
  names no bias, norm or scale (GPT-2's [N, H] attention biases are matrices by rank)."""
  def decays(path, x):
    name = jax.tree_util.keystr(path).lower()
    return jnp.ndim(x) >= 2 and not any(w in name for w in _NO_DECAY)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    lr_schedule: Optional[Callable] = None) -> Callable:
  """loss_fn(params, microbatch, *extra) -> (scalar loss, dict of scalar metrics).
  Returns a jitted step(params, opt_state, batch, *extra) -> (params, opt_state,
  metrics); extra: arrays the loss reads but does not train (a frozen teacher's
  parameters: arguments, not constants baked into the program); batch a pytree
  whose leaves lead with the microbatch axis A (module docstring). metrics: loss_fn's
  (averaged over microbatches), "grad_norm" (before clipping) and "lr" (when a schedule
  is given)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  @jax.jit
  def step(params, opt_state, batch, *extra):
    num = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, mb):
      (loss, aux), grads = grad_fn(params, mb, *extra)
      acc_g, acc_m = carry
      acc_g = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_g, grads)
      acc_m = jax.tree.map(lambda a, m: a + m, acc_m, {"loss": loss, **aux})
      return (acc_g, acc_m), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], batch),
                                           *extra))
    (_, aux0), _ = first
    zeros_m = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32),
                           {"loss": first[0][0], **aux0})
    (grads, metrics), _ = jax.lax.scan(micro, (zeros_g, zeros_m), batch)
    grads = jax.tree.map(lambda g: g / num, grads)
    metrics = jax.tree.map(lambda m: m / num, metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if lr_schedule is not None:
      metrics["lr"] = jnp.asarray(lr_schedule(_count(opt_state)), jnp.float32)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, metrics

  return step


def _count(opt_state):
  """The update count held in an optax state (the first ScaleByScheduleState /
  ScaleByAdamState count found)."""
  kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
  for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
    if isinstance(leaf, kinds):
      return leaf.count
  return jnp.zeros((), jnp.int32)


class CheckpointMismatch(ValueError):
  """The workdir's checkpoint was written by another setting (or is past the steps)."""


def fit(*, workdir, params, optimizer, step_fn: Callable, batch_fn: Callable[[int], Any],
        steps: int, store, checkpoint_every: int, extra: tuple = (), eval_every: int = 0,
        eval_fn: Optional[Callable[[int, Any], dict]] = None, key_prefix: str = "",
        metadata: Optional[dict] = None, progress: bool = True, desc: str = "train",
        stop_at: Optional[int] = None):
  """Trains params to `steps` updates (module docstring). store: a ResultsStore (rows
  keyed f"{key_prefix}train|{step}" and f"{key_prefix}eval|{step}"); eval_fn(step,
  params) -> dict of numbers. stop_at: stop after that many updates (an interruption, for
  tests); a later call resumes. extra: step_fn's frozen arguments. Returns (params, the last step reached)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  _check("steps", steps, (int, np.integer), 1)
  _check("checkpoint_every", checkpoint_every, (int, np.integer), 1)
  _check("eval_every", eval_every, (int, np.integer), 0)
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  opt_state = optimizer.init(params)
  start = 0
  found = checkpoint.latest(ckpt_dir)
  if found is not None:
    (params, opt_state), meta = checkpoint.restore(found[1], (params, opt_state))
    start = found[0]
    if metadata:
      differ = {k: (meta.get(k), v) for k, v in metadata.items()
                if k in meta and json_safe(meta[k]) != json_safe(v)}
      if differ:
        raise CheckpointMismatch(f"checkpoint {found[1]} was written by another setting: "
                         f"{differ}. Use a fresh --workdir.")

  def evaluate(step):
    key = f"{key_prefix}eval|{step}"
    if eval_fn is not None and key not in store:
      store.append({"key": key, "kind": "eval", "step": step, **eval_fn(step, params)})

  if start > steps:
    raise CheckpointMismatch(f"checkpoint {found[1]} is at step {start}, past "
                             f"steps={steps}; use "
                     "a fresh --workdir (or the same steps).")
  if start == 0 or (eval_every and start % eval_every == 0):
    evaluate(start)     # skipped when its row exists
  end = steps if stop_at is None else min(steps, stop_at)
  with tqdm(total=steps, initial=start, disable=not progress, desc=desc,
            unit="step") as bar:
    for step in range(start + 1, end + 1):
      batch = batch_fn(step)
      t0 = time.perf_counter()
      params, opt_state, metrics = step_fn(params, opt_state, batch, *extra)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["step_s"] = time.perf_counter() - t0
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(
            f"loss became {metrics['loss']} at step {step} (last checkpoint kept: "
            f"{checkpoint.latest(ckpt_dir)}); lower optim.learning_rate or raise "
            "optim.warmup_steps, and use a fresh --workdir.")
      store.append({"key": f"{key_prefix}train|{step}", "kind": "train", "step": step,
                    **metrics})
      bar.update()
      bar.set_postfix(loss=f"{metrics['loss']:.4g}")
      # evaluate before saving: a run stopped in between redoes the steps since the last
      # checkpoint, this evaluation included
      if eval_every and (step % eval_every == 0 or step == steps):
        evaluate(step)
      if step % checkpoint_every == 0 or step == steps:
        checkpoint.save(ckpt_dir, step, (params, opt_state), metadata=metadata)
  if end == steps and eval_fn is not None:
    evaluate(steps)
  return params, end


def json_safe(value):
  import json  # pylint: disable=import-outside-toplevel
  return json.loads(json.dumps(value, sort_keys=True, default=str))
