"""Tokenizers from GGUF `tokenizer.ggml.*` metadata (`build_tokenizer`), for `gguf.load_gguf`.

GPT-2-style byte-level BPE (`tokenizer.ggml.model` "gpt2", with the split regex that
`tokenizer.ggml.pre` names) and SentencePiece-style BPE ("llama"); special tokens and the
BOS/EOS post-processor as the file says.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

SUPPORTED_TOKENIZERS = ("gpt2", "llama")
# GGUF token types (llama.cpp's llama_token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


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
