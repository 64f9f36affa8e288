"""condensate-jax: condensate attention (anchor + window + dynamic top-k) in JAX.

Public API (DESIGN.md §3):
  CondensateSpec, dense_attention, condensate_attention, AttentionStats.
"""

from condensate_jax.attention import (IMPLEMENTATIONS, attend, condensate_attention,
                                      condensate_mask,
                                      dense_attention, register_implementation)
from condensate_jax.selection import AttentionStats
from condensate_jax.spec import CondensateSpec

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "CondensateSpec",
    "IMPLEMENTATIONS",
    "attend",
    "condensate_attention",
    "condensate_mask",
    "dense_attention",
    "register_implementation",
]
