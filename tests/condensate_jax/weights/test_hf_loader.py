"""Loading checkpoints: hub layouts, sharding, older config layouts, and every error."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from condensate_jax.weights import hf as hf_loader  # noqa: E402
from condensate_jax.weights import registry, tiny  # noqa: E402
from condensate_jax.weights.registry import load_model  # noqa: E402
from tests.condensate_jax.models import hf_reference as ref  # noqa: E402

ATOL = 1e-4
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)


@pytest.fixture(scope="module")
def gpt2():
  return ref.hf_model("GPT2Config", seed=7, **GPT2)


@pytest.fixture(scope="module")
def gpt2_dir(gpt2, tmp_path_factory):
  return ref.save_dir(gpt2, tmp_path_factory.mktemp("gpt2"))


def _check(lm, model, t=16):
  tokens = ref.random_tokens(2, t, seed=5)
  np.testing.assert_allclose(np.asarray(lm.logits(tokens)), ref.hf_logits(model, tokens),
                             rtol=0, atol=ATOL)


def test_gpt2_hub_layout(gpt2, tmp_path):
  """As the hub stores gpt2: no `transformer.` prefix, Conv1D [in, out] weights, the
  attn.bias / attn.masked_bias buffers, no lm_head, the original config.json keys."""
  from safetensors.numpy import save_file
  tensors = {}
  for k, v in gpt2.state_dict().items():
    if k == "lm_head.weight":
      continue
    tensors[k.removeprefix("transformer.")] = v.numpy().copy()
  n = GPT2["n_positions"]
  for i in range(GPT2["n_layer"]):
    tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
    tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  assert tensors["h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  config = {  # the keys of openai-community/gpt2's config.json
      "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
      "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
      "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
      "n_ctx": n, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": n,
      "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
      "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
      "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
      "vocab_size": ref.VOCAB}
  (tmp_path / "config.json").write_text(json.dumps(config))
  tiny.byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
  _check(load_model(tmp_path), gpt2)


def test_sharded_checkpoint(tmp_path):
  model = ref.hf_model("LlamaConfig", seed=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=64)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
  tiny.byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  _check(load_model(tmp_path), model)


def _old_neox(cfg):
  rope = cfg.pop("rope_parameters")
  cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"],
             rope_scaling=None, torch_dtype="float32", transformers_version="4.29.2")
  return cfg


def _old_gemma3(cfg):
  rope = cfg.pop("rope_parameters")
  cfg.pop("layer_types")
  cfg.update(rope_theta=rope["full_attention"]["rope_theta"],
             rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
             rope_scaling=None, sliding_window_pattern=2, torch_dtype="bfloat16")
  return cfg


def _old_llama(cfg):
  rope = cfg.pop("rope_parameters")
  cfg.update(rope_theta=rope.pop("rope_theta"), pretraining_tp=1,
             rope_scaling={"type" if rope["rope_type"] == "linear" else "rope_type":
                           rope.pop("rope_type"), **rope})
  return cfg


def _old_qwen2(cfg):
  rope = cfg.pop("rope_parameters")
  cfg.pop("layer_types")
  cfg.update(rope_theta=rope["rope_theta"], use_sliding_window=False, sliding_window=8,
             max_window_layers=1, torch_dtype="bfloat16")
  return cfg


OLD_LAYOUTS = {
    "neox": ("GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64,
                                   rope_parameters=dict(rope_type="default",
                                                        rope_theta=1000.0,
                                                        partial_rotary_factor=0.25)),
             _old_neox),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, intermediate_size=64,
                                        max_position_embeddings=64, sliding_window=5,
                                        query_pre_attn_scalar=16,
                                        layer_types=["sliding_attention",
                                                     "full_attention"]),
               _old_gemma3),
    "llama_linear": ("LlamaConfig", dict(hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=64,
                                         rope_parameters=dict(rope_type="linear",
                                                              rope_theta=10000.0,
                                                              factor=2.0)),
                     _old_llama),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=64, max_position_embeddings=64),
              _old_qwen2),
}


@pytest.mark.parametrize("name", sorted(OLD_LAYOUTS))
def test_older_config_layout(name, tmp_path):
  """config.json rewritten in the layout older hub checkpoints use: same logits."""
  cls, kwargs, edit = OLD_LAYOUTS[name]
  model = ref.hf_model(cls, seed=11, **kwargs)
  d = ref.save_dir(model, tmp_path, config_edit=edit)
  cfg = json.loads((d / "config.json").read_text())
  assert "rope_parameters" not in cfg
  _check(load_model(d), model)


# ----------------------------------------------------------------------------- errors


def _copy_dir(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_directory_without_tokenizer_takes_ids(gpt2, gpt2_dir, tmp_path):
  """No tokenizer.json (nor vocab.json + merges.txt): ids in, logits out; encode and
  decode say why they cannot work."""
  d = _copy_dir(gpt2_dir, tmp_path / "m")
  (d / "tokenizer.json").unlink()
  lm = load_model(d)
  assert lm.tokenizer is None
  _check(lm, gpt2)
  assert lm.generate(ref.random_tokens(1, 5, seed=1), 3).shape == (1, 3)
  for call in (lambda: lm.encode("hi"), lambda: lm.decode([1, 2])):
    with pytest.raises(ValueError, match="loaded without a tokenizer"):
      call()


def _gpt2_era_files(d, vocab_size=300):
  """A small byte-level BPE trained here, saved as GPT-2 saves it (vocab.json +
  merges.txt, <|endoftext|> in the vocab)."""
  import tokenizers
  bpe = tokenizers.ByteLevelBPETokenizer()
  text = ["the quick brown fox jumps over the lazy dog " * 3,
          "condensate attention keeps an anchor, a window and a top-k " * 3,
          "Grüße, world! 1234 5678"]
  bpe.train_from_iterator(text, vocab_size=vocab_size, min_frequency=1,
                          special_tokens=["<|endoftext|>"], show_progress=False)
  bpe.save_model(str(d))
  return sorted(p.name for p in d.iterdir())


def test_gpt2_era_vocab_and_merges_match_transformers(tmp_path):
  """vocab.json + merges.txt load as a byte-level BPE that tokenizes exactly as
  transformers' GPT2Tokenizer does on the same files (its own reading of them)."""
  import transformers
  from condensate_jax.weights import hf as loader
  files = _gpt2_era_files(tmp_path)
  assert files == ["merges.txt", "vocab.json"]
  tok = loader.load_tokenizer(tmp_path)
  want = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"),
                                    str(tmp_path / "merges.txt"))
  for text in ("the lazy fox", " condensate  attention\n\ttop-k", "Grüße 🙂 1234",
               "a<|endoftext|>b", ""):
    ids = tok.encode(text).ids
    assert ids == want.encode(text), text
    assert tok.decode(ids, skip_special_tokens=False) == text
  (tmp_path / "merges.txt").unlink()
  with pytest.raises(loader.CheckpointFileError, match="has vocab.json but not merges.txt"):
    loader.load_tokenizer(tmp_path)


