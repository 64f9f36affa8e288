"""Block bounds: per-block upper bounds (and centre scores) of decode queries against the
min / max summaries of key blocks, masked to blocks holding middle keys.

See `reference.py` for the exact semantics; `api.block_bounds` is the entry point.
"""

from pallas_kernels.block_bounds.api import IMPLEMENTATIONS, block_bounds

__all__ = ["IMPLEMENTATIONS", "block_bounds"]
