"""The timed fast paths of selection="blocks" (DESIGN.md §4) and of selection="indexed"
(issue #13): what the benchmarks time.

  from condensate_jax import fast
  out, lse, eps = fast.decode_step(q, k, v, kmin, kmax, kv_lengths, spec=spec, scale=s)
  o, lse = fast.prefill_step(q, k, v, spec=spec, scale=s)
  out, lse, eps = fast.indexed_decode_step(q, k, v, packed_index, kv_lengths, spec=spec,
                                           scale=s)       # selection="indexed"
"""

from condensate_jax.fast.decode import (ATTEND_KERNELS, SELECT_METHODS, decode_attend,
                                        decode_eps, decode_select, decode_step,
                                        fast_bounds)
from condensate_jax.fast.indexed import indexed_decode_step
from condensate_jax.fast.prefill import prefill_attend, prefill_step
from condensate_jax.selection.prefill_lists import prefill_lists

__all__ = ["ATTEND_KERNELS", "SELECT_METHODS", "decode_attend", "decode_eps",
           "decode_select", "decode_step", "fast_bounds", "indexed_decode_step",
           "prefill_attend", "prefill_lists", "prefill_step"]
