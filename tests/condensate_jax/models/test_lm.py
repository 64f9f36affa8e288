"""LanguageModel API: tokenizer round trip, cached decode vs teacher forcing, validation."""

from __future__ import annotations

import numpy as np
import pytest

from condensate_jax import CondensateSpec
from condensate_jax.weights.registry import load_model


@pytest.fixture(scope="module")
def lm():
  return load_model("tiny-random")


def test_contract(lm):
  assert lm.max_length == 512 and lm.num_layers == 2 and lm.dtype.name == "float32"
  text = "Grüße, world! 🙂"
  ids = lm.encode(text)
  assert lm.decode(ids) == text and all(0 <= i < 256 for i in ids)
  assert lm.tokenizer.get_vocab_size() == lm.config.vocab_size


def test_generate_is_greedy_argmax_of_teacher_forced_logits(lm):
  """The cached decode path against one teacher-forced pass over prompt + output: every
  generated token is the argmax of the full-sequence logits at the previous position."""
  tokens = np.random.default_rng(1).integers(0, 256, (2, 7)).astype(np.int32)
  got = np.asarray(lm.generate(tokens, 10))
  assert got.shape == (2, 10) and got.dtype == np.int32
  seq = np.concatenate([tokens, got], axis=1)
  logits = np.asarray(lm.logits(seq))
  np.testing.assert_array_equal(logits[:, 6:16].argmax(-1), got)
  top2 = np.sort(logits[:, 6:16], axis=-1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 1e-4  # no near-tie could hide a mismatch
  np.testing.assert_array_equal(np.asarray(lm.generate(tokens, 1)), got[:, :1])


def test_bfloat16(lm):
  lm16 = load_model("tiny-random", dtype="bfloat16")
  tokens = np.arange(30, dtype=np.int32)[None]
  a, b = np.asarray(lm.logits(tokens)), np.asarray(lm16.logits(tokens))
  assert b.dtype == np.float32 and lm16.dtype.name == "bfloat16"
  assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
  assert lm16.generate(tokens, 3).shape == (1, 3)


@pytest.mark.parametrize("call,match", [
    (lambda lm: lm.logits(np.zeros((3,), np.int32)), r"tokens.shape=\(3,\)"),
    (lambda lm: lm.logits(np.zeros((1, 2), np.float32)), "tokens.dtype=float32"),
    (lambda lm: lm.logits(np.full((1, 2), 258)), r"ids in \[258, 258\]"),
    (lambda lm: lm.logits(np.zeros((1, 513), np.int32)), "max_length=512"),
    (lambda lm: lm.generate(np.zeros((1, 510), np.int32), 3), "max_length=512"),
    (lambda lm: lm.generate(np.zeros((1, 2), np.int32), 0), "max_new_tokens=0"),
    (lambda lm: lm.logits(np.zeros((1, 2), np.int32), attention="dense"),
     "attention='dense'"),
    (lambda lm: lm.logits(np.zeros((1, 2), np.int32), return_stats=1), "return_stats=1"),
    (lambda lm: lm.logits(np.zeros((1, 2), np.int32), attention=CondensateSpec(),
                          implementation="cuda"), "implementation='cuda'"),
    (lambda lm: lm.encode(b"bytes"), "expected a str"),
])
def test_validation(lm, call, match):
  with pytest.raises(ValueError, match=match):
    call(lm)
