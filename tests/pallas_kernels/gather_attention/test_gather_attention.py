"""Gather-attention kernels vs the jnp reference over the named shape sets.

Runs the Triton and Mosaic kernels in interpret mode on CPU and compiled on GPU/TPU (see
tests/conftest.py). Outputs are NaN-poisoned before every kernel run (aliased output
buffers), so an element the kernel fails to write shows up as NaN.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gather_attention import api, arg_specs, gpu_triton, reference, tpu_mosaic
from tests.conftest import KERNELS, PLATFORM, assert_close

_OUT_LAYOUT = {"triton": gpu_triton.out_layout, "mosaic_tpu": tpu_mosaic.out_layout}
DTYPES = (jnp.float32, jnp.bfloat16)


def _cases():
  for impl, interpret in KERNELS:
    for shape in arg_specs.TEST_SETS:
      if impl == "mosaic_tpu" and interpret and shape.name not in arg_specs.TPU_INTERPRET_SETS:
        continue
      for dtype in DTYPES:
        yield pytest.param(impl, interpret, shape, dtype,
                           id=f"{impl}-{shape.name}-{jnp.dtype(dtype).name}")


def run_kernel(impl, interpret, inputs, **kw):
  """One kernel run with NaN-poisoned output buffers."""
  o_shape, lse_shape = _OUT_LAYOUT[impl](inputs["q"].shape, inputs["k"].shape[2])
  poison = (jnp.full(o_shape, jnp.nan, inputs["q"].dtype), jnp.full(lse_shape, jnp.nan))
  return api.gather_attention(**inputs, implementation=impl, interpret=interpret,
                              out_init=poison, **kw)


def _reference_f32(inputs):
  f32 = {n: (x.astype(jnp.float32) if n in "qkv" else x) for n, x in inputs.items()}
  return reference.gather_attention(**f32)


@pytest.mark.parametrize("impl,interpret,shape,dtype", list(_cases()))
def test_matches_reference(impl, interpret, shape, dtype):
  inputs = arg_specs.make_inputs(shape, dtype, seed=arg_specs.TEST_SETS.index(shape))
  o, lse = run_kernel(impl, interpret, inputs)
  assert o.dtype == inputs["q"].dtype and o.shape == inputs["q"].shape
  assert lse.dtype == jnp.float32
  assert lse.shape == (shape.batch, shape.q_heads, shape.q_len)
  o_ref, lse_ref = _reference_f32(inputs)
  assert_close(o, o_ref, dtype, "o")
  assert_close(lse, lse_ref, dtype, "lse")
  if shape.ragged:  # the last row has kv length 0: every set is empty
    assert np.all(np.asarray(o[-1], np.float32) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse[-1])))


@pytest.mark.parametrize("impl,interpret", KERNELS)
def test_deterministic(impl, interpret):
  inputs = arg_specs.make_inputs(arg_specs.TEST_SETS_BY_NAME["decode_gqa3_d128"],
                                 jnp.float32, seed=7)
  o1, lse1 = run_kernel(impl, interpret, inputs)
  o2, lse2 = run_kernel(impl, interpret, inputs)
  np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
  np.testing.assert_array_equal(np.asarray(lse1), np.asarray(lse2))


def _dense_f64(q, k, v, scale):
  """Causal dense attention in float64 NumPy (independent of every jnp path)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  kk = np.repeat(k, hq // hkv, axis=2)
  vv = np.repeat(v, hq // hkv, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, kk) * scale
  pos = np.arange(s - t, s)[:, None]
  scores = np.where(np.arange(s)[None, :] <= pos, scores, -np.inf)
  lse = np.log(np.sum(np.exp(scores - scores.max(-1, keepdims=True)), -1)) + scores.max(-1)
  o = np.einsum("bhts,bshd->bthd", np.exp(scores - lse[..., None]), vv)
  return o, lse


@pytest.mark.parametrize("impl,interpret", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_covering_lists_equal_dense(impl, interpret, dtype):
  """Lists naming every visible key (causal prefill): the result is dense attention."""
  b, t, hq, hkv, d = 1, 12, 4, 2, 64
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), dtype)
             for sh in ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d)))
  j = np.arange(t)
  # Shared list: the first 3 keys (anchor); per-head list: the others, in reverse.
  shared = np.broadcast_to(j[:3], (b, hkv, t, 3)).astype(np.int32)
  shared_valid = shared <= j[None, None, :, None]
  head = np.broadcast_to(j[::-1][: t - 3], (b, hq, t, t - 3)).astype(np.int32)
  head_valid = head <= j[None, None, :, None]
  scale = 1.0 / np.sqrt(d)
  o, lse = run_kernel(impl, interpret, dict(
      q=q, k=k, v=v, indices=jnp.asarray(head), valid=jnp.asarray(head_valid),
      shared_indices=jnp.asarray(shared), shared_valid=jnp.asarray(shared_valid)),
      scale=scale)
  o_dense, lse_dense = _dense_f64(q.astype(jnp.float32), k.astype(jnp.float32),
                                  v.astype(jnp.float32), scale)
  assert_close(o, o_dense, dtype, "o")
  assert_close(lse, lse_dense, dtype, "lse")


def test_default_implementation_for_platform():
  expected = {"gpu": "triton", "tpu": "mosaic_tpu"}.get(PLATFORM, "triton")
  assert api.default_implementations()[0] == expected


def test_bad_arguments_raise_value_error():
  inputs = arg_specs.make_inputs(arg_specs.TEST_SETS_BY_NAME["decode_no_shared_d64"])
  with pytest.raises(ValueError, match="implementation='cuda'"):
    api.gather_attention(**inputs, implementation="cuda")
  with pytest.raises(ValueError, match="scale=-1.0"):
    api.gather_attention(**inputs, implementation="reference", scale=-1.0)
  with pytest.raises(ValueError, match=r"indices.shape=\(2, 4, 1\)"):
    api.gather_attention(**dict(inputs, indices=inputs["indices"][..., 0]),
                         implementation="reference")
  with pytest.raises(ValueError, match="expected both or neither"):
    api.gather_attention(**inputs, shared_indices=inputs["indices"][:, :2],
                         implementation="reference")
  with pytest.raises(ValueError, match="head_chunk=3"):
    api.gather_attention(**inputs, implementation="triton", interpret=True, head_chunk=3)
  with pytest.raises(ValueError, match="interpret='yes'"):
    api.gather_attention(**inputs, interpret="yes")


def test_named_backend_off_platform_raises_not_implemented():
  if PLATFORM != "cpu":
    pytest.skip("checks the CPU refusal of compiled kernels")
  inputs = arg_specs.make_inputs(arg_specs.TEST_SETS_BY_NAME["decode_no_shared_d64"])
  for impl in ("triton", "mosaic_tpu"):
    with pytest.raises(NotImplementedError):
      api.gather_attention(**inputs, implementation=impl, interpret=False)


@pytest.mark.parametrize("impl,interpret", KERNELS)
def test_odd_shapes(impl, interpret):
  """Shapes off the named sets: G = 5, D = 80 (padded to powers of two by the Triton
  kernel), list lengths not chunk multiples, T = 3 queries of a 37-key cache."""
  shape = arg_specs.ShapeSet("odd", 2, 3, 37, 10, 2, 80, 13, 3, ragged=True)
  inputs = arg_specs.make_inputs(shape, jnp.float32, seed=5)
  o, lse = run_kernel(impl, interpret, inputs, scale=0.3)
  o_ref, lse_ref = reference.gather_attention(**inputs, scale=0.3)
  assert_close(o, o_ref, jnp.float32, "o")
  assert_close(lse, lse_ref, jnp.float32, "lse")


@pytest.mark.parametrize("name", ["decode_gqa3_d128", "decode_ragged_gqa",
                                  "decode_no_shared_d64", "prefill_mqa_d128_ragged"])
@pytest.mark.parametrize("splits", [2, 8, 64])
def test_split_lists_merge_to_the_reference(name, splits):
  # each program takes every splits-th chunk of both lists (64: programs with no chunk,
  # whose empty parts must not count); the parts merge by log-sum-exp
  shape = arg_specs.TEST_SETS_BY_NAME[name]
  inputs = arg_specs.make_inputs(shape, jnp.float32, seed=5)
  o, lse = api.gather_attention(**inputs, implementation="triton", interpret=True,
                                splits=splits, head_chunk=2, shared_chunk=2)
  o_ref, lse_ref = _reference_f32(inputs)
  assert_close(o, o_ref, jnp.float32, "o")
  assert_close(lse, lse_ref, jnp.float32, "lse")
  if shape.ragged:
    assert np.all(np.asarray(o[-1]) == 0.0) and np.all(np.isneginf(np.asarray(lse[-1])))


def test_split_merge_keeps_nan_and_empty_sets():
  o = jnp.ones((2, 3, 1, 4), jnp.float32)                 # [row, part, Gp, D]
  lse = jnp.asarray([[[0.0], [jnp.nan], [-jnp.inf]], [[-jnp.inf]] * 3], jnp.float32)
  o_m, lse_m = gpu_triton.merge_splits(o * jnp.asarray([1, 1, 0])[None, :, None, None]
                                       * jnp.asarray([1, 0])[:, None, None, None], lse)
  assert np.isnan(np.asarray(o_m[0])).all() and np.isnan(float(lse_m[0, 0]))
  assert np.all(np.asarray(o_m[1]) == 0.0) and np.isneginf(float(lse_m[1, 0]))
  with pytest.raises(ValueError, match="splits=0"):
    gpu_triton.gather_attention(**arg_specs.make_inputs(
        arg_specs.TEST_SETS_BY_NAME["decode_gqa3_d128"], jnp.float32, seed=0),
        interpret=True, splits=0)
