"""condensate-jax: condensate attention (anchor + window + dynamic top-k) in JAX.

Public API (DESIGN.md §3):
  CondensateSpec, dense_attention, condensate_attention (one entry point for every
  selection mode; `summaries=` takes precomputed BlockSummaries), AttentionStats,
  load_model / LanguageModel, KVCache, block summaries (build/append/empty), the key
  index of selection="indexed" (KeyIndex, build_index, append_index; `index=`;
  PackedIndex / pack_index / append_packed: the layout the timed step
  `fast.indexed_decode_step` reads), `distributed` (the same calls over a device mesh).
The timed fast paths live in `condensate_jax.fast` (imported on demand: it loads the
Pallas kernels).
"""

from condensate_jax.attention import (BITWISE_DENSE, IMPLEMENTATIONS, attend,
                                      condensate_attention, condensate_mask,
                                      dense_attention, register_implementation)
from condensate_jax.lm import LanguageModel
from condensate_jax.models.kv_cache import KVCache
from condensate_jax import distributed
from condensate_jax.selection.index import (KeyIndex, PackedIndex, append_index,
                                            append_packed, build_index, pack_index)
from condensate_jax.selection.summaries import (BlockSummaries, append_summaries,
                                                build_summaries, empty_summaries)
from condensate_jax.softmax import AttentionStats
from condensate_jax.spec import CondensateSpec
from condensate_jax.weights.registry import HubUnavailableError, load_model

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "BITWISE_DENSE",
    "BlockSummaries",
    "CondensateSpec",
    "HubUnavailableError",
    "IMPLEMENTATIONS",
    "KVCache",
    "KeyIndex",
    "LanguageModel",
    "PackedIndex",
    "append_index",
    "append_packed",
    "append_summaries",
    "attend",
    "build_index",
    "build_summaries",
    "condensate_attention",
    "condensate_mask",
    "dense_attention",
    "distributed",
    "empty_summaries",
    "load_model",
    "pack_index",
    "register_implementation",
]
