"""An offline text corpus for training (issue #19): English technical prose shipped with
Python itself, split into train / held-out documents, tokenised with a model's tokenizer.

Sources (each a set of named documents, built in a stable order):
  "pydoc_topics"       the help topics of `pydoc_data.topics` (the language reference's
                       prose behind `help("if")`, ~465K characters on Python 3.11);
  "stdlib_docstrings"  the module, class and function docstrings of the standard
                       library's .py files (tests, demos and GUI packages left out; ~1.5M
                       characters on 3.11), one document per module.
Neither is one of the parity runner's built-in prompts. The text depends on the Python
version that builds it: `Corpus.digest` (sha256 of the documents) names it, and the jobs
record it beside their rows.

Split: a document is held out when the first byte of sha256(its name) falls below
holdout * 256 — stable across runs, machines and corpus sizes (a document's side never
depends on which others exist) — and then loses every line that also occurs in a
training document (`dedupe_heldout`: the help topics and docstrings repeat text; without
this ~13% of held-out 64-character shingles occurred verbatim in training). Tokens: each side's documents in name order, each ended by
the tokenizer's end-of-text id where it has one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import pathlib
import sysconfig
from typing import Callable, Optional, Sequence

import numpy as np

SOURCES = ("pydoc_topics", "stdlib_docstrings")
# stdlib folders whose docstrings are test scaffolding, demos or GUI code, not prose
_SKIPPED = frozenset({"test", "tests", "site-packages", "idlelib", "lib2to3", "tkinter",
                      "turtledemo", "__pycache__", "ensurepip", "venv"})
# end-of-text tokens of common tokenizers, tried in order
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


@functools.lru_cache(maxsize=None)
def _pydoc_topics() -> dict[str, str]:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return {f"pydoc/{name}": text for name, text in sorted(topics.topics.items())}


@functools.lru_cache(maxsize=None)
def _stdlib_docstrings() -> dict[str, str]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  out = {}
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if _SKIPPED & set(rel.parts[:-1]) or rel.parts[0] in _SKIPPED:
      continue
    try:
      tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
      continue
    docs = [ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef))]
    text = "\n\n".join(d for d in docs if d and len(d) > 40)
    if text:
      out[f"stdlib/{rel.as_posix()}"] = text
  return out


_BUILDERS = {"pydoc_topics": _pydoc_topics, "stdlib_docstrings": _stdlib_docstrings}


def check_sources(sources: Sequence[str]) -> tuple[str, ...]:
  sources = tuple(sources) if not isinstance(sources, str) else (sources,)
  bad = [s for s in sources if s not in SOURCES]
  if not sources or bad:
    raise ValueError(f"sources={list(sources)!r}: expected a non-empty subset of "
                     f"{list(SOURCES)}.")
  return sources


def offline_texts(sources: Sequence[str] = SOURCES,
                  max_chars: Optional[int] = None) -> dict[str, str]:
  """name -> text of the sources' documents, in name order; max_chars keeps the first
  documents (in that order) up to that many characters (the last one cut)."""
  texts = {}
  for source in check_sources(sources):
    texts.update(_BUILDERS[source]())
  texts = dict(sorted(texts.items()))
  if max_chars is not None:
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
      raise ValueError(f"max_chars={max_chars!r}: expected None or an int >= 1.")
    kept, total = {}, 0
    for name, text in texts.items():
      if total >= max_chars:
        break
      kept[name] = text[:max_chars - total]
      total += len(kept[name])
    texts = kept
  return texts


def is_heldout(name: str, holdout: float) -> bool:
  return hashlib.sha256(name.encode("utf-8")).digest()[0] < holdout * 256


def split_texts(texts: dict[str, str], holdout: float) -> tuple[dict, dict]:
  """(train, heldout) documents (module docstring); ValueError when a side is empty."""
  if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not (
      0 < holdout < 1):
    raise ValueError(f"holdout={holdout!r}: expected a fraction in (0, 1).")
  held = {n: t for n, t in texts.items() if is_heldout(n, holdout)}
  train = {n: t for n, t in texts.items() if n not in held}
  if not held or not train:
    raise ValueError(f"holdout={holdout}: the split of {len(texts)} documents leaves "
                     f"{len(train)} for training and {len(held)} held out; use more text "
                     "(max_chars) or another fraction.")
  return train, held


def dedupe_heldout(train: dict[str, str], held: dict[str, str],
                   min_chars: int = 16) -> dict[str, str]:
  """The held-out documents without their lines that also occur in a training document
  (stripped, at least min_chars long: shared boilerplate, copied paragraphs, repeated
  help text), and without documents left empty: held-out text must not be trained on."""
  seen = {line.strip() for text in train.values() for line in text.splitlines()
          if len(line.strip()) >= min_chars}
  out = {}
  for name, text in held.items():
    kept = "\n".join(line for line in text.splitlines() if line.strip() not in seen)
    if kept.strip():
      out[name] = kept
  return out


def eos_id(tokenizer) -> Optional[int]:
  """The tokenizer's end-of-text id (EOS_TOKENS, in order), or None."""
  if tokenizer is None:
    return None
  for token in EOS_TOKENS:
    tid = tokenizer.token_to_id(token)
    if tid is not None:
      return int(tid)
  return None


