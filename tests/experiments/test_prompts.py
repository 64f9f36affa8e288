import json

import pytest

from experiments import prompts


def _encode(text):
  return list(text.encode("utf-8"))


def test_builtin_prompts_have_exact_lengths_and_differ():
  built = prompts.build_prompts(prompts.BUILTIN_TEXTS, _encode, num=4, lengths=(50, 3000))
  assert [p.length for p in built] == [50] * 4 + [3000] * 4
  assert all(len(p.tokens) == p.length for p in built)
  assert len({p.tokens for p in built}) == 8
  assert [p.source for p in built[:4]] == list(prompts.BUILTIN_TEXTS)[:4]
  first = prompts.BUILTIN_TEXTS["prose"]
  assert bytes(built[4].tokens[:len(first)]).decode() == first  # then the next texts
  assert bytes(built[4].tokens[len(first):len(first) + 2]) == b"\n\n"


def test_builtin_texts_are_varied_and_substantial():
  assert {"prose", "code", "list", "dialogue"} <= set(prompts.BUILTIN_TEXTS)
  assert all(len(t) > 800 for t in prompts.BUILTIN_TEXTS.values())


def test_prompts_longer_than_the_corpus_cycle_through_it():
  texts = {"a": "xy", "b": "z"}
  (p,) = prompts.build_prompts(texts, _encode, num=1, lengths=(12,))
  assert bytes(p.tokens) == b"xy\n\nz\n\nxy\n\nz"[:12]


def test_read_texts_from_txt_and_jsonl(tmp_path):
  (tmp_path / "one.txt").write_text("plain text")
  (tmp_path / "many.jsonl").write_text(
      json.dumps({"id": "q1", "body": "first"}) + "\n\n" + json.dumps({"body": "second"}))
  texts = prompts.read_texts([str(tmp_path / "one.txt"), str(tmp_path / "many.jsonl")],
                             jsonl_field="body")
  assert texts == {"one": "plain text", "q1": "first", "many:3": "second"}


def test_read_texts_errors(tmp_path):
  with pytest.raises(ValueError, match="no such file"):
    prompts.read_texts([str(tmp_path / "missing.txt")])
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
  with pytest.raises(ValueError, match="line 2"):
    prompts.read_texts([str(tmp_path / "bad.jsonl")])
  with pytest.raises(ValueError, match="prompts.num"):
    prompts.build_prompts({"a": "x"}, _encode, num=2, lengths=(4,))


def test_config_picks_builtin_texts_by_name():
  import types

  from experiments import cli, parity
  from experiments.errors import ConfigError
  lm = types.SimpleNamespace(encode=_encode, max_length=4096)
  config = cli.load_config("smollm2_indexed.py:size=cpu,text=code")
  (prompt,) = parity.make_prompts(config, lm)
  code = _encode(prompts.BUILTIN_TEXTS["code"])
  assert prompt.source == "code" and prompt.length == 2048
  assert list(prompt.tokens) == ((code + _encode("\n\n")) * 8)[:2048]   # code, repeated
  config.prompts.builtin = "code,nope"
  with pytest.raises(ConfigError, match="prompts.builtin='code,nope'"):
    parity.make_prompts(config, lm)
