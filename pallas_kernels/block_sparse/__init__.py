"""Block-sparse attention kernels (the block fast path of condensate attention).

block_decode: split-K decode over a list of key blocks per (query, K/V group) plus the
anchor and window ranges; block_prefill: block-sparse causal flash attention over a list
of key blocks per query block. `reference.py` is the spec; `api.py` the entry points.
"""

from pallas_kernels.block_sparse.api import block_decode, block_prefill, combine

__all__ = ["block_decode", "block_prefill", "combine"]
