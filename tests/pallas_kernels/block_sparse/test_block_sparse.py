"""Block-sparse kernels (pallas_kernels/block_sparse) against their jnp reference.

Triton kernels: parameterised over tests.conftest.kernels("triton") (interpreted on CPU,
compiled on a GPU). Pallas' generic interpret mode starts every float output as NaN, so
an element the kernel never writes fails assert_close.

Mosaic TPU kernels (tpu_mosaic.py): off TPU they run in TPU interpret mode on the CPU
device (`implementation="mosaic_tpu", interpret=True`; also on a GPU host); on a TPU they
would be compiled (never done so far). TPU interpret mode fills uninitialised memory
(VMEM buffers, outputs) with NaN (asked for explicitly below), so an output the kernel
never writes comes back NaN or, for a reused pipeline buffer, as the previous block's
values; the exact comparisons with the reference (including empty splits, which must be
o = 0 and lse = -inf) catch both.

Tolerances: tests.conftest's per-dtype table (the bf16 kernels round p to bf16 for the
second matmul, flash-attention style, while the reference keeps it in float32; these
cases stay within the table's bf16 tolerance).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse import api, reference, tpu_mosaic
from tests.conftest import assert_close, kernels

TRITON = kernels("triton")
ON_TPU = jax.default_backend() == "tpu"
try:
  INTERPRET = False if ON_TPU else pltpu.InterpretParams(uninitialized_memory="nan")
except TypeError:   # a jax whose InterpretParams lacks the field (NaN is its default)
  INTERPRET = pltpu.InterpretParams()
API_INTERPRET = not ON_TPU



mosaic = pytest.mark.usefixtures("on_cpu_unless_tpu")


def _qkv(seed, b, t, s, hq, hkv, d, dtype=jnp.float32, gain=1.0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d)) * gain
  k, v = rng.standard_normal((2, b, s, hkv, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# ----------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("impl,interpret", TRITON)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_kernel_matches_reference(impl, interpret, dtype):
  b, t, s, hq, hkv, d, p = 2, 2, 100, 6, 2, 32, 16
  q, k, v = _qkv(0, b, t, s, hq, hkv, d, dtype)
  rng = np.random.default_rng(1)
  nb = -(-s // p)
  ids = np.argsort(rng.random((b, hkv, t, nb)), -1)[..., :6]
  ids = np.where(rng.random(ids.shape) < 0.3, -1, ids).reshape(b, hkv, t, 3, 2)
  ranges = np.array([[[0, 1, 90, 99, 2, 89], [3, 5, 40, 49, 6, 39]],
                     [[0, 1, 50, 59, 2, 49], [0, -1, 0, -1, 0, -1]]])   # last: empty
  args = (q, k, v, jnp.asarray(ids, jnp.int32), jnp.asarray(ranges, jnp.int32))
  kw = dict(block_size=p, scale=0.2, anchor=3, window=10)
  o, lse = api.block_decode(*args, implementation=impl, interpret=interpret, **kw)
  ro, rl = api.block_decode(*args, implementation="reference", **kw)
  assert_close(o, ro, dtype, "o_parts")
  assert_close(lse, rl, dtype, "lse_parts")
  assert np.all(np.isneginf(np.asarray(lse)[1, :, 1]))      # the empty query
  o2, _ = api.block_decode(*args, implementation=impl, interpret=interpret, **kw)
  np.testing.assert_array_equal(np.asarray(o), np.asarray(o2))   # deterministic


def _covering_lists(seed, b, h, t, s, p, anchor, window, top):
  """Prefill lists as a caller builds them: per query block the blocks holding its anchor
  and window keys (flag 0) and `top` random blocks at or before its last query (flag 1);
  a repeated block becomes -1, its flag OR-ed into the first entry."""
  rng = np.random.default_rng(seed)
  nq = -(-t // p)
  n_anchor = -(-anchor // p)
  n_band = (p + max(window, 1) - 2) // p + 2
  ids = np.full((b, h, nq, n_anchor + n_band + top), -1, np.int32)
  flags = np.zeros_like(ids)
  for i in range(nq):
    first = s - t + i * p
    last = min(first + p - 1, s - 1)
    band = max(first - window + 1, 0) // p + np.arange(n_band)
    static = np.concatenate([np.arange(n_anchor), np.where(band <= last // p, band, -1)])
    for bb in range(b):
      for hh in range(h):
        row = np.concatenate([static, rng.integers(0, last // p + 1, top)])
        flag = np.concatenate([np.zeros(len(static)), np.ones(top)]).astype(np.int32)
        for e in range(len(row)):
          if row[e] < 0:
            continue
          same = np.flatnonzero(row[:e] == row[e])
          if len(same):
            flags[bb, hh, i, same[0]] |= flag[e]
          else:
            ids[bb, hh, i, e], flags[bb, hh, i, e] = row[e], flag[e]
  return jnp.asarray(ids), jnp.asarray(flags)


@pytest.mark.parametrize("impl,interpret", TRITON)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_kernel_matches_reference(impl, interpret, dtype):
  b, t, s, h, d, p = 1, 64, 80, 2, 32, 16
  q, k, v = _qkv(2, b, t, s, h, h, d, dtype, gain=2.0)
  kblocks, kflags = _covering_lists(2, b, h, t, s, p, anchor=3, window=20, top=1)
  kw = dict(block_size=p, anchor=3, window=20, scale=d**-0.5)
  o, lse = api.block_prefill(q, k, v, kblocks, kflags, implementation=impl,
                             interpret=interpret, **kw)
  ro, rl = api.block_prefill(q, k, v, kblocks, kflags, implementation="reference", **kw)
  assert_close(o, ro, dtype, "o")
  assert_close(lse, rl, dtype, "lse")
  # masked empty entries (loads that can pipeline) give the same result as skipped ones
  om, lm = api.block_prefill(q, k, v, kblocks, kflags, implementation=impl,
                             interpret=interpret, skip="mask", **kw)
  assert_close(om, o, dtype, "o skip=mask")
  assert_close(lm, lse, dtype, "lse skip=mask")
  assert np.any(np.asarray(kblocks) < 0)          # the case has empty entries to skip
  # the lists cover every anchor and window key, and add middle keys of flagged blocks
  mask = np.asarray(reference.prefill_mask(t, s, kblocks, kflags, block_size=p, anchor=3,
                                           window=20))
  pos = s - t + np.arange(t)[:, None]
  j = np.arange(s)[None]
  static = ((j < 3) | (j > pos - 20)) & (j <= pos)
  assert np.all(mask[:, :, static]) and not np.all(mask[:, :, (j <= pos) & ~static])


def _dense_f64(q, k, v, scale):
  """Causal dense attention in float64 NumPy (queries are the last T keys)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  t, s, g = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
  scores = np.einsum("bthd,bshd->bhts", q, np.repeat(k, g, axis=2)) * scale
  pos = np.arange(s - t, s)[:, None]
  scores = np.where(np.arange(s)[None, :] <= pos, scores, -np.inf)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", w, np.repeat(v, g, axis=2))


