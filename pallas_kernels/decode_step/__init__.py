"""Fused decode step: attention of one decode query over anchor, window and the middle
keys of selected key blocks, with the certificate eps from the unselected blocks' bounds.

See `reference.py` for the exact semantics; `api.decode_step` is the entry point.
"""

from pallas_kernels.decode_step.api import IMPLEMENTATIONS, decode_step

__all__ = ["IMPLEMENTATIONS", "decode_step"]
