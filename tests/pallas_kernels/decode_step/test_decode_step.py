"""Fused decode-step kernels (pallas_kernels/decode_step) against their jnp reference.

Parameterised over tests.conftest.kernels("triton") (interpreted on CPU, compiled on a
GPU). Pallas' generic interpret mode starts every float output as NaN, so an element the
kernel never writes fails assert_close. Ragged rows: a full one, a mid-block one (145:
with window 16 the last middle key, 128, is alone in its block), one too short for any
middle key and an empty one (length 0: out 0, lse -inf, eps 0).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_bounds import reference as bounds_reference
from pallas_kernels.decode_step import api, reference
from tests.conftest import PLATFORM, assert_close, kernels

TRITON = kernels("triton")
B, HQ, HKV, D, P, NB = 4, 6, 2, 32, 16, 32
S = NB * P


def _inputs(seed, dtype, top, width, anchor, window, gp_rows=True):
  """q, k, v, ids [B, Hkv, width] (top distinct blocks holding middle keys where there
  are enough, -1 holes and -1 beyond top), u (shifted box bounds of the blocks, -inf
  where a block has no middle key: Gp or G rows), kv_lengths."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, 1, HQ, D)) * 2.0, dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, S, HKV, D)), dtype) for _ in range(2))
  lengths = np.array([S, 145, anchor + window, 0])
  kr = np.asarray(k, np.float32).reshape(B, NB, P, HKV, D)
  valid = (np.arange(S) < lengths[:, None]).reshape(B, NB, P, 1, 1)
  kmin = np.where(valid, kr, np.inf).min(2)
  kmax = np.where(valid, kr, -np.inf).max(2)
  u = bounds_reference.block_bounds(
      q[:, 0], jnp.asarray(kmin), jnp.asarray(kmax), scale=D**-0.5, slack=1e-5,
      kv_lengths=jnp.asarray(lengths), block_size=P, anchor=anchor, window=window)
  u = u - 14.0   # box bounds are loose (eps ~ 1); shifted, eps spans (0, 1)
  if not gp_rows:
    u = u[:, :, :HQ // HKV]
  ids = np.full((B, HKV, width), -1, np.int32)
  for b in range(B):
    m_hi = lengths[b] - 1 - window
    mid = [j for j in range(NB) if min(j * P + P - 1, m_hi) >= max(j * P, anchor)]
    for h in range(HKV):
      pick = rng.permutation(mid)[:top]
      ids[b, h, :len(pick)] = pick
  ids[0, 0, 1] = -1                                   # a hole in the selection
  return q, k, v, jnp.asarray(ids), u, jnp.asarray(lengths)


CASES = {
    # name: (dtype, top, width, anchor, window, gp_rows, kernel_kw)
    # top 3: NP = 4 programs, all of them sum eps shares; Gp-row bounds used as they are
    "f32_top3": (jnp.float32, 3, 3, 4, 16, True, dict(finish="triton")),
    # top 5, ids as rank_select's wide output (width 8 = next_pow2(top + 1), -1 beyond
    # top); programs 6, 7 sum eps, a chunk of 16 blocks each; G-row bounds (padded);
    # the merge in plain jnp
    "f32_top5_wide_xla": (jnp.float32, 5, 8, 3, 20, False, dict(finish="xla",
                                                                eps_chunk=16)),
    "bf16_top3": (jnp.bfloat16, 3, 3, 4, 16, True, {}),
}


@pytest.mark.parametrize("impl,interpret", TRITON)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(impl, interpret, case):
  dtype, top, width, anchor, window, gp_rows, kernel_kw = CASES[case]
  q, k, v, ids, u, lengths = _inputs(len(case), dtype, top, width, anchor, window,
                                     gp_rows)
  kw = dict(block_size=P, scale=D**-0.5, anchor=anchor, window=window, top=top)
  out, lse, eps = api.decode_step(q, k, v, ids, u, lengths, **kw, implementation=impl,
                                  interpret=interpret, **kernel_kw)
  r_out, r_lse, r_eps = reference.decode_step(q, k, v, ids, u, lengths, **kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == eps.shape == (B, HQ) and lse.dtype == eps.dtype == jnp.float32
  assert_close(out, r_out, dtype, f"{case}: out")
  assert_close(lse, r_lse, dtype, f"{case}: lse")
  assert_close(eps, r_eps, dtype, f"{case}: eps")
  e = np.asarray(eps)
  assert np.all((e[:2] > 0) & (e[:2] <= 1)) and np.all(e[2:] == 0)   # no middle key: 0
  assert np.all(np.asarray(out[3], np.float32) == 0) and np.all(np.isneginf(lse[3]))


@pytest.mark.parametrize("impl,interpret", TRITON)
def test_nothing_selected_and_deterministic(impl, interpret):
  """anchor = window = 0 and no block selected for row 1: an empty set over middle keys
  that all go uncounted (lse -inf, eps 1); with_eps=False drops eps; a second run is
  bitwise equal."""
  q, k, v, ids, u, lengths = _inputs(9, jnp.float32, 2, 2, 0, 0)
  ids = ids.at[1].set(-1)
  kw = dict(block_size=P, scale=D**-0.5, anchor=0, window=0)
  run = lambda **kernel_kw: api.decode_step(q, k, v, ids, u, lengths, **kw,
                                            implementation=impl, interpret=interpret,
                                            **kernel_kw)
  out, lse, eps = run()
  r_out, r_lse, r_eps = reference.decode_step(q, k, v, ids, u, lengths, **kw)
  for name, a, e in (("out", out, r_out), ("lse", lse, r_lse), ("eps", eps, r_eps)):
    assert_close(a, e, jnp.float32, name)
  assert np.all(np.isneginf(lse[1])) and np.all(np.asarray(eps[1]) == 1.0)
  out2, lse2, eps2 = run()
  for a, a2 in ((out, out2), (lse, lse2), (eps, eps2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
  out3, lse3, eps3 = run(with_eps=False)
  assert eps3 is None
  np.testing.assert_array_equal(np.asarray(out3), np.asarray(out))


def test_dispatch_and_validation():
  q, k, v, ids, u, lengths = _inputs(0, jnp.float32, 2, 2, 2, 4)
  kw = dict(block_size=P, scale=0.1, anchor=2, window=4)
  expected = {"gpu": "triton", "cpu": "triton"}.get(PLATFORM, "reference")
  assert api.default_implementations()[0] == expected
  assert set(api.IMPLEMENTATIONS) == {"reference", "triton"}
  with pytest.raises(ValueError, match=r"implementation='cuda'.*'reference', 'triton'"):
    api.decode_step(q, k, v, ids, u, lengths, **kw, implementation="cuda")
  with pytest.raises(ValueError, match="interpret='no'"):
    api.decode_step(q, k, v, ids, u, lengths, **kw, interpret="no")
  with pytest.raises(ValueError, match="finish='cuda'"):
    api.decode_step(q, k, v, ids, u, lengths, **kw, implementation="triton",
                    interpret=True, finish="cuda")
  # S != nb * P: the named kernel refuses, None falls back to the reference
  short, lengths = (k[:, :-1], v[:, :-1]), jnp.minimum(lengths, S - 1)
  with pytest.raises(NotImplementedError, match="S = nb \\* P"):
    api.decode_step(q, *short, ids, u, lengths, **kw, implementation="triton",
                    interpret=True)
  got = api.decode_step(q, *short, ids, u, lengths, **kw, with_eps=False)
  want = reference.decode_step(q, *short, ids, u, lengths, **kw)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  assert got[2] is None                       # with_eps=False holds for the reference too
  with pytest.raises(ValueError, match="one decode query"):
    reference.decode_step(jnp.concatenate([q, q], 1), k, v, ids, u, lengths, **kw)
  if PLATFORM == "cpu":
    with pytest.raises(NotImplementedError, match="needs a GPU"):
      api.decode_step(q, k, v, ids, u, lengths, **kw, implementation="triton",
                      interpret=False)
