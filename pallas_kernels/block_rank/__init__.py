"""Block rank selection: the top blocks per (batch, K/V head) by group score, in
`lax.top_k`'s order, without a sort (superblock_select, then rank_select).

See `reference.py` for the exact semantics; `api.py` holds the entry points.
"""

from pallas_kernels.block_rank.api import IMPLEMENTATIONS, rank_select, superblock_select

__all__ = ["IMPLEMENTATIONS", "rank_select", "superblock_select"]
