"""HF config key tables: keys every family ignores, and the refusal of unknown keys."""

from __future__ import annotations

# ------------------------------------------------------------------- HF config keys

# Keys of HF configs that carry no information for inference (training, tokens, bookkeeping).
COMMON_IGNORED = frozenset({
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "id2label", "label2id",
    "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "attention_dropout", "hidden_dropout", "classifier_dropout", "attn_pdrop",
    "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "task_specific_params",
    "tokenizer_class", "prefix", "finetuning_task", "tie_encoder_decoder",
    "pruned_heads", "torchscript", "output_scores", "return_dict_in_generate",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "diversity_penalty",
    "num_beam_groups", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "encoder_no_repeat_ngram_size", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "quantization_config", "model_type",
    "_attn_implementation_autoset", "_attn_implementation", "pretraining_tp",
    "gradient_checkpointing", "use_memory_efficient_attention", "_commit_hash",
})


def check_hf_keys(hf: dict, handled: set, ignored: set, family: str) -> None:
  """Refuses HF config keys neither handled nor deliberately ignored."""
  unknown = sorted(set(hf) - set(handled) - set(ignored) - COMMON_IGNORED)
  if unknown:
    raise ValueError(
        f"HF config for family {family!r} has unknown keys {unknown}: refusing to guess "
        "their meaning (add them to the family's handled or ignored keys).")


def require(hf: dict, key: str, family: str, *alternatives: str):
  for k in (key,) + alternatives:
    if k in hf and hf[k] is not None:
      return hf[k]
  names = " or ".join(repr(k) for k in (key,) + alternatives)
  raise ValueError(f"HF config for family {family!r}: missing {names}.")
