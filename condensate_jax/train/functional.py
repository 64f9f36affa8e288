"""A `LanguageModel` run functionally for training: float32 master parameters, compute in
the model's dtype or bfloat16, condensate attention (any selection mode) or dense.

  fn = Functional(lm, compute_dtype="bfloat16")   # lm loaded in float32 (the master)
  logits = fn.logits(fn.compute(params), tokens, spec)   # [B, T, V] float32
  eval_lm = fn.as_lm(params)                      # a LanguageModel of these weights

Gradients flow through the attention over the selected set; the selection itself (which
keys, a top-k of scores) is piecewise constant in the parameters and passes no gradient,
as for any top-k.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from condensate_jax import models
from condensate_jax.lm import LanguageModel
from condensate_jax.models import layers
from condensate_jax.spec import CondensateSpec


class Functional:
  """(graphdef, params, rest) of a LanguageModel, split once (module docstring)."""

  def __init__(self, lm: LanguageModel, compute_dtype=None):
    if not isinstance(lm, LanguageModel):
      raise ValueError(f"lm: expected a condensate_jax LanguageModel, got "
                       f"{type(lm).__name__}.")
    if lm.dtype != jnp.float32:
      raise ValueError(f"lm.dtype={lm.dtype.name}: training keeps float32 master weights; "
                       "load the model with dtype='float32' and pass compute_dtype.")
    self.lm = lm
    self.dtype = layers.check_dtype(compute_dtype or lm.dtype)
    model = nnx.merge(lm.graphdef, lm.state)
    master_graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    if self.dtype == jnp.float32:
      self.graphdef = master_graphdef
      self._dtypes = jax.tree.map(lambda x: x.dtype, self.params)
    else:
      family = models.FAMILIES[models.family_of_config(lm.config)]
      abstract = nnx.eval_shape(lambda: family.Model(lm.config, self.dtype,
                                                     rngs=nnx.Rngs(0)))
      self.graphdef, abs_params, _ = nnx.split(abstract, nnx.Param, ...)
      self._dtypes = jax.tree.map(lambda x: x.dtype, abs_params)

  def compute(self, params):
    """The master parameters cast to the compute dtypes (the model's own per leaf)."""
    return jax.tree.map(lambda p, dt: p.astype(dt), params, self._dtypes)

  def logits(self, compute_params, tokens, attention: Optional[CondensateSpec] = None,
             *, head: bool = True):
    """[B, T, V] float32 teacher-forced logits (or, head=False, final hidden states) of
    compute parameters (`compute`), through the XLA specification of `attention`."""
    return forward(self.graphdef, compute_params, self.rest, tokens, attention, head=head)

  def nll_sum(self, params, windows, attention: Optional[CondensateSpec] = None):
    """Summed next-token NLL of windows [B, T + 1] (jitted once per shape and spec)."""
    return _nll_sum(self.graphdef, self.compute(params), self.rest, windows, attention)

  def as_lm(self, params) -> LanguageModel:
    """A LanguageModel of these master parameters in the compute dtype (evaluation with
    everything `lm` offers: generate, logits with stats, hidden, head)."""
    out = copy.copy(self.lm)
    out.graphdef, out.state = nnx.split(nnx.merge(self.graphdef, self.compute(params),
                                                  self.rest))
    out.dtype = self.dtype
    return out


def forward(graphdef, compute_params, rest, tokens, attention, *, head=True):
  """`Functional.logits` on a split model (traceable)."""
  model = nnx.merge(graphdef, compute_params, rest)
  program = None if attention is None else attention.program_spec
  sizes = None if attention is None else attention.sizes
  out, _, _ = model(tokens, None, attention=program, implementation="xla",
                    return_stats=False, sizes=sizes, head=head)
  return out.astype(jnp.float32) if head else out


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _nll_sum(graphdef, compute_params, rest, windows, attention):
  logits = forward(graphdef, compute_params, rest, windows[:, :-1], attention)
  return jnp.sum(nll_rows(logits, windows[:, 1:]))


def kl_rows(teacher_logits, student_logits):
  """KL(teacher || student) of the next-token distributions, per position [...]
  (float32; exact zero where the distributions agree bitwise)."""
  lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)


def nll_rows(logits, targets):
  """-log p(target) per position [...] (float32)."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(lp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