@pytest.mark.parametrize("impl,interpret", TRITON)
def test_prefill_covering_everything_is_dense(impl, interpret):
  """Lists naming every key block, all flagged: dense causal attention."""
  q, k, v = _qkv(3, 1, 48, 48, 2, 1, 16, gain=1.0)
  kblocks = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (1, 2, 3, 3))
  o, _ = api.block_prefill(q, k, v, kblocks, jnp.ones_like(kblocks), block_size=16,
                           anchor=1, window=16, scale=0.25, implementation=impl,
                           interpret=interpret)
  dense = _dense_f64(q, k, v, 0.25)
  np.testing.assert_allclose(np.asarray(o), np.asarray(dense), atol=2e-5)


def test_kernel_validation():
  q, k, v = _qkv(0, 1, 1, 32, 2, 1, 16)
  ids = jnp.zeros((1, 1, 1, 1, 1), jnp.int32)
  rng_ = jnp.zeros((1, 1, 6), jnp.int32)
  with pytest.raises(ValueError, match="implementation='cuda'"):
    api.block_decode(q, k, v, ids, rng_, block_size=16, scale=1.0, anchor=1, window=1,
                     implementation="cuda")
  with pytest.raises(NotImplementedError, match="block_size=8"):
    api.block_decode(q, k, v, ids, rng_, block_size=8, scale=1.0, anchor=1, window=1,
                     implementation="triton")
  with pytest.raises(ValueError, match="interpret=1"):
    api.block_decode(q, k, v, ids, rng_, block_size=16, scale=1.0, anchor=1, window=1,
                     interpret=1)