def tokenize(texts: dict[str, str], encode: Callable[[str], list[int]],
             end: Optional[int]) -> np.ndarray:
  """int32 ids of the documents in name order, each followed by `end` (when not None)."""
  ids = []
  for _, text in sorted(texts.items()):
    ids.extend(encode(text))
    if end is not None:
      ids.append(end)
  return np.asarray(ids, np.int32)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Tokenised train / held-out sides of the offline corpus."""
  train: np.ndarray          # int32 [N_train]
  heldout: np.ndarray        # int32 [N_heldout]
  digest: str                # sha256 of the documents (names and texts), hex
  documents: tuple[int, int]  # (train, held-out) document counts
  chars: int

  def describe(self) -> dict:
    return {"digest": self.digest, "train_tokens": int(self.train.size),
            "heldout_tokens": int(self.heldout.size), "train_documents": self.documents[0],
            "heldout_documents": self.documents[1], "chars": self.chars}


def texts_digest(texts: dict[str, str]) -> str:
  h = hashlib.sha256()
  for name, text in sorted(texts.items()):
    h.update(name.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
  return h.hexdigest()


def build_corpus(encode: Callable[[str], list[int]], end: Optional[int], *,
                 sources: Sequence[str] = SOURCES, max_chars: Optional[int] = None,
                 holdout: float = 0.1) -> Corpus:
  texts = offline_texts(sources, max_chars)
  train, held = split_texts(texts, holdout)
  held = dedupe_heldout(train, held)
  if not held:
    raise ValueError(f"holdout={holdout}: every held-out line also occurs in the training "
                     "documents; use more text (max_chars) or another fraction.")
  return Corpus(train=tokenize(train, encode, end), heldout=tokenize(held, encode, end),
                digest=texts_digest(texts), documents=(len(train), len(held)),
                chars=sum(len(t) for t in texts.values()))


def check_windows(tokens: np.ndarray, length: int, what: str) -> None:
  if tokens.size < length + 1:
    raise ValueError(f"{what}: {tokens.size} tokens, fewer than one window of {length} + 1; "
                     "use more text (data.max_chars) or a shorter data.seq_len.")


def sample_windows(tokens: np.ndarray, step: int, *, batch: int, length: int,
                   seed: int) -> np.ndarray:
  """[batch, length + 1] windows at random offsets, a function of (seed, step) alone: a
  resumed run draws the same batches."""
  check_windows(tokens, length, "train tokens")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, tokens.size - length, batch)
  return np.stack([tokens[s:s + length + 1] for s in starts])


def spaced_windows(tokens: np.ndarray, num: int, length: int) -> np.ndarray:
  """[num, length + 1] windows evenly spaced over the tokens (evaluation)."""
  check_windows(tokens, length, "held-out tokens")
  starts = np.linspace(0, tokens.size - length - 1, num).astype(np.int64)
  return np.stack([tokens[s:s + length + 1] for s in starts])
