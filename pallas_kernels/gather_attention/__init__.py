"""Gather attention: softmax attention of each query over a list of selected key rows.

See `reference.py` for the exact semantics; `api.gather_attention` is the entry point.
"""

from pallas_kernels.gather_attention.api import IMPLEMENTATIONS, gather_attention

__all__ = ["IMPLEMENTATIONS", "gather_attention"]
