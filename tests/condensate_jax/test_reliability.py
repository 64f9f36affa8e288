"""Regression tests for issue #15's bad-input repros (each failed before its fix): sizes
beyond int32, default positions before the first key, dense layers beyond the model,
implementation names checked on dense runs, bare errors of the LanguageModel helpers
(ragged token batches, caches of another batch size or without room)."""

import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj

SP = cj.CondensateSpec(anchor=1, window=4, top_k=2)


def _qkv(t=16, s=16):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(1, t, 4, 8)), jnp.float32),
          jnp.asarray(rng.normal(size=(1, s, 2, 8)), jnp.float32),
          jnp.asarray(rng.normal(size=(1, s, 2, 8)), jnp.float32))


@pytest.mark.parametrize("field", ["anchor", "window", "top_k", "block_size",
                                   "top_blocks"])
def test_spec_ints_beyond_int32_are_refused(field):
  with pytest.raises(ValueError, match=rf"CondensateSpec.{field}=1099511627776: expected "
                                       r"an int in \[\d+, 2147483647\]"):
    cj.CondensateSpec(**{field: 2**40})


def test_sliding_window_and_block_size_beyond_int32_are_refused():
  q, k, v = _qkv()
  for fn in (cj.dense_attention, lambda *a, **kw: cj.condensate_attention(*a, SP, **kw)):
    with pytest.raises(ValueError, match=r"sliding_window=1099511627776"):
      fn(q, k, v, sliding_window=2**40)
  with pytest.raises(ValueError, match=r"block_size=1099511627776"):
    cj.build_summaries(k, 2**40)
  with pytest.raises(ValueError, match=r"padded length exceeds"):
    cj.empty_summaries(1, 2**31 - 2, 2, 8, 2**30 + 1)


@pytest.mark.parametrize("kw", [dict(), dict(kv_lengths=[4])])
def test_more_queries_than_keys_with_default_positions(kw):
  q, k, v = _qkv(t=8, s=16 if kw else 4)
  for fn in (cj.dense_attention, lambda *a, **k_: cj.condensate_attention(*a, SP, **k_)):
    with pytest.raises(ValueError, match="default positions"):
      fn(q, k, v, **kw)
  # explicit positions still work (and a longer row is fine with default positions)
  out = cj.dense_attention(q, k, v, q_positions=jnp.zeros((1, 8), jnp.int32), **kw)
  assert np.isfinite(np.asarray(out)).all()


@pytest.fixture(scope="module")
def lm():
  return cj.load_model("tiny-random")


def test_dense_layers_beyond_the_model_are_refused(lm):
  spec = SP.replace(dense_layers=(99,))
  with pytest.raises(ValueError, match=r"dense_layers=\(99,\).*the model has 2 layers"):
    lm.logits([[1, 2, 3]], attention=spec)
  with pytest.raises(ValueError, match=r"dense_layers"):
    lm.generate([[1, 2, 3]], 2, attention=spec)


def test_implementation_is_checked_without_a_spec(lm):
  with pytest.raises(ValueError, match="implementation='foo'"):
    lm.logits([[1, 2, 3]], implementation="foo")
  with pytest.raises(ValueError, match="implementation='foo'"):
    lm.generate([[1, 2, 3]], 2, implementation="foo")
  with pytest.raises(ValueError, match="implementation='xla_masked' with spec.selection"):
    lm.logits([[1, 2, 3]], attention=SP.replace(selection="blocks", block_size=4),
              implementation="xla_masked")


def test_language_model_helpers_give_clear_errors(lm):
  with pytest.raises(ValueError, match=r"ids: expected integer token ids"):
    lm.decode([-1])
  with pytest.raises(ValueError, match=r"ids: expected integer token ids"):
    lm.decode([lm.vocab_size])
  assert lm.decode([]) == ""
  with pytest.raises(ValueError, match=r"batch=-1: expected an int >= 1"):
    lm.init_cache(-1, 4)
  with pytest.raises(ValueError, match=r"max_len=0"):
    lm.init_cache(1, 0)
  with pytest.raises(ValueError, match=r"name_or_path='': expected a model name"):
    cj.load_model("")


def test_ragged_tokens_and_mismatched_caches_are_refused(lm):
  with pytest.raises(ValueError, match=r"tokens: rows of lengths \[2, 1\]: expected a "
                                       r"rectangular \[B, T\] batch"):
    lm.logits([[1, 2], [3]])
  with pytest.raises(ValueError, match=r"rows of lengths"):
    lm.generate([[1, 2], [3]], 2)
  ones = lambda b, t: jnp.ones((b, t), jnp.int32)
  with pytest.raises(ValueError, match=r"the cache holds 1 rows; expected tokens with 1"):
    lm.step(ones(2, 1), lm.init_cache(1, 8))
  with pytest.raises(ValueError, match=r"holds 0 of 8 positions, no room for 9 more"):
    lm.step(ones(1, 9), lm.init_cache(1, 8))
  with pytest.raises(ValueError, match=r"cache: expected a KVCache"):
    lm.step(ones(1, 1), None)
  _, cache = lm.step(ones(1, 8), lm.init_cache(1, 8))       # exactly full is fine
  with pytest.raises(ValueError, match=r"holds 8 of 8 positions, no room for 1 more"):
    lm.step(ones(1, 1), cache)


def test_empty_summaries_check_their_sizes_and_dtype():
  for args, message in (((-1, 8, 1, 4, 4), r"batch=-1"), ((1, 8, 1, 0, 4), r"head_dim=0"),
                        ((1, 8, 1, 4, 4, "int32"), r"dtype='int32'")):
    with pytest.raises(ValueError, match=message):
      cj.empty_summaries(*args)
