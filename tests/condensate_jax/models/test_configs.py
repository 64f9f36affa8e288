"""from_hf_config on config.json contents as the hub serves them (older layouts), vs presets."""

from __future__ import annotations

import pytest

from condensate_jax.models import Gemma3Config, GPT2Config, LlamaConfig, NeoXConfig
from condensate_jax.weights.hf import config_from_hf

COMMON = {"architectures": ["X"], "bos_token_id": 1, "eos_token_id": 2,
          "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True,
          "transformers_version": "4.40.0"}

HUB = {
    "gpt2-medium": ({**COMMON, "activation_function": "gelu_new", "attn_pdrop": 0.1,
                     "embd_pdrop": 0.1, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
                     "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24,
                     "n_positions": 1024, "n_special": 0, "predict_special_tokens": True,
                     "resid_pdrop": 0.1, "summary_activation": None,
                     "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
                     "summary_type": "cls_index", "summary_use_proj": True,
                     "task_specific_params": {"text-generation": {"do_sample": True}},
                     "vocab_size": 50257}, GPT2Config.gpt2_medium()),
    "pythia-70m": ({**COMMON, "hidden_act": "gelu", "hidden_size": 512,
                    "intermediate_size": 2048, "layer_norm_eps": 1e-05,
                    "max_position_embeddings": 2048, "model_type": "gpt_neox",
                    "num_attention_heads": 8, "num_hidden_layers": 6,
                    "rotary_emb_base": 10000, "rotary_pct": 0.25,
                    "tie_word_embeddings": False, "use_parallel_residual": True,
                    "vocab_size": 50304}, NeoXConfig.pythia_70m()),
    "Qwen2-0.5B": ({**COMMON, "attention_dropout": 0.0, "hidden_act": "silu",
                    "hidden_size": 896, "intermediate_size": 4864,
                    "max_position_embeddings": 131072, "max_window_layers": 24,
                    "model_type": "qwen2", "num_attention_heads": 14,
                    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
                    "rope_theta": 1000000.0, "sliding_window": 131072,
                    "tie_word_embeddings": True, "use_sliding_window": False,
                    "vocab_size": 151936}, LlamaConfig.qwen2_0_5b()),
    "TinyLlama-1.1B-Chat": ({**COMMON, "hidden_act": "silu", "hidden_size": 2048,
                             "intermediate_size": 5632, "max_position_embeddings": 2048,
                             "model_type": "llama", "num_attention_heads": 32,
                             "num_hidden_layers": 22, "num_key_value_heads": 4,
                             "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                             "rope_scaling": None, "rope_theta": 10000.0,
                             "tie_word_embeddings": False, "vocab_size": 32000},
                            LlamaConfig.tinyllama_1_1b()),
    "Mistral-7B-v0.1": ({**COMMON, "hidden_act": "silu", "hidden_size": 4096,
                         "intermediate_size": 14336, "max_position_embeddings": 32768,
                         "model_type": "mistral", "num_attention_heads": 32,
                         "num_hidden_layers": 32, "num_key_value_heads": 8,
                         "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
                         "sliding_window": 4096, "tie_word_embeddings": False,
                         "vocab_size": 32000}, LlamaConfig.mistral_7b()),
    "SmolLM2-135M": ({**COMMON, "attention_bias": False, "hidden_act": "silu",
                      "hidden_size": 576, "intermediate_size": 1536,
                      "max_position_embeddings": 8192, "mlp_bias": False,
                      "model_type": "llama", "num_attention_heads": 9,
                      "num_hidden_layers": 30, "num_key_value_heads": 3,
                      "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
                      "rope_theta": 100000, "tie_word_embeddings": True,
                      "vocab_size": 49152}, LlamaConfig.smollm2_135m()),
    "gemma-3-270m": ({**COMMON, "_sliding_window_pattern": 6, "attention_bias": False,
                      "attention_dropout": 0.0, "attn_logit_softcapping": None,
                      "final_logit_softcapping": None, "head_dim": 256,
                      "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
                      "intermediate_size": 2048,
                      "layer_types": list(Gemma3Config.pattern(18)),
                      "max_position_embeddings": 32768, "model_type": "gemma3_text",
                      "num_attention_heads": 4, "num_hidden_layers": 18,
                      "num_key_value_heads": 1, "pad_token_id": 0,
                      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
                      "rope_local_base_freq": 10000.0, "rope_scaling": None,
                      "rope_theta": 1000000.0, "sliding_window": 512,
                      "use_bidirectional_attention": False, "vocab_size": 262144},
                     Gemma3Config.gemma3_270m()),
}


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_config_matches_preset(name):
  hf, preset = HUB[name]
  assert config_from_hf(hf) == preset


@pytest.mark.parametrize("name", sorted(HUB))
def test_unknown_key_refused(name):
  hf, _ = HUB[name]
  with pytest.raises(ValueError, match=r"unknown keys \['new_feature_flag'\]"):
    config_from_hf({**hf, "new_feature_flag": True})


def test_llama3_scaling_and_qwen2_sliding_layers():
  hf, _ = HUB["TinyLlama-1.1B-Chat"]
  cfg = config_from_hf({**hf, "rope_scaling": {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
  assert cfg.rope.scaling == "llama3" and cfg.rope.factor == 8.0
  inv = cfg.rope.inv_freq()
  assert inv[0] == 1.0 and inv[-1] < LlamaConfig.tinyllama_1_1b().rope.inv_freq()[-1] / 7
  hf, _ = HUB["Qwen2-0.5B"]
  cfg = config_from_hf({**hf, "use_sliding_window": True, "sliding_window": 4096,
                        "max_window_layers": 20})
  assert [cfg.window(i) for i in (0, 19, 20, 23)] == [None, None, 4096, 4096]
