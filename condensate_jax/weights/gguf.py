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
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
SUPPORTED_TOKENIZERS = ("gpt2", "llama")
PRETOKENIZERS = ("transformers", "llama.cpp")

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

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


# ----------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


# Split regexes for `tokenizer.ggml.pre` values whose merges were learned on a non-GPT-2 split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# llama.cpp splits digits one by one before the GPT-2 regex for these (llama-vocab.cpp);
# transformers' GGUF tokenizer does not, so this split is applied only with pretokenizer="llama.cpp".
_DIGIT_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
  pieces, best (highest-scoring) merged token first; ties by longer left, then longer right piece,
  then file order (the order `transformers` uses, so both tokenizers agree)."""
  ids = {t: i for i, t in enumerate(tokens)}
  found = []
  for token, score in zip(tokens, scores):
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if token[:i] in ids and token[i:] in ids]
    splits.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
    found += [(score, l, r) for l, r in splits]
  order = sorted(range(len(found)),
                 key=lambda i: (-found[i][0], -len(found[i][1]), -len(found[i][2]), i))
  return [(found[i][1], found[i][2]) for i in order]


def build_tokenizer(meta: dict[str, Any], arch: str = "llama",
                    pretokenizer: str = "transformers") -> Tokenizer:
  """A `tokenizers.Tokenizer` from GGUF `tokenizer.ggml.*` metadata (see `load_gguf`)."""
  kind = meta.get("tokenizer.ggml.model")
  if kind not in SUPPORTED_TOKENIZERS:
    raise ValueError(f"tokenizer.ggml.model={kind!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_TOKENIZERS)}")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]

  if kind == "gpt2":
    alphabet = _byte_alphabet()
    allowed = set(alphabet.values())
    # Tokens outside the byte alphabet (rare, e.g. a raw space) get their byte-level spelling.
    spelled = [t if set(t) <= allowed else "".join(alphabet[b] for b in t.encode("utf-8"))
               for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre")
    split = _PRE_SPLITS.get(pre)
    if pretokenizer == "llama.cpp" and pre in _DIGIT_FIRST:
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif split is None:
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(split), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens not spelled in the byte alphabet are mislabelled entries: skipped.
    special_ok = [set(t) <= allowed for t in tokens]
    default_add_bos = False
  else:
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    if arch == "gemma3":
      # Gemma stores runs of spaces as spaces, looked up as "▁"s; its merge order is file order.
      tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
      scores = [-float(i) for i in range(len(tokens))]
    if not merges:
      merges = _sentencepiece_merges(tokens, scores)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    bpe_kw = {} if unk_id is None or arch != "gemma3" else {"unk_token": tokens[int(unk_id)]}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True,
                               byte_fallback=True, **bpe_kw))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if arch == "gemma3":
      tok.normalizer = normalizers.Replace(" ", "▁")
    else:
      prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
      tok.pre_tokenizer = pre_tokenizers.Metaspace(
          replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
      if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    special_ok = [True] * len(tokens)
    default_add_bos = True

  special_ids = {int(meta[f"tokenizer.ggml.{k}"]) for k in
                 ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
                 if f"tokenizer.ggml.{k}" in meta}
  added = [AddedToken(t, special=True, normalized=False) for i, (t, ty) in
           enumerate(zip(tokens, types)) if (ty == _TOKEN_CONTROL or i in special_ids)
           and special_ok[i]]
  tok.add_special_tokens(added)
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])

  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  single: list[str] = ["$A"]
  special: list[tuple[str, int]] = []
  for flag, key in ((add_bos, "bos_token_id"), (add_eos, "eos_token_id")):
    if flag and f"tokenizer.ggml.{key}" in meta:
      tid = int(meta[f"tokenizer.ggml.{key}"])
      single = [tokens[tid], *single] if key == "bos_token_id" else [*single, tokens[tid]]
      if (tokens[tid], tid) not in special:
        special.append((tokens[tid], tid))
  tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
  return tok
