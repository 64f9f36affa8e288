"""Index scan: the key-index estimates of decode queries (selection="indexed"), every key
read once as packed low-bit codes, masked to middle keys.

See `reference.py` for the exact semantics; `api.index_scan` is the entry point.
"""

from pallas_kernels.index_scan.api import IMPLEMENTATIONS, index_scan
from pallas_kernels.index_scan.reference import levels, unpack

__all__ = ["IMPLEMENTATIONS", "index_scan", "levels", "unpack"]
