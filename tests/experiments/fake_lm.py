"""A small random language model for the experiment tests, independent of the model zoo.

It follows the LanguageModel contract the runner uses (encode/decode, max_length,
num_layers, logits / hidden(..., attention, implementation, return_stats), head,
hidden_parity, generate(...)) and calls
the real `cj.dense_attention` / `cj.condensate_attention` in each layer, so parity numbers
it produces are real measurements of the attention library on random weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


@functools.partial(jax.jit, static_argnames=("spec", "implementation", "return_stats",
                                             "heads", "head"))
def _forward(params, tokens, *, spec, implementation, return_stats, heads, head=True):
  hq, hkv, d = heads
  b, t = tokens.shape
  x = params["embed"][tokens] + params["pos"][:t]
  stats = []
  for layer, p in enumerate(params["layers"]):
    h = _rms(x)
    q = (h @ p["wq"]).reshape(b, t, hq, d)
    k = (h @ p["wk"]).reshape(b, t, hkv, d)
    v = (h @ p["wv"]).reshape(b, t, hkv, d)
    if spec is None:
      o = cj.dense_attention(q, k, v, causal=True)
    else:
      o, st = cj.condensate_attention(q, k, v, spec, causal=True,
                                      implementation=implementation, return_stats=True)
      stats.append(st)
    x = x + o.reshape(b, t, hq * d) @ p["wo"]
    x = x + jax.nn.gelu(_rms(x) @ p["w1"]) @ p["w2"]
  logits = _head(params, x) if head else x
  if return_stats:
    return logits, jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
  return logits


@jax.jit
def _head(params, x):
  return (_rms(x) @ params["embed"].T).astype(jnp.float32)


class FakeLM:
  """Byte-level tokenizer (vocab 256), 2 layers, GQA 4/2 heads of 8, context 512."""

  def __init__(self, seed: int = 0, max_length: int = 512, num_layers: int = 2):
    rng = np.random.default_rng(seed)
    width, self._heads = 32, (4, 2, 8)
    hq, hkv, d = self._heads

    def w(*shape, scale=1.0):
      return jnp.asarray(rng.normal(0, scale / np.sqrt(shape[0]), shape), jnp.float32)

    self.params = {
        "embed": w(256, width, scale=np.sqrt(256)),
        "pos": w(max_length, width, scale=np.sqrt(max_length) * 0.3),
        # Large q/k weights give peaked attention, so small sets capture most mass.
        "layers": [dict(wq=w(width, hq * d, scale=3.0), wk=w(width, hkv * d, scale=3.0),
                        wv=w(width, hkv * d), wo=w(hq * d, width), w1=w(width, 64),
                        w2=w(64, width)) for _ in range(num_layers)],
    }
    self.max_length = max_length
    self.num_layers = num_layers
    self.dtype = jnp.float32
    self.config = {"name": "fake"}
    self.calls = {"logits": 0, "generate": 0}

  def encode(self, text):
    return list(text.encode("utf-8"))

  def decode(self, ids):
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

  def _teacher_forced(self, tokens, attention, implementation, return_stats, head):
    self.calls["logits"] += 1
    if return_stats and attention is None:
      raise ValueError("return_stats=True needs a condensate attention spec here.")
    return _forward(self.params, jnp.asarray(tokens, jnp.int32), spec=attention,
                    implementation=implementation, return_stats=return_stats,
                    heads=self._heads, head=head)

  def logits(self, tokens, attention=None, implementation="xla", return_stats=False):
    return self._teacher_forced(tokens, attention, implementation, return_stats, True)

  def hidden(self, tokens, attention=None, implementation="xla", return_stats=False):
    return self._teacher_forced(tokens, attention, implementation, return_stats, False)

  def head(self, hidden):
    return _head(self.params, hidden)

  def hidden_parity(self, dense, cond, chunk=256):
    del chunk
    return cj.metrics.logit_parity_on_device(self.head(dense), self.head(cond))

  def generate(self, tokens, max_new_tokens, attention=None, implementation="xla"):
    """Greedy; recomputes the padded sequence each step (one compile per spec)."""
    self.calls["generate"] += 1
    tokens = np.asarray(tokens, np.int32)
    b, t = tokens.shape
    seq = np.zeros((b, t + max_new_tokens), np.int32)
    seq[:, :t] = tokens
    for step in range(max_new_tokens):
      logits = _forward(self.params, jnp.asarray(seq), spec=attention,
                        implementation=implementation, return_stats=False,
                        heads=self._heads)
      seq[:, t + step] = np.asarray(jnp.argmax(logits[:, t + step - 1], axis=-1))
    return jnp.asarray(seq[:, t:])


def loader(lm=None):
  """A load_model replacement returning `lm` (a new FakeLM by default)."""
  model = lm if lm is not None else FakeLM()

  def load_model(name, dtype="float32"):
    del name, dtype
    return model
  return load_model
