"""condensate-jax: condensate attention (anchor + window + dynamic top-k) in JAX.

Public API (DESIGN.md §3):
  CondensateSpec, dense_attention, condensate_attention, AttentionStats.
"""

from condensate_jax.attention import (IMPLEMENTATIONS, attend, condensate_attention,
                                      condensate_mask,
                                      dense_attention, register_implementation)
from condensate_jax.selection import AttentionStats
from condensate_jax.spec import CondensateSpec
from condensate_jax.weights.registry import LanguageModel, load_model

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "CondensateSpec",
    "IMPLEMENTATIONS",
    "LanguageModel",
    "attend",
    "condensate_attention",
    "condensate_mask",
    "dense_attention",
    "load_model",
    "register_implementation",
]
