"""implementation="fast" (models.fast_path): a model's cached decode on the timed steps.

The fast path must pick the same sets as the XLA specification (so, on these small
float32 models, the same greedy tokens), keep its packed key index equal to a packed
rebuild, and refuse what it does not implement. On a CPU the kernels are interpreted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensate_jax import CondensateSpec
from condensate_jax.models import fast_path
from condensate_jax.selection import index as index_lib
from condensate_jax.weights import tiny

N = 5
SPECS = {
    "dense": None,
    "exact": CondensateSpec(anchor=4, window=16, top_k=24),
    # 30 candidates of up to 95 middle keys: the index ranks, not every key is scored
    "indexed": CondensateSpec(anchor=4, window=16, top_k=24, selection="indexed",
                              candidates=30),
}


_MODELS = {}


def _lm(family):
  if family not in _MODELS:
    _MODELS[family] = tiny.tiny_random(family)
  return _MODELS[family]


def _prompts(lm, lengths, seed=0):
  rng = np.random.default_rng(seed)
  batch = np.full((len(lengths), max(lengths)), 7, np.int32)
  for i, n in enumerate(lengths):
    batch[i, :n] = rng.integers(0, lm.vocab_size, n)
  return batch, np.asarray(lengths)


@pytest.mark.parametrize("family,name", [("llamalike", "dense"), ("llamalike", "indexed"),
                                         ("gemma3", "exact"), ("gemma3", "indexed")])
def test_fast_generate_equals_the_specification(family, name):
  """Ragged rows; Gemma 3's local layers (window 16) are covered by these budgets, so
  they run the dense windowed kernel with the specification's set."""
  lm = _lm(family)
  tokens, lengths = _prompts(lm, [110, 67])
  spec = SPECS[name]
  want = lm.generate(tokens, N, spec, prompt_lengths=lengths)
  got = lm.generate(tokens, N, spec, implementation="fast", prompt_lengths=lengths)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fast_blocks_decode_uses_the_prefill_lists_sets():
  """"blocks": the fast prefill selects per query block, as the specification does with
  query_blocks=True; the decode steps then run fast.decode_step on the cache's summaries."""
  lm = _lm("llamalike")
  tokens, lengths = _prompts(lm, [110, 67], seed=1)
  spec = CondensateSpec(anchor=4, window=16, selection="blocks", block_size=16,
                        top_blocks=3, query_blocks=True)
  want = lm.generate(tokens, N, spec, prompt_lengths=lengths)
  got = lm.generate(tokens, N, spec, implementation="fast", prompt_lengths=lengths)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sliding_window_layer_not_covered_runs_the_specification():
  """A budget below Gemma 3's local window (16): those layers take the XLA path."""
  lm = _lm("gemma3")
  spec = CondensateSpec(anchor=1, window=4, top_k=6, selection="indexed", candidates=8)
  assert not fast_path.covers_window(spec, lm.config.sliding_window)
  tokens, lengths = _prompts(lm, [80, 61], seed=2)
  want = lm.generate(tokens, N, spec, prompt_lengths=lengths)
  got = lm.generate(tokens, N, spec, implementation="fast", prompt_lengths=lengths)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_prefill_gives_the_last_positions_logits_and_the_steps_continue():
  lm = _lm("llamalike")
  tokens, lengths = _prompts(lm, [40, 23], seed=3)
  full = np.asarray(lm.logits(tokens))
  for impl in ("xla", "fast"):
    cache = lm.init_cache(2, 128)
    last, cache = lm.prefill(tokens, cache, SPECS["indexed"] if impl == "fast" else None,
                             implementation=impl, prompt_lengths=lengths)
    if impl == "xla":
      np.testing.assert_allclose(np.asarray(last), full[[0, 1], lengths - 1], rtol=1e-5,
                                 atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    if impl == "fast":
      assert isinstance(cache.summaries[0], index_lib.PackedIndex)
      _, cache = lm.step(np.asarray([[3], [4]]), cache, SPECS["indexed"],
                         implementation="fast")
      np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + 1)


@pytest.mark.parametrize("name", ["exact", "indexed"])
def test_prefill_on_the_pallas_selection_is_bitwise_the_specification(name, monkeypatch):
  """What a GPU's fast prefill runs for "exact" / "indexed" (implementation=
  "pallas_select", here interpreted) against the specification it replaces: the same
  last-position logits bit for bit, ragged rows, several query chunks."""
  lm = _lm("llamalike")
  tokens, lengths = _prompts(lm, [110, 67], seed=4)
  monkeypatch.setattr(fast_path, "PREFILL_CHUNK", 32)
  logits = {}
  for impl in ("xla", "pallas_select"):
    monkeypatch.setattr(fast_path, "prefill_implementation", lambda spec, impl=impl: impl)
    jax.clear_caches()                    # the choice is read at trace time
    last, _ = lm.prefill(tokens, lm.init_cache(2, 128), SPECS[name],
                         implementation="fast", prompt_lengths=lengths)
    logits[impl] = np.asarray(last)
  jax.clear_caches()
  np.testing.assert_array_equal(logits["pallas_select"].view(np.int32),
                                logits["xla"].view(np.int32))


