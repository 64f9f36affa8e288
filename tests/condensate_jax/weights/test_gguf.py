"""GGUF reader on tiny files written here with gguf.GGUFWriter (offline, a few seconds).

References: the HF-layout tensors the file was written from (exact for F32, within the format's
rounding for F16/Q8_0), and `transformers`' own GGUF loading of the same file (model state_dict
and tokenizer), which must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from condensate_jax.weights.gguf import SUPPORTED_ARCHITECTURES, load_gguf
from tests.condensate_jax.weights.tiny_gguf import write_tiny_gguf

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   ",
    "def main():\n    return 0  # done\n",
    "Ünïcödé café naïve 日本語 🙂🙃 and unseen ǅ ℵ",
    "numbers 123 4567, 89.5%",
    "<|im_start|>user\nhello there<|im_end|>\n",
    "<s>the</s> theory of the thing <unk> <0x41>",
    "",
    " ",
]

CASES = [  # (arch, weight type, tokenizer kind, tied embeddings)
    ("llama", "F32", "gpt2", False),
    ("llama", "F16", "llama", True),
    ("llama", "Q8_0", "gpt2", True),
    ("gemma3", "F32", "llama", True),
    ("gemma3", "Q8_0", "gpt2", True),
    ("qwen2", "F32", "gpt2", False),
]
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "Q8_0": 1.2e-2}  # weights ~N(0, 0.5): |w| < 3.5


@pytest.fixture(scope="module")
def transformers_mod():
  return pytest.importorskip("transformers")


@pytest.mark.parametrize("arch,qtype,tokenizer,tied", CASES)
def test_tensors_config_tokenizer(tmp_path, transformers_mod, arch, qtype, tokenizer, tied):
  import torch
  path = tmp_path / f"tiny-{arch}-{qtype}.gguf"
  hf = write_tiny_gguf(path, arch, qtype=qtype, tokenizer=tokenizer, tied=tied, seed=1)
  config, tensors, tok = load_gguf(path)

  # Names and values against the tensors the file was written from.
  assert set(tensors) == set(hf)
  for name, value in tensors.items():
    assert value.dtype == np.float32 and value.shape == hf[name].shape, name
    if name.endswith("norm.weight"):  # norms stay F32; Gemma's w+1-1 costs one rounding
      atol = 2.5e-7 if arch == "gemma3" else 0.0
    else:
      atol = TOLERANCE[qtype]
    np.testing.assert_allclose(value, hf[name], rtol=0, atol=atol, err_msg=name)

  # Exactly what transformers' GGUF loader produces from the same file.
  model = transformers_mod.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file=path.name, dtype=torch.float32)
  reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  for name, value in tensors.items():
    np.testing.assert_array_equal(value, reference[name], err_msg=name)
  assert set(reference) - set(tensors) == ({"lm_head.weight"} if tied else set())
  assert any(n.endswith("q_proj.bias") for n in tensors) is (arch == "qwen2")

  assert config["model_type"] == {"gemma3": "gemma3_text"}.get(arch, arch)
  assert config["tie_word_embeddings"] is tied
  assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (
      64, 2, 96)
  assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
      4, 2, 16)
  assert config["vocab_size"] == tensors["model.embed_tokens.weight"].shape[0]
  hf_config = model.config
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "vocab_size",
              "bos_token_id", "eos_token_id", "tie_word_embeddings"):
    assert config[key] == getattr(hf_config, key), key
  assert config["head_dim"] == (getattr(hf_config, "head_dim", None) or 64 // 4)  # Qwen2 derives it
  assert config["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)
  if arch == "gemma3":
    assert config["sliding_window"] == hf_config.sliding_window == 8
    assert config["layer_types"] == ["sliding_attention"] * 2  # the 6th layer would be global
    assert config["query_pre_attn_scalar"] == 16 and config["rope_theta"] == 1e6

  reference_tok = transformers_mod.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
  for text in TEXTS:
    ids = tok.encode(text).ids
    assert ids == reference_tok.encode(text), text
    if ids:
      assert tok.decode(ids, skip_special_tokens=False) == reference_tok.decode(ids), text
  bos = tok.encode("the").ids[0] == 1
  assert bos is (tokenizer == "llama")  # SentencePiece vocabularies add BOS unless told not to


def test_llama_qk_rows_are_unpermuted(tmp_path):
  import gguf
  path = tmp_path / "t.gguf"
  hf = write_tiny_gguf(path, "llama", seed=2)
  stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
  _, tensors, _ = load_gguf(path)
  for layer in (0, 1):
    for gguf_leaf, hf_leaf in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
      raw = stored[f"blk.{layer}.{gguf_leaf}.weight"]
      ours = tensors[f"model.layers.{layer}.self_attn.{hf_leaf}.weight"]
      expected = hf[f"model.layers.{layer}.self_attn.{hf_leaf}.weight"]
      np.testing.assert_array_equal(ours, expected)
      # The file really stores q/k rows in another order (v untouched), so this can fail.
      assert np.array_equal(raw, expected) is (gguf_leaf == "attn_v")
      assert sorted(map(tuple, raw)) == sorted(map(tuple, expected))  # a row permutation


@pytest.mark.parametrize("kind,factor", [("linear", 4.0), ("yarn", 2.0)])
def test_rope_scaling(tmp_path, kind, factor):
  path = tmp_path / "rope.gguf"
  write_tiny_gguf(path, "llama", rope_scaling=(kind, factor, 64))
  config, _, _ = load_gguf(path)
  assert config["rope_scaling"] == {"rope_type": kind, "factor": factor,
                                    "original_max_position_embeddings": 64}
  write_tiny_gguf(path, "llama")
  assert load_gguf(path)[0]["rope_scaling"] is None


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"])
def test_dequantize_types(tmp_path, qtype):
  import gguf
  from condensate_jax.weights.gguf import _dequantize
  kind = gguf.GGMLQuantizationType[qtype]
  x = np.random.default_rng(3).normal(size=(3, 256)).astype(np.float32)
  q = gguf.quants.quantize(x, kind)
  w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
  w.add_tensor("t", q, raw_dtype=None if qtype == "F16" else kind)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  (tensor,) = gguf.GGUFReader(tmp_path / "q.gguf").tensors
  assert tensor.tensor_type == kind
  got = _dequantize(tensor)
  assert got.shape == (3, 256) and got.dtype == np.float32
  np.testing.assert_array_equal(got, gguf.quants.dequantize(q, kind).reshape(3, 256))
  assert np.abs(got - x).max() < 0.25 * np.abs(x).max()  # within the format's precision


def test_unsupported_architecture(tmp_path):
  path = tmp_path / "gpt2arch.gguf"
  write_tiny_gguf(path, "llama", declared_arch="gptneox")
  with pytest.raises(ValueError, match=r"'gptneox'.*llama, qwen2, gemma3"):
    load_gguf(path)
  assert SUPPORTED_ARCHITECTURES == ("llama", "qwen2", "gemma3")


def test_unsupported_tensor_type(tmp_path):
  path = tmp_path / "int.gguf"
  write_tiny_gguf(path, "llama", extra_tensors={
      "blk.0.attn_q.bias": np.arange(64, dtype=np.int32)})
  with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.bias.*I32"):
    load_gguf(path)


def test_unknown_tensor_name(tmp_path):
  path = tmp_path / "extra.gguf"
  write_tiny_gguf(path, "llama", extra_tensors={"blk.0.mystery.weight": np.ones(4, np.float32)})
  with pytest.raises(ValueError, match=r"blk\.0\.mystery\.weight"):
    load_gguf(path)


@pytest.mark.parametrize("keep", [0.98, 0.5, 0.02])
def test_truncated_file(tmp_path, keep):
  path = tmp_path / "full.gguf"
  write_tiny_gguf(path, "llama", qtype="Q8_0")
  data = path.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(ValueError, match="truncated"):
    load_gguf(cut)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.gguf"):
    load_gguf(tmp_path / "nothere.gguf")
