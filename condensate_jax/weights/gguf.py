"""GGUF reader: an HF-style config, HF-named float32 tensors and a tokenizer from one `.gguf` file.

    hf_config, tensors, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

`hf_config` is a dict with the keys of a `transformers` `config.json` for the same model,
`tensors` maps HF checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...) to float32
numpy arrays in HF layout ([out, in] for projections), and `tokenizer` is a
`tokenizers.Tokenizer` rebuilt from the file's metadata (its post-processor adds BOS/EOS the way
the file says).

What llama.cpp's converter changes, and is undone here:
  * llama: the rows of the q and k projections are permuted per head (rotary pairs (i, i+d/2)
    become adjacent rows); `_unpermute_rows` restores HF's order.
  * gemma3: every RMSNorm weight is stored as `w + 1` (HF's Gemma norm multiplies by `1 + w`).
  * names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, etc.
Every tensor is dequantized with `gguf.quants.dequantize`; a tensor type that package cannot
dequantize is refused with a ValueError naming the tensor and the type.

Known limits: llama3-style rope frequency tensors (`rope_freqs.weight`) are refused; a Mistral GGUF
(architecture `llama`) carries no sliding window, so none is set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import Tokenizer

from condensate_jax.weights.gguf_tokenizer import build_tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
PRETOKENIZERS = ("transformers", "llama.cpp")


# Per-block tensor names: GGUF leaf -> HF module path under `model.layers.N.`.
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAMES = {"llama": _LLAMA_BLOCK, "qwen2": _LLAMA_BLOCK, "gemma3": _GEMMA3_BLOCK}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")


def load_gguf(path: str | os.PathLike, *, pretokenizer: str = "transformers",
              ) -> tuple[dict[str, Any], dict[str, np.ndarray], Tokenizer]:
  """Reads a GGUF file: `(hf_config, tensors, tokenizer)` (see the module docstring).

  pretokenizer: "transformers" (default) splits text exactly as `transformers`' GGUF tokenizer
    does; "llama.cpp" also applies llama.cpp's digit split for `tokenizer.ggml.pre` values such as
    "smollm" (one token per digit before the GPT-2 split), which transformers leaves out. They
    differ only on some whitespace next to digits (e.g. "  42": "Ġ Ġ 4 2" vs "ĠĠ 4 2").
  """
  if pretokenizer not in PRETOKENIZERS:
    raise ValueError(f"pretokenizer={pretokenizer!r}: expected one of {PRETOKENIZERS}")
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: path={str(path)!r}")
  reader = _open(path)
  meta = {name: _field_value(field) for name, field in reader.fields.items()}
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"GGUF architecture {arch!r} in {str(path)!r} is not supported; supported "
                     f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
  tensor_names = {t.name for t in reader.tensors}
  config = _hf_config(arch, meta, tensor_names)
  tensors = _hf_tensors(arch, reader, config, path)
  tokenizer = build_tokenizer(meta, arch=arch, pretokenizer=pretokenizer)
  return config, tensors, tokenizer


# ----------------------------------------------------------------------------- reading


def _open(path: Path) -> gguf.GGUFReader:
  """A GGUFReader whose tensors all lie inside the file; a clear ValueError otherwise."""
  try:
    reader = gguf.GGUFReader(path, "r")
  except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
    raise ValueError(f"cannot read GGUF file {str(path)!r} (truncated or not a GGUF file): "
                     f"{type(e).__name__}: {e}") from e
  size = path.stat().st_size
  for t in reader.tensors:
    block, type_size = gguf.GGML_QUANT_SIZES.get(t.tensor_type, (1, 0))
    expected = int(t.n_elements) // block * type_size
    if t.data_offset + expected > size or (type_size and t.data.nbytes != expected):
      raise ValueError(f"GGUF file {str(path)!r} is truncated: tensor {t.name!r} needs bytes "
                       f"{t.data_offset}..{t.data_offset + expected}, the file has {size}")
  return reader


def _field_value(field: Any) -> Any:
  value = field.contents()
  if isinstance(value, bytes):  # a string the reader could not decode
    value = value.decode("utf-8", errors="replace")
  return value


def _dequantize(tensor: Any) -> np.ndarray:
  qtype = tensor.tensor_type
  try:
    data = gguf.quants.dequantize(tensor.data, qtype)
  except NotImplementedError as e:
    raise ValueError(f"tensor {tensor.name!r} has GGUF type {qtype.name}, which gguf.quants cannot "
                     f"dequantize ({e})") from e
  shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dims fastest-first
  return np.array(data, dtype=np.float32).reshape(shape)  # a copy: detached from the memmap


# ----------------------------------------------------------------------------- config


def _hf_config(arch: str, meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
  def get(key: str, default: Any = None, required: bool = False) -> Any:
    full = f"{arch}.{key}"
    if full not in meta:
      if required:
        raise ValueError(f"GGUF metadata lacks {full!r}, needed for architecture {arch!r}")
      return default
    return meta[full]

  hidden = int(get("embedding_length", required=True))
  heads = int(get("attention.head_count", required=True))
  kv_heads = get("attention.head_count_kv", heads)
  if isinstance(kv_heads, list):  # some files list it per layer
    if len(set(kv_heads)) != 1:
      raise ValueError(f"per-layer {arch}.attention.head_count_kv={kv_heads} is not supported")
    kv_heads = kv_heads[0]
  head_dim = int(get("attention.key_length", hidden // heads))
  tokens = meta.get("tokenizer.ggml.tokens")
  vocab = get("vocab_size", len(tokens) if tokens is not None else None, required=tokens is None)

  config: dict[str, Any] = {
      "hidden_size": hidden,
      "intermediate_size": int(get("feed_forward_length", required=True)),
      "num_hidden_layers": int(get("block_count", required=True)),
      "num_attention_heads": heads,
      "num_key_value_heads": int(kv_heads),
      "head_dim": head_dim,
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", required=True)),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(get("context_length", required=True)),
      "vocab_size": int(vocab),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "rope_scaling": _rope_scaling(get),
  }
  for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
    if f"tokenizer.ggml.{key}" in meta:
      config[name] = int(meta[f"tokenizer.ggml.{key}"])

  if arch == "llama":
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                  attention_bias="blk.0.attn_q.bias" in tensor_names, mlp_bias=False)
    rot = get("rope.dimension_count", head_dim)
    if int(rot) != head_dim:
      raise ValueError(f"llama.rope.dimension_count={rot} differs from head_dim={head_dim}; "
                       "partial rotary is not part of the llama architecture")
  elif arch == "qwen2":
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                  use_sliding_window=False, sliding_window=None)
  else:  # gemma3
    layers = config["num_hidden_layers"]
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per-layer booleans: True = sliding
      layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:  # llama.cpp's gemma3 default: every 6th layer is global
      layer_types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention"
                     for i in range(layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (62 layers).
    scalar = hidden // heads if layers == 62 else head_dim
    config.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                  hidden_activation="gelu_pytorch_tanh",
                  sliding_window=int(get("attention.sliding_window", required=True)),
                  rope_local_base_freq=float(get("rope.freq_base_swa", 10000.0)),
                  query_pre_attn_scalar=scalar, layer_types=layer_types,
                  final_logit_softcapping=get("final_logit_softcapping"),
                  attn_logit_softcapping=get("attn_logit_softcapping"),
                  attention_bias=False)
  return config


def _rope_scaling(get: Any) -> dict[str, Any] | None:
  kind = get("rope.scaling.type")
  if kind in (None, "none"):
    return None
  if kind not in ("linear", "yarn"):
    raise ValueError(f"rope.scaling.type={kind!r} is not supported; supported: 'linear', 'yarn'")
  factor = get("rope.scaling.factor")
  if factor is None:
    raise ValueError(f"rope.scaling.type={kind!r} without rope.scaling.factor")
  if kind == "linear" and float(factor) == 1.0:
    return None  # linear scaling by 1 is no scaling
  scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
  orig = get("rope.scaling.original_context_length")
  if orig is not None:
    scaling["original_max_position_embeddings"] = int(orig)
  return scaling


# ----------------------------------------------------------------------------- tensors


def _hf_name(arch: str, name: str) -> str | None:
  if name in _TOP_NAMES:
    return _TOP_NAMES[name]
  m = _BLOCK_RE.match(name)
  if m and m.group(2) in _BLOCK_NAMES[arch]:
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[arch][m.group(2)]}.{m.group(3)}"
  return None


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation: per head, rows (pair, half) -> (half, pair)."""
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of even size")
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(arch: str, reader: gguf.GGUFReader, config: dict[str, Any],
                path: Path) -> dict[str, np.ndarray]:
  errors: list[str] = []
  tensors: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      errors.append("rope_freqs.weight: llama3-style rope frequency factors are not supported")
      continue
    hf = _hf_name(arch, t.name)
    if hf is None:
      errors.append(f"{t.name}: no HF counterpart known for architecture {arch!r}")
      continue
    try:
      w = _dequantize(t)
    except ValueError as e:
      errors.append(str(e))
      continue
    if arch == "llama" and t.name.endswith((".attn_q.weight", ".attn_q.bias")):
      w = _unpermute_rows(w, config["num_attention_heads"])
    elif arch == "llama" and t.name.endswith((".attn_k.weight", ".attn_k.bias")):
      w = _unpermute_rows(w, config["num_key_value_heads"])
    if arch == "gemma3" and t.name.endswith("norm.weight"):
      w = w - np.float32(1.0)
    tensors[hf] = w
  n = config["num_hidden_layers"]
  for name in tensors:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= n:
      errors.append(f"{name}: layer index beyond {arch}.block_count={n}")
  if "model.embed_tokens.weight" not in tensors:
    errors.append("token_embd.weight is missing")
  if errors:
    raise ValueError(f"cannot convert GGUF file {str(path)!r}:\n  " + "\n  ".join(errors))
  return tensors
