"""Tiny random transformers models (PyTorch CPU, float32, eager attention) as references.

Every parameter is redrawn from N(0, 0.3) with a seeded generator, so logits are O(1)
and a wrong rotation, norm or mask moves them far beyond the 1e-4 tolerance.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from condensate_jax.weights.tiny import byte_tokenizer

VOCAB = 258  # the byte tokenizer's size
STD = 0.3


def hf_model(config_cls_name: str, seed: int = 0, **config):
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = getattr(transformers, config_cls_name)(vocab_size=VOCAB, **config)
  cfg._attn_implementation = "eager"
  arch = {"GPT2Config": "GPT2LMHeadModel", "GPTNeoXConfig": "GPTNeoXForCausalLM",
          "LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
          "Qwen2Config": "Qwen2ForCausalLM",
          "Gemma3TextConfig": "Gemma3ForCausalLM"}[config_cls_name]
  model = getattr(transformers, arch)(cfg).to(torch.float32).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * STD)
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, tokens: np.ndarray, n: int) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = model.generate(torch.as_tensor(tokens, dtype=torch.long), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
  return out[:, tokens.shape[1]:].numpy()


def save_dir(model, path: pathlib.Path, *, config_edit=None) -> pathlib.Path:
  """save_pretrained (safetensors) + the byte tokenizer; optionally rewrite config.json."""
  model.save_pretrained(path, safe_serialization=True)
  byte_tokenizer().save(str(path / "tokenizer.json"))
  if config_edit is not None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config_edit(cfg), indent=1))
  return path


def random_tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, length)).astype(np.int32)
