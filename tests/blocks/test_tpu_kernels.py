"""Mosaic TPU block-sparse kernels (pallas_kernels/block_sparse/tpu_mosaic.py) against the
jnp reference. Off TPU they run in TPU interpret mode on the CPU device
(`implementation="mosaic_tpu", interpret=True`); on a TPU they would be compiled (never
done so far).

Poisoning: TPU interpret mode fills uninitialised memory (VMEM buffers, outputs) with NaN
(asked for explicitly below), so an output the kernel never writes comes back NaN or, for
a reused pipeline buffer, as the previous block's values; the exact comparisons with the
reference (including empty splits, which must be o = 0 and lse = -inf) catch both.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import condensate_jax as cj
from condensate_jax import blocks, blocks_pallas
from pallas_kernels.block_sparse import api, reference, tpu_mosaic

# f32: HIGHEST-precision matmuls on both sides; bf16: the kernel rounds p to bf16 for the
# second matmul (flash-attention style), the reference keeps it in f32.
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
ON_TPU = jax.default_backend() == "tpu"
try:
  INTERPRET = False if ON_TPU else pltpu.InterpretParams(uninitialized_memory="nan")
except TypeError:   # a jax whose InterpretParams lacks the field (NaN is its default)
  INTERPRET = pltpu.InterpretParams()
API_INTERPRET = not ON_TPU


@pytest.fixture(autouse=True)
def _on_cpu_unless_tpu():
  """Interpret mode runs on the CPU device (also on a GPU host); a TPU compiles."""
  if ON_TPU:
    yield
  else:
    with jax.default_device(jax.devices("cpu")[0]):
      yield


def _close(a, e, dtype, what):
  tol = TOL[jnp.dtype(dtype).name]
  a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
  assert not np.any(np.isnan(a)), f"{what}: NaN (an output the kernel did not write?)"
  np.testing.assert_array_equal(np.isneginf(a), np.isneginf(e), err_msg=f"{what}: -inf")
  fin = ~np.isneginf(e)
  np.testing.assert_allclose(a[fin], e[fin], rtol=tol, atol=tol, err_msg=what)


def _qkv(seed, b, t, s, hq, hkv, d, dtype, gain=2.0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d)) * gain
  k, v = rng.standard_normal((2, b, s, hkv, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _decode_case(seed, b, t, s, hkv, p, ns, bps):
  """Random block lists with -1 holes, a repeated id and an id past the last block."""
  rng = np.random.default_rng(seed)
  nb = -(-s // p)
  ids = np.argsort(rng.random((b, hkv, t, nb)), -1)[..., :ns * bps]
  ids = np.where(rng.random(ids.shape) < 0.3, -1, ids).reshape(b, hkv, t, ns, bps)
  ids[0, 0, 0, 0, -1] = ids[0, 0, 0, 0, 0] = 3        # repeat: counted once
  ids[-1, -1, 0, -1, 0] = nb + 2                      # no such block: no keys
  ids[0, -1, -1, -1] = -1                             # an empty split (s > 0)
  ids[0, :, -1, 0, 0] = 0                             # split 0 lists an anchor block
  return jnp.asarray(ids, jnp.int32)


DECODE_CASES = [
    # dtype, Hq, Hkv, T, with_static, ranges [B, T, 6] (ragged, not block aligned)
    (jnp.float32, 8, 2, 2, True,
     [[[0, 1, 90, 99, 2, 89], [3, 5, 4, 13, 0, 39]],                # overlapping ranges
      [[0, 1, 50, 59, 2, 49], [0, -1, 0, -1, 0, -1]]]),            # last query: empty
    (jnp.bfloat16, 8, 2, 2, True,
     [[[0, 2, 77, 86, 3, 76], [0, 2, 60, 69, 3, 59]],
      [[0, 2, 20, 29, 3, 19], [1, 2, 9, 17, 3, 8]]]),
    (jnp.float32, 2, 2, 3, False,                                   # G = 1, no static
     [[[0, 1, 90, 99, 2, 89], [0, 1, 33, 42, 2, 32], [0, 1, 80, 89, 5, 70]],
      [[0, 1, 50, 59, 2, 49], [0, 1, 60, 69, 17, 59], [0, -1, 0, -1, 0, -1]]]),
]


@pytest.mark.parametrize("dtype,hq,hkv,t,with_static,ranges", DECODE_CASES,
                         ids=["f32-G4-static", "bf16-G4-static", "f32-G1-nostatic"])
def test_decode_matches_reference(dtype, hq, hkv, t, with_static, ranges):
  b, s, d, p, ns, bps = 2, 100, 128, 16, 3, 2
  q, k, v = _qkv(hq + t, b, t, s, hq, hkv, d, dtype)
  ids = _decode_case(hq * t, b, t, s, hkv, p, ns, bps)
  args = (q, k, v, ids, jnp.asarray(ranges, jnp.int32))
  kw = dict(block_size=p, scale=d**-0.5, with_static=with_static)
  o, lse = tpu_mosaic.block_decode(*args, **kw, anchor=3, window=10,
                                   interpret=INTERPRET)
  ro, rl = reference.block_decode(*args, **kw)
  assert o.shape == (b, t, hq, ns, d) and o.dtype == jnp.float32
  assert lse.shape == (b, hq, t, ns) and lse.dtype == jnp.float32
  _close(o, ro, dtype, "o_parts")
  _close(lse, rl, dtype, "lse_parts")
  g = hq // hkv
  empty = np.asarray(lse)[0, (hkv - 1) * g:, t - 1, ns - 1]     # the emptied split
  assert np.all(np.isneginf(empty)) and not np.any(np.asarray(o)[0, t - 1, (hkv - 1) * g:,
                                                                 ns - 1])
  assert np.isfinite(np.asarray(lse)).sum() > lse.size // 3    # most sets are non-empty
  if dtype == jnp.float32 and with_static:   # through api, and deterministic
    o2, lse2 = api.block_decode(*args, **kw, anchor=3, window=10,
                                implementation="mosaic_tpu", interpret=API_INTERPRET)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse2))


def _prefill_lists(seed, b, h, nq, n_entries, nb):
  rng = np.random.default_rng(seed)
  ids = np.stack([np.argsort(rng.random((b, h, nq, nb)), -1)[..., :n_entries]])[0]
  ids = np.where(rng.random(ids.shape) < 0.25, -1, ids)
  flags = (rng.random(ids.shape) < 0.5).astype(np.int32)
  ids[0, 0, 0, 1] = ids[0, 0, 0, 0]                   # repeat with other flags: OR
  flags[0, 0, 0, :2] = (0, 1)
  return jnp.asarray(ids, jnp.int32), jnp.asarray(flags)


@pytest.mark.parametrize("dtype,hq,hkv", [(jnp.float32, 4, 1), (jnp.bfloat16, 2, 2)],
                         ids=["f32-G4", "bf16-G1"])
def test_prefill_matches_reference(dtype, hq, hkv):
  b, t, s, d, p = 2, 40, 75, 128, 16       # T not a multiple of P; queries at S-T+t
  q, k, v = _qkv(7 + hq, b, t, s, hq, hkv, d, dtype)
  nq, nb = -(-t // p), -(-s // p)
  kblocks, kflags = _prefill_lists(hq, b, hq, nq, 4, nb)
  kw = dict(block_size=p, anchor=3, window=20, scale=d**-0.5)
  o, lse = tpu_mosaic.block_prefill(q, k, v, kblocks, kflags, **kw,
                                    interpret=INTERPRET)
  ro, rl = reference.block_prefill(q, k, v, kblocks, kflags, **kw)
  assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (b, hq, t)
  _close(o, ro, dtype, "o")
  _close(lse, rl, dtype, "lse")
  assert np.isfinite(np.asarray(lse)).mean() > 0.5
  # flags matter: with every flag off the middle keys go (the sets shrink)
  o0, lse0 = api.block_prefill(q, k, v, kblocks, jnp.zeros_like(kflags), **kw,
                               implementation="mosaic_tpu", interpret=API_INTERPRET)
  r0, rl0 = reference.block_prefill(q, k, v, kblocks, jnp.zeros_like(kflags), **kw)
  _close(o0, r0, dtype, "o, flags 0")
  _close(lse0, rl0, dtype, "lse, flags 0")
  assert not np.allclose(np.asarray(lse0, np.float32), np.asarray(lse, np.float32))


@pytest.mark.parametrize("with_static", [False, True])
def test_decode_without_listed_blocks(with_static):
  """BPS = 0: split 0 holds only the static ranges (or nothing), the others are empty."""
  q, k, v = _qkv(11, 1, 1, 40, 2, 1, 128, jnp.float32)
  args = (q, k, v, jnp.zeros((1, 1, 1, 2, 0), jnp.int32),
          jnp.asarray([[[0, 1, 30, 39, 2, 29]]], jnp.int32))
  kw = dict(block_size=16, scale=0.1, with_static=with_static)
  o, lse = tpu_mosaic.block_decode(*args, **kw, anchor=2, window=10, interpret=INTERPRET)
  ro, rl = reference.block_decode(*args, **kw)
  _close(o, ro, jnp.float32, "o_parts")
  _close(lse, rl, jnp.float32, "lse_parts")
  assert np.isfinite(np.asarray(lse)[..., 0]).all() == with_static


def test_skipped_entries_keep_the_fetched_block():
  """-1 entries reuse the previous valid block index (no new DMA); repeats and ids out of
  range are dropped before the kernel sees them."""
  ids = tpu_mosaic._first_valid(jnp.array([[5, -1, 5, 9, 2], [-1, 7, 1, 1, -3]]), 8)
  np.testing.assert_array_equal(np.asarray(ids), [[5, -1, -1, -1, 2], [-1, 7, 1, -1, -1]])
  fetch = np.asarray(tpu_mosaic._fetch_ids(ids))
  np.testing.assert_array_equal(fetch, [5, 5, 5, 5, 2, 2, 7, 1, 1, 1])
  _, flags = tpu_mosaic._first_valid(jnp.array([[4, 4, 6]]), 8, jnp.array([[0, 1, 0]]))
  np.testing.assert_array_equal(np.asarray(flags), [[1, 1, 0]])


def test_registered_for_tpu():
  assert "mosaic_tpu" in api.IMPLEMENTATIONS
  assert api._BEST["tpu"] == ("mosaic_tpu", "reference")


def test_validation():
  q, k, v = _qkv(0, 1, 1, 32, 2, 1, 128, jnp.float32)
  ids = jnp.zeros((1, 1, 1, 1, 1), jnp.int32)
  rng_ = jnp.zeros((1, 1, 6), jnp.int32)
  kw = dict(block_size=16, scale=1.0, anchor=1, window=1, implementation="mosaic_tpu")
  if not ON_TPU:
    with pytest.raises(NotImplementedError, match="needs a TPU"):
      api.block_decode(q, k, v, ids, rng_, **kw, interpret=False)
  with pytest.raises(NotImplementedError, match="head dim D=32.*multiple of 128"):
    api.block_decode(q[..., :32], k[..., :32], v[..., :32], ids, rng_, **kw,
                     interpret=True)
  with pytest.raises(NotImplementedError, match="block_size=8.*multiple of 16"):
    api.block_decode(*(x.astype(jnp.bfloat16) for x in (q, k, v)), ids, rng_,
                     **dict(kw, block_size=8), interpret=True)
  with pytest.raises(NotImplementedError, match="float32 or bfloat16"):
    api.block_decode(*(x.astype(jnp.float16) for x in (q, k, v)), ids, rng_, **kw,
                     interpret=True)
  with pytest.raises(ValueError, match=r"blocks \(1, 1, 1, 1\)"):
    api.block_decode(q, k, v, ids[..., 0], rng_, **kw, interpret=True)
  with pytest.raises(ValueError, match=r"ranges \(1, 1, 5\)"):
    api.block_decode(q, k, v, ids, rng_[..., :5], **kw, interpret=True)
  with pytest.raises(ValueError, match="anchor=-1"):
    api.block_decode(q, k, v, ids, rng_, **dict(kw, anchor=-1), interpret=True)
  kb = jnp.zeros((1, 2, 2, 1), jnp.int32)       # T=1 needs ceil(1/16) = 1 query block
  with pytest.raises(ValueError, match=r"kblocks \(1, 2, 2, 1\)"):
    api.block_prefill(q, k, v, kb, kb, block_size=16, anchor=1, window=1, scale=1.0,
                      implementation="mosaic_tpu", interpret=API_INTERPRET)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_mosaic(dtype, monkeypatch):
  """jax.export for platform "tpu" runs the Pallas -> Mosaic lowering (block-shape and op
  checks) without a TPU; the Mosaic compiler itself (libtpu) is not run here."""
  monkeypatch.setattr(tpu_mosaic, "_interpret_params", lambda interpret: False)
  b, t, s, hq, hkv, d, p = 2, 3, 1000, 8, 2, 128, 64
  sds = jax.ShapeDtypeStruct
  q, kv = sds((b, t, hq, d), dtype), sds((b, s, hkv, d), dtype)
  decode = functools.partial(tpu_mosaic.block_decode, block_size=p, scale=0.1, anchor=4,
                             window=64)
  prefill = functools.partial(tpu_mosaic.block_prefill, block_size=p, scale=0.1, anchor=4,
                              window=64)
  qp, lists = sds((b, 300, hq, d), dtype), sds((b, hq, 5, 6), jnp.int32)
  for fn, args in ((decode, (q, kv, kv, sds((b, hkv, t, 2, 4), jnp.int32),
                             sds((b, t, 6), jnp.int32))),
                   (prefill, (qp, kv, kv, lists, lists))):
    try:
      text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    except ValueError as e:
      if "Unsupported TPU device kind" in str(e):   # a rule that asks for the chip
        pytest.skip(f"this jax's Mosaic lowering needs a TPU: {e}")
      raise
    assert "tpu_custom_call" in text


def test_fast_path_runs_on_the_mosaic_kernels(monkeypatch):
  """condensate_jax's block fast path with its kernels switched to "mosaic_tpu"."""
  if jax.default_backend() == "gpu":
    # interpret=None means "compile" off CPU, and a GPU cannot compile a Mosaic TPU
    # kernel (seen on an H200 host: NotImplementedError, as api.py documents)
    pytest.skip("the fast path interprets the Mosaic kernels only on a CPU backend")
  monkeypatch.setattr(blocks_pallas, "KERNEL_IMPLEMENTATION", "mosaic_tpu")
  b, s, hq, hkv, d, p = 2, 128, 4, 2, 128, 16
  q, k, v = _qkv(5, b, 1, s, hq, hkv, d, jnp.float32)
  lengths = jnp.array([128, 77])
  spec = cj.CondensateSpec(anchor=4, window=16, selection="blocks", block_size=p,
                           top_blocks=3)
  summ = blocks.build_summaries(k, p, lengths)
  out, _, _ = blocks_pallas.decode_step(q, k, v, summ.kmin, summ.kmax, lengths, spec=spec,
                                        scale=d**-0.5, num_splits=2)
  ref = cj.condensate_attention(q, k, v, spec, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  # prefill whose lists cover every key: dense causal attention
  q, k, v = _qkv(6, 1, 40, 48, 2, 1, d, jnp.float32, gain=1.0)
  spec = cj.CondensateSpec(anchor=1, window=16, selection="blocks", block_size=p,
                           top_blocks=3)
  o, _ = blocks_pallas.prefill_step(q, k, v, spec=spec, scale=0.1)
  np.testing.assert_allclose(np.asarray(o), np.asarray(cj.dense_attention(q, k, v,
                                                                           scale=0.1)),
                             atol=1e-5, rtol=1e-5)
