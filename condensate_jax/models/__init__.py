"""Flax NNX model families (DESIGN.md §6).

FAMILIES maps a family name to its module; each module defines a frozen config dataclass
(presets as classmethods, `from_hf_config`), `Model(cfg, dtype, rngs=...)`, and the table
`HF_KEYS` from transformers checkpoint keys to module paths.
"""

from __future__ import annotations

from condensate_jax.models import gemma3, gpt2, gpt_neox, llamalike
from condensate_jax.models.kv_cache import KVCache
from condensate_jax.models.gemma3 import Gemma3Config
from condensate_jax.models.gpt2 import GPT2Config
from condensate_jax.models.gpt_neox import NeoXConfig
from condensate_jax.models.llamalike import LlamaConfig

FAMILIES = {"gpt2": gpt2, "gpt_neox": gpt_neox, "llamalike": llamalike, "gemma3": gemma3}
CONFIG_CLASSES = {"gpt2": GPT2Config, "gpt_neox": NeoXConfig, "llamalike": LlamaConfig,
                  "gemma3": Gemma3Config}


def family_of_config(cfg) -> str:
  for name, cls in CONFIG_CLASSES.items():
    if isinstance(cfg, cls):
      return name
  raise ValueError(f"config of type {type(cfg).__name__}: expected one of "
                   f"{[c.__name__ for c in CONFIG_CLASSES.values()]}.")


def family_of_model_type(model_type) -> str:
  """HF `model_type` -> family name."""
  for name, module in FAMILIES.items():
    if model_type in module.HF_MODEL_TYPES:
      return name
  known = sorted(t for m in FAMILIES.values() for t in m.HF_MODEL_TYPES)
  raise ValueError(f"model_type={model_type!r}: unsupported; expected one of {known}.")


__all__ = ["FAMILIES", "CONFIG_CLASSES", "KVCache", "GPT2Config", "NeoXConfig",
           "LlamaConfig", "Gemma3Config", "family_of_config", "family_of_model_type"]
