"""Writers of tiny GGUF files for the loader tests (seeded; written with gguf.GGUFWriter).

The weights are drawn in HF layout and converted to llama.cpp's conventions here, the way
llama.cpp's `convert_hf_to_gguf.py` does (q/k rows permuted for llama, Gemma norms stored as
w + 1), so a test can check that the loader gets the HF tensors back.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def main():\n    return 0\n",
    "hello world, hello there; the theory of the thing",
    "numbers 123 4567 and spaces    and tabs\t\tend",
    "Ünïcödé café naïve 日本 🙂",
]
GPT2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def gpt2_vocab(vocab_size: int = 400) -> tuple[list[str], list[int], list[str]]:
  """A byte-level BPE vocabulary trained on CORPUS: (tokens, token types, merges)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GPT2_SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS * 4, trainer)
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  import json
  merges = json.loads(tok.to_str())["model"]["merges"]
  merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
  types = [3 if t in GPT2_SPECIALS else 1 for t in tokens]
  return tokens, types, merges


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
  """A SentencePiece-style vocabulary (<unk>, <s>, </s>, 256 byte tokens, pieces with scores)."""
  tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
  for b in range(256):
    tokens.append(f"<0x{b:02X}>")
    scores.append(0.0)
    types.append(6)
  pieces: list[str] = []
  for line in CORPUS[:3]:
    for word in line.replace("\n", " ").split(" "):
      word = "▁" + word
      for n in range(1, min(len(word), 5) + 1):
        for i in range(len(word) - n + 1):
          if word[i:i + n] not in pieces:
            pieces.append(word[i:i + n])
  pieces.sort(key=lambda p: (len(p), p))  # short pieces first: higher scores
  for i, p in enumerate(pieces):
    tokens.append(p)
    scores.append(-float(i))
    types.append(1)
  return tokens, scores, types


def _permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's conversion of q/k rows: per head, halves (i, i+d/2) interleaved."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _hf_weights(arch: str, *, vocab: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                ffn: int, layers: int, tied: bool, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  def mat(*shape):
    return rng.normal(0.0, 0.5, shape).astype(np.float32)
  w = {"model.embed_tokens.weight": mat(vocab, hidden),
       "model.norm.weight": 1.0 + mat(hidden) * 0.1}
  if not tied:
    w["lm_head.weight"] = mat(vocab, hidden)
  for i in range(layers):
    p = f"model.layers.{i}."
    w[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
    w[p + "self_attn.k_proj.weight"] = mat(kv_heads * head_dim, hidden)
    w[p + "self_attn.v_proj.weight"] = mat(kv_heads * head_dim, hidden)
    w[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
    if arch == "qwen2":  # Qwen2 has q/k/v biases
      w[p + "self_attn.q_proj.bias"] = mat(heads * head_dim)
      w[p + "self_attn.k_proj.bias"] = mat(kv_heads * head_dim)
      w[p + "self_attn.v_proj.bias"] = mat(kv_heads * head_dim)
    w[p + "mlp.gate_proj.weight"] = mat(ffn, hidden)
    w[p + "mlp.up_proj.weight"] = mat(ffn, hidden)
    w[p + "mlp.down_proj.weight"] = mat(hidden, ffn)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if arch == "gemma3":
      norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
      w[p + "self_attn.q_norm.weight"] = mat(head_dim) * 0.1
      w[p + "self_attn.k_norm.weight"] = mat(head_dim) * 0.1
    for n in norms:
      w[p + n + ".weight"] = mat(hidden) * 0.1
  return w


_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}
_LEAVES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_LEAVES_LLAMA = {**_LEAVES, "post_attention_layernorm": "ffn_norm"}
_LEAVES_GEMMA = {**_LEAVES, "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(arch: str, hf: str) -> str:
  if hf in _TO_GGUF:
    return _TO_GGUF[hf]
  _, _, layer, rest = hf.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  leaves = _LEAVES_GEMMA if arch == "gemma3" else _LEAVES_LLAMA
  return f"blk.{layer}.{leaves[module]}.{kind}"


def write_tiny_gguf(path: Path, arch: str = "llama", *, qtype: str = "F32", tokenizer: str = "gpt2",
                    tied: bool = True, seed: int = 0, extra_tensors: dict | None = None,
                    declared_arch: str | None = None,
                    rope_scaling: tuple[str, float, int] | None = None) -> dict[str, np.ndarray]:
  """Writes a 2-layer model; returns its HF-layout float32 tensors (before quantization).

  arch: "llama", "qwen2" (q/k/v biases) or "gemma3".
  qtype: "F32", "F16" or "Q8_0" for the 2-D weights (norms stay F32, as llama.cpp keeps them).
  rope_scaling: (type, factor, original context length) metadata to write.
  """
  if tokenizer == "gpt2":
    tokens, types, merges = gpt2_vocab()
    scores = None
  else:
    tokens, scores, types = sentencepiece_vocab()
    merges = None
  dims = dict(vocab=len(tokens), hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, layers=2)
  hf = _hf_weights(arch, tied=tied, seed=seed, **dims)
  w = gguf.GGUFWriter(str(path), declared_arch or arch)
  w.add_name("tiny test model")
  w.add_block_count(dims["layers"])
  w.add_context_length(256)
  w.add_embedding_length(dims["hidden"])
  w.add_feed_forward_length(dims["ffn"])
  w.add_head_count(dims["heads"])
  w.add_head_count_kv(dims["kv_heads"])
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_freq_base(10000.0 if arch != "gemma3" else 1000000.0)
  if arch == "gemma3":
    w.add_key_length(dims["head_dim"])
    w.add_value_length(dims["head_dim"])
    w.add_sliding_window(8)
  else:
    w.add_rope_dimension_count(dims["head_dim"])
  if rope_scaling is not None:
    w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
    w.add_rope_scaling_factor(rope_scaling[1])
    w.add_rope_scaling_orig_ctx_len(rope_scaling[2])
  w.add_tokenizer_model(tokenizer)
  if arch == "qwen2":
    w.add_tokenizer_pre("qwen2")  # Qwen2's own split regex (digits one by one)
  w.add_token_list(tokens)
  w.add_token_types(types)
  if merges is not None:
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
  else:
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
  for name, value in hf.items():
    g = gguf_name(arch, name)
    value = value.copy()
    if arch == "llama" and g.endswith(("attn_q.weight", "attn_q.bias")):
      value = _permute_rows(value, dims["heads"])
    elif arch == "llama" and g.endswith(("attn_k.weight", "attn_k.bias")):
      value = _permute_rows(value, dims["kv_heads"])
    if arch == "gemma3" and g.endswith("norm.weight"):
      value = value + np.float32(1.0)
    if value.ndim == 2 and qtype == "F16":
      w.add_tensor(g, value.astype(np.float16))
    elif value.ndim == 2 and qtype == "Q8_0":
      q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(g, value)
  for name, value in (extra_tensors or {}).items():
    w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf
