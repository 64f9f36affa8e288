"""End to end: `cj.condensate_attention(..., implementation="pallas")` vs "xla".

The selection (and so the stats) is the core's own code: set sizes must be identical
and the float stats equal to float32 rounding (XLA may fuse the same code differently
inside another jitted program: seen on an H200, 1-ulp differences); outputs agree to the dtype's tolerance (the kernel sums in a different order).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax.impl import pallas_exact as pallas_impl
from tests.conftest import KERNELS, assert_close

CASES = {
    # name: (B, T, S, Hq, Hkv, D, spec, kwargs)
    "decode_gqa_ragged": (3, 1, 80, 6, 2, 64, cj.CondensateSpec(2, 8, 6),
                          dict(kv_lengths=np.array([80, 41, 5], np.int32))),
    "prefill_mqa": (1, 40, 40, 4, 1, 128, cj.CondensateSpec(1, 8, 4), {}),
    "prefill_gqa_sliding": (2, 24, 24, 4, 2, 64, cj.CondensateSpec(1, 4, 3),
                            dict(sliding_window=16)),
    "decode_topk_only": (1, 1, 50, 4, 2, 64, cj.CondensateSpec(0, 0, 7), {}),
}


def _inputs(b, t, s, hq, hkv, d, dtype, seed):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(sh), dtype)
               for sh in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))


@pytest.fixture(params=KERNELS, ids=[k for k, _ in KERNELS])
def kernel(request, monkeypatch):
  impl, _ = request.param
  monkeypatch.setattr(pallas_impl, "KERNEL_IMPLEMENTATION", impl)
  return impl


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16), ids=("float32", "bfloat16"))
@pytest.mark.parametrize("case", sorted(CASES))
def test_pallas_matches_xla(kernel, case, dtype):
  b, t, s, hq, hkv, d, spec, kw = CASES[case]
  q, k, v = _inputs(b, t, s, hq, hkv, d, dtype, seed=sorted(CASES).index(case))
  out_x, st_x = cj.condensate_attention(q, k, v, spec, implementation="xla",
                                        return_stats=True, **kw)
  pallas_impl.condensate_pallas.clear_cache()  # KERNEL_IMPLEMENTATION is read at trace
  out_p, st_p = cj.condensate_attention(q, k, v, spec, implementation="pallas",
                                        return_stats=True, **kw)
  assert out_p.dtype == q.dtype and out_p.shape == q.shape
  assert_close(out_p, out_x, dtype, "out")
  for name, a, e in zip(st_x._fields, st_p, st_x):
    if jnp.issubdtype(e.dtype, jnp.integer):  # same set: sizes identical
      np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=name)
    else:  # same code in another jitted program: XLA may fuse it differently (1 ulp)
      np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7,
                                 err_msg=name)
  # The set really is sparse here: some query drops keys.
  assert np.any(np.asarray(st_x.set_size) < np.asarray(st_x.visible))


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16), ids=("float32", "bfloat16"))
def test_covering_spec_equals_dense(kernel, dtype):
  """budget >= S: every visible key is in the set; pallas == dense within tolerance."""
  q, k, v = _inputs(2, 16, 16, 4, 2, 64, dtype, seed=11)
  spec = cj.CondensateSpec(anchor=2, window=8, top_k=6)
  pallas_impl.condensate_pallas.clear_cache()
  out = cj.condensate_attention(q, k, v, spec, implementation="pallas")
  dense = cj.dense_attention(q, k, v)
  assert_close(out, dense, dtype, "out")


def test_non_exact_selection_is_refused():
  q, k, v = _inputs(1, 1, 16, 2, 1, 64, jnp.float32, seed=0)
  spec = cj.CondensateSpec(anchor=1, window=2, top_k=2, selection="blocks")
  # cj.condensate_attention routes non-exact specs to "pallas_blocks"; a direct caller of
  # this implementation must still get an error, not a silent exact selection.
  with pytest.raises(ValueError, match="spec.selection='blocks'"):
    pallas_impl.condensate_pallas(q, k, v, jnp.zeros((1, 1), jnp.int32),
                                  jnp.full((1,), 16, jnp.int32), spec=spec, causal=True,
                                  sliding_window=None, scale=0.125, return_stats=False)
