"""Test models that need no download: "tiny-random-<family>" (seeded random weights, a
byte-level tokenizer, 512 context). User-facing through `load_model("tiny-random")`."""

from __future__ import annotations

from flax import nnx

from condensate_jax import models
from condensate_jax.lm import LanguageModel
from condensate_jax.models import layers

TINY_FAMILIES = ("gpt2", "gpt_neox", "llamalike", "gemma3")
TINY_MAX_LENGTH = 512


def byte_tokenizer():
  """A byte-level BPE with no merges: 256 byte tokens + <|endoftext|>, <|pad|>."""
  import tokenizers
  from tokenizers import decoders, models as tmodels, pre_tokenizers
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  byte_to_char = sorted(alphabet, key=lambda c: _BYTE_ORDER[c])
  vocab = {c: i for i, c in enumerate(byte_to_char)}
  tok = tokenizers.Tokenizer(tmodels.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
  return tok


def _gpt2_byte_order() -> dict[str, int]:
  """The GPT-2 byte -> unicode map, inverted: char -> byte value."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, n = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + n)] = b
      n += 1
  return chars


_BYTE_ORDER = _gpt2_byte_order()


def tiny_random(family: str = "llamalike", *, seed: int = 0, dtype="float32"):
  """A tiny randomly initialised LanguageModel (2 layers, width 64, context 512)."""
  if family not in TINY_FAMILIES:
    raise ValueError(f"family={family!r}: expected one of {TINY_FAMILIES}.")
  tok = byte_tokenizer()
  cfg = models.CONFIG_CLASSES[family].tiny(vocab_size=tok.get_vocab_size(),
                                           max_length=TINY_MAX_LENGTH)
  dt = layers.check_dtype(dtype)
  model = models.FAMILIES[family].Model(cfg, dt, rngs=nnx.Rngs(seed))
  return LanguageModel(model, cfg, tok, dtype=dt, name=f"tiny-random-{family}")
