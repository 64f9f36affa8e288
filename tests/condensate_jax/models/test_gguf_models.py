"""GGUF files -> load_model -> logits and greedy tokens vs transformers' own GGUF loading.

The tiny files come from the GGUF engineer's writer (tests/weights/tiny_gguf.py); this
checks the model-building half (`hf.build_language_model`) end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from condensate_jax.weights.registry import load_model  # noqa: E402
from tests.condensate_jax.weights.tiny_gguf import write_tiny_gguf  # noqa: E402


@pytest.mark.parametrize("arch,qtype,tied", [("llama", "F32", False),
                                             ("gemma3", "Q8_0", True)])
def test_gguf_model_matches_transformers(tmp_path, arch, qtype, tied):
  path = tmp_path / f"{arch}.gguf"
  write_tiny_gguf(path, arch, qtype=qtype, tokenizer="gpt2", tied=tied, seed=4)
  lm = load_model(path)
  # transformers' GGUF import leaves Gemma 3's query_pre_attn_scalar at its default 256;
  # llama.cpp (and our reader) scale by head_dim^-1/2 (16 here; equal for the real 270m).
  override = {"query_pre_attn_scalar": lm.config.head_dim} if arch == "gemma3" else {}
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
      **override).eval()
  tokens = np.random.default_rng(0).integers(0, lm.vocab_size, (2, 24)).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    ids = ref.generate(torch.as_tensor(tokens[:, :10], dtype=torch.long), max_new_tokens=8,
                       min_new_tokens=8, do_sample=False, pad_token_id=0)[:, 10:].numpy()
  assert np.std(want) > 0.3
  np.testing.assert_allclose(np.asarray(lm.logits(tokens)), want, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(lm.generate(tokens[:, :10], 8)), ids)
  text = "hello world, the theory"
  assert lm.decode(lm.encode(text)) == text