def test_gpt2_era_directory_loads(gpt2, gpt2_dir, tmp_path):
  d = _copy_dir(gpt2_dir, tmp_path / "m")
  (d / "tokenizer.json").unlink()
  _gpt2_era_files(d, vocab_size=ref.VOCAB)   # the model's 258 ids
  lm = load_model(d)
  ids = lm.encode("the quick brown fox")
  assert lm.decode(ids) == "the quick brown fox" and max(ids) < ref.VOCAB
  _check(lm, gpt2)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_files(gpt2_dir, tmp_path, missing):
  d = _copy_dir(gpt2_dir, tmp_path / "m")
  (d / missing).unlink()
  with pytest.raises(hf_loader.CheckpointFileError, match=missing.split(".")[0]):
    load_model(d)


def test_unknown_config_key(gpt2_dir, tmp_path):
  d = _copy_dir(gpt2_dir, tmp_path / "m")
  cfg = json.loads((d / "config.json").read_text())
  cfg["n_experts_magic"] = 4
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"unknown keys \['n_experts_magic'\]"):
    load_model(d)


@pytest.mark.parametrize("keep", [4, 200, -100])
def test_truncated_safetensors(gpt2_dir, tmp_path, keep):
  d = _copy_dir(gpt2_dir, tmp_path / "m")
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:keep] if keep > 0 else data[:keep])
  with pytest.raises(hf_loader.CheckpointFileError, match="truncated"):
    load_model(d)


def test_mapping_errors_are_collected(gpt2, tmp_path):
  """A shape mismatch, a missing tensor and an unexpected key: one error lists all."""
  from safetensors.numpy import save_file
  tensors = {k: v.numpy().copy() for k, v in gpt2.state_dict().items()}
  tensors["transformer.h.1.mlp.c_fc.weight"] = np.zeros((32, 100), np.float32)
  del tensors["transformer.h.0.ln_1.bias"]
  tensors["transformer.h.0.attn.rotary_magic"] = np.zeros((3,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  gpt2.config.to_json_file(str(tmp_path / "config.json"))
  tiny.byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(hf_loader.WeightLoadError) as info:
    load_model(tmp_path)
  msg = str(info.value)
  assert "3 problem(s)" in msg
  assert "shape mismatch for 'transformer.h.1.mlp.c_fc.weight'" in msg and "(32, 100)" in msg
  assert "missing parameter 'layers/0/ln_1/bias_d'" in msg
  assert "unexpected key 'transformer.h.0.attn.rotary_magic'" in msg


def test_unsupported_config_values():
  base = dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)
  with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
    hf_loader.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
  with pytest.raises(ValueError, match="model_type='bert'"):
    hf_loader.config_from_hf({**base, "model_type": "bert"})
  with pytest.raises(ValueError, match="missing 'hidden_size'"):
    hf_loader.config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
  with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
    hf_loader.config_from_hf(dict(
        model_type="gemma3_text", vocab_size=10, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, head_dim=4, intermediate_size=16, sliding_window=4,
        max_position_embeddings=32, query_pre_attn_scalar=4, attn_logit_softcapping=50.0))


# ------------------------------------------------------------------------------- hub


def test_hub_offline_error(tmp_path, monkeypatch):
  """No cached copy and an unreachable endpoint: an OSError listing the offline options."""
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
  with pytest.raises(registry.HubUnavailableError) as info:
    load_model("EleutherAI/pythia-70m")
  assert isinstance(info.value, OSError)
  msg = str(info.value)
  for option in ("smollm2-135m", "local directory", ".gguf"):
    assert option in msg


def test_hub_uses_local_cache_first(gpt2_dir, gpt2, monkeypatch):
  import huggingface_hub
  calls = []

  def fake_snapshot_download(repo_id, **kwargs):
    calls.append((repo_id, kwargs.get("local_files_only")))
    return str(gpt2_dir)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  _check(load_model("gpt2"), gpt2)
  assert calls == [("gpt2", True)]


def test_bad_names():
  with pytest.raises(ValueError, match="tiny-random-<family>"):
    load_model("tiny-random-bert")
  with pytest.raises(ValueError, match="name_or_path=3"):
    load_model(3)
  with pytest.raises(ValueError, match="dtype='float8'"):
    load_model("tiny-random", dtype="float8")
  with pytest.raises(hf_loader.CheckpointFileError, match="GGUF file not found"):
    load_model("/nonexistent/model.gguf")
