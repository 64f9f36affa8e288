"""The offline corpus: sources, the stable held-out split, deterministic windows."""

import numpy as np
import pytest

from condensate_jax.train import corpus
from condensate_jax.weights.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def texts():
  return corpus.offline_texts(max_chars=200_000)


def test_sources_are_prose_of_python_itself(texts):
  full = corpus.offline_texts(("pydoc_topics",))
  assert len(full) > 50 and sum(map(len, full.values())) > 100_000
  assert all(name.startswith("pydoc/") for name in full)
  doc = corpus.offline_texts(("stdlib_docstrings",), max_chars=50_000)
  assert doc and all(name.startswith("stdlib/") for name in doc)
  assert not any("/test/" in name or name.startswith("stdlib/test/") for name in doc)
  assert sum(map(len, texts.values())) == 200_000


def test_split_is_disjoint_stable_and_independent_of_the_other_documents(texts):
  train, held = corpus.split_texts(texts, 0.1)
  assert set(train).isdisjoint(held) and set(train) | set(held) == set(texts)
  assert 0.02 < len(held) / len(texts) < 0.3
  # a document's side does not depend on which others exist
  some = dict(list(texts.items())[::3])
  train2, held2 = corpus.split_texts(some, 0.1)
  assert set(held2) == set(held) & set(some) and set(train2) == set(train) & set(some)


def test_heldout_lines_found_in_training_documents_are_dropped():
  train = {"a": "shared line of help text\nonly in train, long enough"}
  held = {"b": "shared line of help text\nonly held out, long enough\nok",
          "c": "shared line of help text"}
  out = corpus.dedupe_heldout(train, held)
  assert out == {"b": "only held out, long enough\nok"}    # short lines kept, c emptied
  texts = corpus.offline_texts(max_chars=400_000)
  tr, he = corpus.split_texts(texts, 0.1)
  lines = {line.strip() for t in tr.values() for line in t.splitlines()
           if len(line.strip()) >= 16}
  kept = corpus.dedupe_heldout(tr, he)
  assert not any(line.strip() in lines for t in kept.values() for line in t.splitlines()
                 if len(line.strip()) >= 16)


def test_tokens_end_documents_with_eos_and_build_is_reproducible():
  tok = byte_tokenizer()
  end = corpus.eos_id(tok)
  assert end == tok.token_to_id("<|endoftext|>")
  encode = lambda t: tok.encode(t).ids
  ids = corpus.tokenize({"b": "yz", "a": "x"}, encode, end)
  np.testing.assert_array_equal(ids, [ord("x"), end, ord("y"), ord("z"), end])
  a = corpus.build_corpus(encode, end, max_chars=30_000, holdout=0.2)
  b = corpus.build_corpus(encode, end, max_chars=30_000, holdout=0.2)
  assert a.digest == b.digest and np.array_equal(a.train, b.train)
  # bytes: at least one id per character (held-out lines shared with training dropped)
  assert a.train.size >= sum(map(len, corpus.split_texts(
      corpus.offline_texts(max_chars=30_000), 0.2)[0].values()))
  assert corpus.eos_id(None) is None


def test_windows_are_a_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.int32)
  w1 = corpus.sample_windows(tokens, 5, batch=3, length=16, seed=0)
  assert w1.shape == (3, 17)
  np.testing.assert_array_equal(w1[:, 1:] - w1[:, :-1], 1)   # contiguous windows
  np.testing.assert_array_equal(w1, corpus.sample_windows(tokens, 5, batch=3, length=16,
                                                          seed=0))
  assert not np.array_equal(w1, corpus.sample_windows(tokens, 6, batch=3, length=16, seed=0))
  assert not np.array_equal(w1, corpus.sample_windows(tokens, 5, batch=3, length=16, seed=1))
  spaced = corpus.spaced_windows(tokens, 4, 10)
  assert spaced.shape == (4, 11) and spaced[0, 0] == 0 and spaced[-1, -1] == 999


@pytest.mark.parametrize("call, match", [
    (lambda: corpus.offline_texts(("wikipedia",)), "sources"),
    (lambda: corpus.offline_texts(max_chars=0), "max_chars"),
    (lambda: corpus.split_texts({"a": "x"}, 1.5), "holdout"),
    (lambda: corpus.split_texts({"a": "x"}, 0.5), "split of 1 documents"),
    (lambda: corpus.sample_windows(np.arange(10), 0, batch=1, length=10, seed=0),
     "fewer than one window"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()
