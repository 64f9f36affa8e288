"""Top-k selection: the k largest entries of each row as `jax.lax.top_k` picks them
(total order of floats, ties to the lower position), returned in position order with
the k-th largest value, without a sort.

See `reference.py` for the exact semantics; `api.top_select` is the entry point
(`api.top_set`: rows of any length).
"""

from pallas_kernels.top_select.api import IMPLEMENTATIONS, MAX_ROW, top_select, top_set

__all__ = ["IMPLEMENTATIONS", "MAX_ROW", "top_select", "top_set"]