# ------------------------------------------------------------------------- Mosaic TPU


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


@mosaic
@pytest.mark.parametrize("dtype,hq,hkv,t,with_static,ranges", DECODE_CASES,
                         ids=["f32-G4-static", "bf16-G4-static", "f32-G1-nostatic"])
def test_decode_matches_reference(dtype, hq, hkv, t, with_static, ranges):
  b, s, d, p, ns, bps = 2, 100, 128, 16, 3, 2
  q, k, v = _qkv(hq + t, b, t, s, hq, hkv, d, dtype, gain=2.0)
  ids = _decode_case(hq * t, b, t, s, hkv, p, ns, bps)
  args = (q, k, v, ids, jnp.asarray(ranges, jnp.int32))
  kw = dict(block_size=p, scale=d**-0.5, with_static=with_static)
  o, lse = tpu_mosaic.block_decode(*args, **kw, anchor=3, window=10,
                                   interpret=INTERPRET)
  ro, rl = reference.block_decode(*args, **kw)
  assert o.shape == (b, t, hq, ns, d) and o.dtype == jnp.float32
  assert lse.shape == (b, hq, t, ns) and lse.dtype == jnp.float32
  assert_close(o, ro, dtype, "o_parts")
  assert_close(lse, rl, dtype, "lse_parts")
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


@mosaic
@pytest.mark.parametrize("dtype,hq,hkv", [(jnp.float32, 4, 1), (jnp.bfloat16, 2, 2)],
                         ids=["f32-G4", "bf16-G1"])
def test_prefill_matches_reference(dtype, hq, hkv):
  b, t, s, d, p = 2, 40, 75, 128, 16       # T not a multiple of P; queries at S-T+t
  q, k, v = _qkv(7 + hq, b, t, s, hq, hkv, d, dtype, gain=2.0)
  nq, nb = -(-t // p), -(-s // p)
  kblocks, kflags = _prefill_lists(hq, b, hq, nq, 4, nb)
  kw = dict(block_size=p, anchor=3, window=20, scale=d**-0.5)
  o, lse = tpu_mosaic.block_prefill(q, k, v, kblocks, kflags, **kw,
                                    interpret=INTERPRET)
  ro, rl = reference.block_prefill(q, k, v, kblocks, kflags, **kw)
  assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (b, hq, t)
  assert_close(o, ro, dtype, "o")
  assert_close(lse, rl, dtype, "lse")
  assert np.isfinite(np.asarray(lse)).mean() > 0.5
  # flags matter: with every flag off the middle keys go (the sets shrink)
  o0, lse0 = api.block_prefill(q, k, v, kblocks, jnp.zeros_like(kflags), **kw,
                               implementation="mosaic_tpu", interpret=API_INTERPRET)
  r0, rl0 = reference.block_prefill(q, k, v, kblocks, jnp.zeros_like(kflags), **kw)
  assert_close(o0, r0, dtype, "o, flags 0")
  assert_close(lse0, rl0, dtype, "lse, flags 0")
  assert not np.allclose(np.asarray(lse0, np.float32), np.asarray(lse, np.float32))


@mosaic
@pytest.mark.parametrize("with_static", [False, True])
def test_decode_without_listed_blocks(with_static):
  """BPS = 0: split 0 holds only the static ranges (or nothing), the others are empty."""
  q, k, v = _qkv(11, 1, 1, 40, 2, 1, 128, jnp.float32, gain=2.0)
  args = (q, k, v, jnp.zeros((1, 1, 1, 2, 0), jnp.int32),
          jnp.asarray([[[0, 1, 30, 39, 2, 29]]], jnp.int32))
  kw = dict(block_size=16, scale=0.1, with_static=with_static)
  o, lse = tpu_mosaic.block_decode(*args, **kw, anchor=2, window=10, interpret=INTERPRET)
  ro, rl = reference.block_decode(*args, **kw)
  assert_close(o, ro, jnp.float32, "o_parts")
  assert_close(lse, rl, jnp.float32, "lse_parts")
  assert np.isfinite(np.asarray(lse)[..., 0]).all() == with_static


@mosaic
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
  assert api.default_implementations("tpu") == ("mosaic_tpu", "reference")


@mosaic
def test_validation():
  q, k, v = _qkv(0, 1, 1, 32, 2, 1, 128, jnp.float32, gain=2.0)
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


@mosaic
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
