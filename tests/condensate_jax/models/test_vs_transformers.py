"""Each family against transformers on tiny random configs: prefill, cached decode, greedy.

Path: transformers model -> save_pretrained (safetensors) -> cj.load_model(dir) -> logits.
Tolerance: float32 max-abs 1e-4 on logits of magnitude O(1-10).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from condensate_jax.weights.registry import load_model  # noqa: E402
from tests.condensate_jax.models import hf_reference as ref  # noqa: E402

ATOL = 1e-4
T = 20  # longer than every sliding window below

CASES = {
    # name: (config class, config kwargs)
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "neox_parallel_partial_rotary": ("GPTNeoXConfig", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                             partial_rotary_factor=0.5))),
    "neox_sequential_nobias_tied": ("GPTNeoXConfig", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, use_parallel_residual=False, attention_bias=False,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=500.0,
                             partial_rotary_factor=0.25))),
    "llama_gqa": ("LlamaConfig", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64)),
    "llama_mqa_tied_bias_llama3rope": ("LlamaConfig", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, max_position_embeddings=64,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    "llama_mha_linear_rope": ("LlamaConfig", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral_sliding": ("MistralConfig", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, sliding_window=6)),
    "qwen2_bias_tied_sliding": ("Qwen2Config", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma3_interleave_mqa": ("Gemma3TextConfig", dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, max_position_embeddings=64, sliding_window=6,
        query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gemma3_softcap_gqa": ("Gemma3TextConfig", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=64, sliding_window=4,
        query_pre_attn_scalar=8, final_logit_softcapping=5.0,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1e6,
                                                factor=2.0),
                         "sliding_attention": dict(rope_type="default",
                                                   rope_theta=1e4)})),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
  cls, kwargs = CASES[request.param]
  hf = ref.hf_model(cls, seed=len(request.param), **kwargs)
  d = ref.save_dir(hf, tmp_path_factory.mktemp(request.param))
  return request.param, hf, load_model(d)


def test_prefill_logits(pair):
  name, hf, lm = pair
  tokens = ref.random_tokens(2, T, seed=1)
  want = ref.hf_logits(hf, tokens)
  got = np.asarray(lm.logits(tokens))
  assert got.dtype == np.float32 and got.shape == want.shape
  assert np.std(want) > 0.3, "reference logits too flat for the test to mean anything"
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=name)


def test_cached_decode_logits(pair):
  """Prefill 5 tokens into the cache, then one token at a time: same logits as HF's
  full-sequence (teacher-forced) pass at every position."""
  name, hf, lm = pair
  tokens = ref.random_tokens(2, T, seed=2)
  want = ref.hf_logits(hf, tokens)
  cache = lm.init_cache(2, T + 3)
  logits, cache = lm.step(tokens[:, :5], cache)
  steps = [np.asarray(logits)]
  for t in range(5, T):
    logits, cache = lm.step(tokens[:, t:t + 1], cache)
    steps.append(np.asarray(logits))
  got = np.concatenate(steps, axis=1)
  assert np.asarray(cache.lengths).tolist() == [T, T]
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=name)


def test_greedy_matches_transformers(pair):
  name, hf, lm = pair
  tokens = ref.random_tokens(2, 9, seed=3)
  want = ref.hf_greedy(hf, tokens, 12)
  got = np.asarray(lm.generate(tokens, 12))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want, err_msg=name)
