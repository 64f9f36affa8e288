"""Block summaries kept in the models' KV cache (issue 6, deliverable 2).

A layer running a block-selection spec builds its summaries at prefill and updates them
with `selection.summaries.append_summaries` on every decode step; the attention call consumes them.
Checked here: cached decode equals teacher forcing with the same spec, the cached
summaries equal `build_summaries` of the cached keys bitwise, the cached summaries are
what the attention reads, "bounded" decodes like "exact", dense/exact caches carry none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax import CondensateSpec
from condensate_jax.selection import summaries as blocks
from condensate_jax.models.kv_cache import KVCache
from condensate_jax.weights.registry import load_model

PROMPT, NEW, MAX_LEN = 24, 10, 40
BLOCKS = CondensateSpec(anchor=2, window=4, top_k=4, selection="blocks", block_size=4,
                        top_blocks=2)


@pytest.fixture(scope="module", params=("llamalike", "gemma3"))
def lm(request):
  return load_model(f"tiny-random-{request.param}")


def _tokens(t, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (2, t)).astype(np.int32)


@pytest.fixture(scope="module")
def stepped(lm):
  """Prefill PROMPT tokens, then NEW single-token steps, with the "blocks" spec."""
  tokens = _tokens(PROMPT + NEW, seed=1)
  cache = lm.init_cache(2, MAX_LEN)
  logits, cache = lm.step(tokens[:, :PROMPT], cache, attention=BLOCKS)
  got, prefill_cache = [np.asarray(logits)], cache
  for t in range(PROMPT, PROMPT + NEW):
    logits, cache = lm.step(tokens[:, t:t + 1], cache, attention=BLOCKS)
    got.append(np.asarray(logits))
  return tokens, np.concatenate(got, axis=1), prefill_cache, cache


def test_cached_blocks_decode_matches_teacher_forcing(lm, stepped):
  tokens, got, _, _ = stepped
  want = np.asarray(lm.logits(tokens, attention=BLOCKS))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
  # The spec mattered: block selection is not dense here.
  assert np.abs(want - np.asarray(lm.logits(tokens))).max() > 1e-2


def test_blocks_generate_matches_teacher_forcing(lm):
  prompt = _tokens(PROMPT, seed=2)
  new = np.asarray(lm.generate(prompt, NEW, attention=BLOCKS))
  full = np.concatenate([prompt, new], axis=1)
  forced = np.asarray(lm.logits(full, attention=BLOCKS))
  np.testing.assert_array_equal(forced[:, PROMPT - 1:-1].argmax(-1), new)


def test_cached_summaries_equal_build_of_cached_keys(lm, stepped):
  tokens, _, prefill_cache, cache = stepped
  # A 3-token chunk appended to the prefill cache (T > 1 appends, one call).
  _, chunked = lm.step(tokens[:, PROMPT:PROMPT + 3], prefill_cache, attention=BLOCKS)
  for c, n in ((prefill_cache, PROMPT), (cache, PROMPT + NEW), (chunked, PROMPT + 3)):
    assert np.asarray(c.lengths).tolist() == [n, n]
    assert len(c.summaries) == lm.num_layers
    for layer in range(lm.num_layers):
      summ = c.summaries[layer]
      want = blocks.build_summaries(c.k[layer], BLOCKS.block_size, c.lengths)
      assert summ.block_size == BLOCKS.block_size
      assert summ.kmin.shape == (2, blocks.num_blocks(MAX_LEN, 4), lm.config.num_kv_heads,
                                 lm.config.head_dim)
      assert summ.kmin.dtype == c.k[layer].dtype
      np.testing.assert_array_equal(np.asarray(summ.kmin), np.asarray(want.kmin))
      np.testing.assert_array_equal(np.asarray(summ.kmax), np.asarray(want.kmax))
      # Blocks past the written keys are still empty (+inf / -inf).
      assert np.all(np.isposinf(np.asarray(summ.kmin)[:, -1]))


def test_attention_reads_the_cached_summaries(lm, stepped):
  tokens, _, _, cache = stepped
  nxt = _tokens(1, seed=3)
  base, _ = lm.step(nxt, cache, attention=BLOCKS)
  # Rebuilt inside the call from K (no cached summaries): the same summaries, same result.
  rebuilt, rebuilt_cache = lm.step(nxt, cache._replace(summaries=None), attention=BLOCKS)
  np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(base))
  assert rebuilt_cache.summaries is not None   # the next step appends again
  # Wrong summaries (every written block the same wide box: ties pick the lowest blocks)
  # change the selection, so the call reads the cache's summaries, not K's.
  def boxes(s):
    full = np.isfinite(np.asarray(s.kmin))
    return blocks.BlockSummaries(jnp.where(full, -10.0, jnp.inf).astype(s.kmin.dtype),
                                 jnp.where(full, 10.0, -jnp.inf).astype(s.kmax.dtype),
                                 s.block_size)
  wrong = cache._replace(summaries=tuple(boxes(s) for s in cache.summaries))
  bad, _ = lm.step(nxt, wrong, attention=BLOCKS)
  assert np.abs(np.asarray(bad) - np.asarray(base)).max() > 1e-3


def test_bounded_through_cache_generates_like_exact(lm):
  prompt = _tokens(PROMPT, seed=4)
  exact = CondensateSpec(anchor=2, window=4, top_k=3)
  bounded = exact.replace(selection="bounded", block_size=4)
  want = np.asarray(lm.generate(prompt, NEW, attention=exact))
  np.testing.assert_array_equal(np.asarray(lm.generate(prompt, NEW, attention=bounded)),
                                want)


def test_dense_exact_and_pillar_layers_carry_no_summaries(lm):
  prompt = _tokens(PROMPT, seed=5)
  for spec in (None, CondensateSpec(anchor=2, window=4, top_k=3)):
    _, cache = lm.step(prompt, lm.init_cache(2, MAX_LEN), attention=spec)
    assert isinstance(cache, KVCache) and cache.summaries is None
    # Same leaves as before summaries existed: k, v per layer and lengths.
    assert len(jax.tree_util.tree_leaves(cache)) == 2 * lm.num_layers + 1
  pillar = BLOCKS.replace(dense_layers=(0,))
  _, cache = lm.step(prompt, lm.init_cache(2, MAX_LEN), attention=pillar)
  assert cache.summaries[0] is None
  assert isinstance(cache.summaries[1], blocks.BlockSummaries)
  # A dense step after a block-selection step drops the summaries (no stale state).
  _, cache = lm.step(prompt[:, :1], cache, attention=None)
  assert cache.summaries is None


def test_attention_with_summaries_checks_arguments():
  rng = np.random.default_rng(6)
  q = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 12, 1, 8)), jnp.float32)
  summ = blocks.build_summaries(k, 4)
  with pytest.raises(ValueError, match="implementation='xla_masked'"):
    cj.condensate_attention(q, k, k, BLOCKS, summaries=summ, implementation="xla_masked")
  with pytest.raises(ValueError, match="summaries.block_size=4"):
    cj.condensate_attention(q, k, k, BLOCKS.replace(block_size=3), summaries=summ)
  with pytest.raises(ValueError, match="selection"):
    cj.condensate_attention(q, k, k, BLOCKS.replace(selection="exact"), summaries=summ)
  # Equal to the call that builds the summaries from k.
  got = cj.condensate_attention(q, k, k, BLOCKS, summaries=summ)
  want = cj.condensate_attention(q, k, k, BLOCKS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pallas_reads_the_cached_summaries():
  """implementation="pallas" (interpreted on CPU) through the cache: the kernels take the
  cached summaries and agree with the XLA specification."""
  lm = load_model("tiny-random-llamalike")
  tokens = _tokens(PROMPT + 2, seed=7)
  cache = lm.init_cache(2, MAX_LEN)
  _, cache = lm.step(tokens[:, :PROMPT], cache, attention=BLOCKS, implementation="pallas")
  for t in (PROMPT, PROMPT + 1):
    got, new_cache = lm.step(tokens[:, t:t + 1], cache, attention=BLOCKS,
                             implementation="pallas")
    want, _ = lm.step(tokens[:, t:t + 1], cache, attention=BLOCKS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
    cache = new_cache
  for layer in range(lm.num_layers):
    summ = blocks.build_summaries(cache.k[layer], BLOCKS.block_size, cache.lengths)
    np.testing.assert_array_equal(np.asarray(cache.summaries[layer].kmax),
                                  np.asarray(summ.kmax))