def test_append_packed_equals_packing_the_appended_index():
  k = jax.random.normal(jax.random.key(0), (2, 40, 2, 16))
  index = index_lib.build_index(k, 4, jnp.array([30, 20]))
  k_new = 3 * jax.random.normal(jax.random.key(1), (2, 3, 2, 16))
  positions = jnp.array([[30, 31, -1], [20, 21, 22]])
  want = index_lib.pack_index(index_lib.append_index(index, k_new, positions))
  got = index_lib.append_packed(index_lib.pack_index(index), k_new, positions)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="expected a PackedIndex"):
    index_lib.append_packed(index, k_new, positions)
  with pytest.raises(ValueError, match=r"k_new.shape=\(2, 3, 2, 8\)"):
    index_lib.append_packed(index_lib.pack_index(index), k_new[..., :8], positions)


def test_fast_cache_length_is_whole_blocks():
  blocks = CondensateSpec(anchor=1, window=1, selection="blocks", block_size=48,
                          top_blocks=1)
  assert fast_path.cache_length(100, blocks) == 144
  assert fast_path.cache_length(100, None) == 128
  assert fast_path.cache_length(256, SPECS["indexed"]) == 256


def test_fast_validation():
  lm = _lm("llamalike")
  tokens = np.zeros((1, 8), np.int32)
  with pytest.raises(ValueError, match="serve cached decoding"):
    lm.logits(tokens, implementation="fast")
  certified = CondensateSpec(anchor=1, window=1, top_k=2, selection="certified",
                             epsilon=1e-2)
  with pytest.raises(ValueError, match=r"selection='certified' with implementation='fast'"):
    lm.generate(tokens, 2, certified, implementation="fast")
  program = CondensateSpec(anchor=1, window=1, top_k=2, top_k_capacity=4)
  with pytest.raises(ValueError, match="top_k_capacity=4 with implementation='fast'"):
    lm.generate(tokens, 2, program, implementation="fast")
  with pytest.raises(ValueError, match="'fast'"):
    lm.generate(tokens, 2, None, implementation="fastest")
  with pytest.raises(ValueError, match="return_stats=True with implementation='fast'"):
    fast_path.check_fast(None, return_stats=True)


def test_dense_kernel_name():
  assert fast_path.dense_kernel(jnp.float32) == "xla"
  want = "cudnn" if jax.default_backend() == "gpu" else "xla"
  assert fast_path.dense_kernel(jnp.bfloat16) == want


def test_covers_window_counts_the_blocks_a_window_straddles():
  blocks = lambda m: CondensateSpec(anchor=0, window=0, selection="blocks", block_size=4,
                                    top_blocks=m)
  assert not fast_path.covers_window(blocks(2), 8)      # 8 keys can touch 3 blocks of 4
  assert fast_path.covers_window(blocks(3), 8)
  assert fast_path.covers_window(SPECS["exact"], 16 + 4 + 24)
  assert not fast_path.covers_window(SPECS["exact"], 16 + 4 + 25)


def test_fast_prefill_of_a_padded_row():
  """"indexed": the prefill's key index from the real keys only, so a padded row equals
  the row alone. "blocks": a padded batch runs the specification's per-query selection
  (the prefill kernel's per-query-block lists would rank the row with its padding), the
  same numbers as implementation="xla"; a full row gets the kernel's lists (README)."""
  lm = _lm("llamalike")
  row = np.random.default_rng(4).integers(0, lm.vocab_size, 40).astype(np.int32)
  padded = np.concatenate([row, np.full(24, 5, np.int32)])[None]
  spec = SPECS["indexed"]
  alone, _ = lm.prefill(row[None], lm.init_cache(1, 128), spec, implementation="fast")
  got, _ = lm.prefill(padded, lm.init_cache(1, 128), spec, implementation="fast",
                      prompt_lengths=[40])
  np.testing.assert_allclose(np.asarray(got), np.asarray(alone), rtol=1e-5, atol=1e-5)
  spec = CondensateSpec(anchor=2, window=4, selection="blocks", block_size=16,
                        top_blocks=1)
  want, _ = lm.prefill(padded, lm.init_cache(1, 128), spec, prompt_lengths=[40])
  got, _ = lm.prefill(padded, lm.init_cache(1, 128), spec, implementation="fast",
                      prompt_lengths=[40])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fast_blocks_needs_a_whole_block_cache():
  lm = _lm("llamalike")
  spec = CondensateSpec(anchor=1, window=2, selection="blocks", block_size=16,
                        top_blocks=1)
  with pytest.raises(ValueError, match=r"expected a multiple of 16 \(e.g. 128"):
    lm.prefill(np.zeros((1, 8), np.int32), lm.init_cache(1, 100), spec,
               implementation="fast")
