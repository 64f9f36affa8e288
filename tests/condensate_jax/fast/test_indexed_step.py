"""The timed decode step of selection="indexed" (`fast.indexed_decode_step`) against the
XLA specification (`impl/xla_indexed.py`) and against float64 truth: the same sets, the
same output, a certificate that bounds the true dropped mass, exactness when the set
covers every key, NaN where a head reads one, and clear errors for bad input. The index
scan runs the platform's kernel (Triton: interpreted on CPU, compiled on a GPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax import fast, geometry, softmax
from condensate_jax.impl import xla_indexed
from condensate_jax.selection import index as index_lib
from pallas_kernels.top_select import reference as top_reference


def _case(seed, b=2, s=256, hkv=2, g=3, d=32, offset=2.0, outliers=0.0):
  rng = np.random.default_rng(seed)
  chan = 1 + outliers * (rng.random(d) < 0.1)
  k = rng.standard_normal((b, s, hkv, d)) * chan + offset * rng.standard_normal(d)
  v = rng.standard_normal((b, s, hkv, d))
  q = rng.standard_normal((b, 1, hkv * g, d))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _spec(top_k=24, candidates=64, bits=4):
  return cj.CondensateSpec(anchor=4, window=16, top_k=top_k, selection="indexed",
                           index_bits=bits, candidates=candidates)


def _run(q, k, v, lengths, spec, scan=None):
  idx = index_lib.build_index(k, spec.index_bits, lengths)
  res = fast.indexed_decode_step(q, k, v, index_lib.pack_index(idx), lengths, spec=spec,
                                 scale=q.shape[-1] ** -0.5, scan=scan, return_ids=True)
  return idx, res


def _true_dropped(q, k, lengths, ids, spec):
  """float64 dropped mass of the set anchor + window + ids, per (row, head)."""
  g = q.shape[2] // k.shape[2]
  qf, kf = np.asarray(q[:, 0], np.float64), np.repeat(np.asarray(k, np.float64), g, 2)
  s = np.einsum("bhd,bshd->bhs", qf, kf) * q.shape[-1] ** -0.5
  out = np.zeros(s.shape[:2])
  for b, n in enumerate(np.asarray(lengths)):
    for h in range(s.shape[1]):
      keep = np.zeros(n, bool)
      keep[:spec.anchor] = True
      keep[n - spec.window:] = True
      keep[[j for j in np.asarray(ids)[b, h] if j >= 0]] = True
      p = np.exp(s[b, h, :n] - s[b, h, :n].max())
      out[b, h] = p[~keep].sum() / p.sum()
  return out


@pytest.mark.parametrize("bits,lengths", [(4, [256, 173]), (2, [256, 256]), (8, [97, 256])])
def test_matches_xla_spec(bits, lengths):
  q, k, v = _case(bits, outliers=4.0)
  lengths = jnp.asarray(lengths, jnp.int32)
  spec = _spec(bits=bits)
  idx, (out, lse, eps, ids, scored) = _run(q, k, v, lengths, spec)
  pos = (lengths - 1)[:, None]
  ref, stats = cj.condensate_attention(q, k, v, spec, q_positions=pos, kv_lengths=lengths,
                                       causal=True, return_stats=True, index=idx,
                                       implementation="xla_indexed")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(scored), np.asarray(stats.keys_scored)[:, :, 0])
  # the chosen middle keys are the specification's, head by head
  lo, hi = geometry.visible_range(pos, lengths, causal=True, sliding_window=None)
  scale = q.shape[-1] ** -0.5
  sel = xla_indexed.select(softmax.scores(q, k, scale), q, idx, lo, hi, spec, scale)
  middle = np.asarray(geometry.static_masks(lo, hi, k.shape[1], spec).middle)
  want = (np.asarray(sel.in_set) & middle)[:, :, :, 0].reshape(2, -1, k.shape[1])
  for b in range(2):
    for h in range(want.shape[1]):
      got = sorted(j for j in np.asarray(ids)[b, h].tolist() if j >= 0)
      assert got == np.nonzero(want[b, h])[0].tolist(), (b, h)
  # certified: eps bounds the true dropped mass of the set, and is no looser than a hair
  # beyond the specification's (which bounds unselected candidates by their exact score)
  true = _true_dropped(q, k, lengths, ids, spec)
  assert np.all(np.asarray(eps) >= true), (np.asarray(eps), true)
  np.testing.assert_allclose(np.asarray(eps), np.asarray(stats.dropped_mass_bound)[:, :, 0],
                             rtol=0.02, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(lse)))


@pytest.mark.parametrize("seed", [0, 1])
def test_eps_bounds_true_dropped_mass_on_hard_keys(seed):
  # large shared offset, strong outlier channels, peaked queries: loose codes, tight sets
  q, k, v = _case(10 + seed, offset=30.0, outliers=20.0)
  q = q * 4.0
  lengths = jnp.asarray([256, 200], jnp.int32)
  spec = _spec(top_k=8, candidates=16, bits=2)
  _, (_, _, eps, ids, _) = _run(q, k, v, lengths, spec, scan="reference")
  true = _true_dropped(q, k, lengths, ids, spec)
  assert np.all(np.asarray(eps) >= true), (np.asarray(eps), true)
  assert np.all(np.asarray(eps) <= 1.0)


def test_set_covering_every_key_is_dense():
  q, k, v = _case(5, s=128)
  lengths = jnp.asarray([128, 90], jnp.int32)
  spec = _spec(top_k=128, candidates=128)
  _, (out, lse, eps, ids, scored) = _run(q, k, v, lengths, spec)
  pos = (lengths - 1)[:, None]
  dense = cj.dense_attention(q, k, v, q_positions=pos, kv_lengths=lengths, causal=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-6, rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(eps), 0.0)
  np.testing.assert_array_equal(np.asarray(scored), np.asarray(lengths)[:, None].repeat(6, 1))


def test_nan_query_row_is_nan_only_there():
  q, k, v = _case(6, s=128)
  q = q.at[1, 0, 4, 3].set(jnp.nan)
  lengths = jnp.asarray([128, 128], jnp.int32)
  _, (out, lse, eps, _, _) = _run(q, k, v, lengths, _spec(), scan="reference")
  bad = np.zeros((2, 6), bool)
  bad[1, 4] = True
  for x in (np.asarray(out)[:, 0].max(-1), np.asarray(lse), np.asarray(eps)):
    np.testing.assert_array_equal(np.isnan(x), bad)


def test_bad_inputs_are_refused():
  q, k, v = _case(7, b=1, s=64)
  lengths = jnp.asarray([64], jnp.int32)
  spec = _spec()
  idx = index_lib.build_index(k, 4)
  packed = index_lib.pack_index(idx)
  call = lambda **kw: fast.indexed_decode_step(
      kw.get("q", q), k, v, kw.get("index", packed), kw.get("lengths", lengths),
      spec=kw.get("spec", spec), scale=0.1, scan=kw.get("scan"))
  with pytest.raises(ValueError, match="spec.selection='blocks'"):
    call(spec=cj.CondensateSpec(selection="blocks", block_size=16, top_blocks=1))
  with pytest.raises(ValueError, match="expected a PackedIndex"):
    call(index=idx)
  with pytest.raises(ValueError, match="index.bits=4"):
    call(spec=_spec(bits=2))
  with pytest.raises(ValueError, match=r"index.packed.shape"):
    call(index=index_lib.pack_index(index_lib.build_index(k[:, :32], 4)))
  with pytest.raises(ValueError, match="kv_lengths"):
    call(lengths=jnp.asarray([0], jnp.int32))
  with pytest.raises(ValueError, match="one query per row"):
    call(q=jnp.concatenate([q, q], 1))
  with pytest.raises(ValueError, match="scan='cuda'"):
    call(scan="cuda")


@pytest.mark.parametrize("s,c", [(20000, 64), (40000, 512), (65536, 100), (17000, 5000),
                                 (70000, 9000), (65536, 40000)])
@pytest.mark.parametrize("select", [None, "xla"])
def test_two_level_candidates_equal_a_flat_top_k(s, c, select):
  # integer-valued estimates: many ties, which must still go to the lower position
  # (70000, 9000): both rows cannot fit the kernel, the longer level takes lax.top_k;
  # (65536, 40000): more candidates than a kernel row holds
  rng = np.random.default_rng(s + c)
  est = jnp.asarray(rng.integers(-50, 50, (2, 1, 3, s)), jnp.float32)
  est = est.at[0, 0, 0, : s // 2].set(-jnp.inf)            # a row with half its keys absent
  est = est.at[1, 0, 2].set(-jnp.inf).at[1, 0, 2, 7].set(3.0)   # a row with one key
  vals, ids, tau = fast.indexed.candidates(est, c, select)
  want_vals, want_ids = jax.lax.top_k(est, c)
  np.testing.assert_array_equal(np.asarray(ids), np.sort(np.asarray(want_ids), axis=-1))
  np.testing.assert_array_equal(np.asarray(vals),
                                np.take_along_axis(np.asarray(est), np.asarray(ids), -1))
  np.testing.assert_array_equal(np.asarray(tau), np.asarray(want_vals)[..., -1])


@pytest.mark.parametrize("select", [None, "xla"])
def test_two_level_candidates_rank_nan_of_either_sign_as_top_k(select):
  # -NaN (x86's inf - inf) ranks below -inf, +NaN above +inf, -0 below +0: the chunk
  # maxima must keep that order, or a chunk holding a -NaN outranks real keys
  s = 65536
  est = np.zeros((1, 1, 4, s), np.float32)
  neg_nan = -np.float32(np.nan)
  est[0, 0, 0, 0], est[0, 0, 0, -1] = neg_nan, 5.0
  est[0, 0, 1, 100], est[0, 0, 1, 200] = np.nan, 7.0
  est[0, 0, 2, 3], est[0, 0, 2, 9000] = -0.0, -1e-30
  est[0, 0, 3] = -np.inf
  est[0, 0, 3, ::1000] = neg_nan
  est[0, 0, 3, 12345] = 1.0
  est = jnp.asarray(est)
  # the expectation by a NumPy stable sort of the order keys (lax.top_k's own order on a
  # CPU; XLA's GPU top_k kernel for k <= 16 compares raw floats: reference.total_top_k)
  keys = np.asarray(top_reference.order_keys(est)).astype(np.int64)
  order = np.argsort(-keys, axis=-1, kind="stable")
  bits = lambda x: np.asarray(x).view(np.int32)
  for c in (1, 3, 70):
    _, ids, tau = fast.indexed.candidates(est, c, select)
    np.testing.assert_array_equal(np.asarray(ids), np.sort(order[..., :c], -1))
    want_tau = np.take_along_axis(np.asarray(est), order[..., c - 1:c], -1)[..., 0]
    np.testing.assert_array_equal(bits(tau), bits(want_tau))


def test_a_broken_index_entry_makes_its_readers_nan_not_a_low_eps():
  # a channel with ~zero spread at build time and a large appended value: step = inf and
  # the estimate NaN; the key holds all the mass, so no finite eps may claim otherwise
  rng = np.random.default_rng(3)
  k = rng.standard_normal((1, 64, 1, 16))
  k[..., 0] = 1e-30 * rng.standard_normal((1, 64, 1))
  k = jnp.asarray(k, jnp.float32)
  idx = index_lib.build_index(k, 4, jnp.asarray([40], jnp.int32))
  k = k.at[0, 45, 0, 0].set(1e9)
  idx = index_lib.append_index(idx, k[:, 45:46], jnp.asarray([[45]], jnp.int32))
  q = jnp.zeros((1, 1, 1, 16), jnp.float32).at[0, 0, 0, 0].set(1.0)
  v = jnp.ones((1, 64, 1, 16), jnp.float32)
  spec = cj.CondensateSpec(anchor=2, window=4, top_k=4, selection="indexed", index_bits=4,
                           candidates=8)
  out, lse, eps = fast.indexed_decode_step(q, k, v, index_lib.pack_index(idx),
                                           jnp.asarray([64], jnp.int32), spec=spec,
                                           scale=0.25, scan="reference")
  assert np.isnan(np.asarray(eps)).all() and np.isnan(np.asarray(out)).all()


def test_a_tiny_dropped_mass_is_not_reported_as_zero():
  from condensate_jax import softmax
  eps = softmax.log_delta_to_eps(jnp.asarray([-200.0, -jnp.inf]), jnp.asarray([0.0, 0.0]))
  assert float(eps[0]) > 0 and float(eps[1]) == 0.0


def test_two_level_step_equals_the_xla_selection_and_keeps_nan():
  # beyond the selection kernel's 32K-entry rows the candidates go in two levels: the
  # same sets, scored keys, output and eps as lax.top_k's (select="xla"); a broken index
  # entry (NaN estimate) poisons its row, wherever its chunk ranks
  rng = np.random.default_rng(11)
  b, s, hkv, g, d = 2, 40960, 1, 2, 32
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)) + 2 * rng.standard_normal(d),
                  jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  q = jnp.asarray(3 * rng.standard_normal((b, 1, hkv * g, d)), jnp.float32)
  lengths = jnp.asarray([s, 37001], jnp.int32)
  spec = _spec(top_k=24, candidates=64)
  idx = index_lib.pack_index(index_lib.build_index(k, 4, lengths))
  run = lambda index=idx, **kw: fast.indexed_decode_step(
      q, k, v, index, lengths, spec=spec, scale=d**-0.5, scan="reference",
      return_ids=True, **kw)
  out, _, eps, ids, scored = run()
  out2, _, eps2, ids2, scored2 = run(select="xla")
  for a, c in zip(np.asarray(ids).reshape(-1, 24), np.asarray(ids2).reshape(-1, 24)):
    assert sorted(a[a >= 0].tolist()) == sorted(c[c >= 0].tolist())
  np.testing.assert_array_equal(np.asarray(scored), np.asarray(scored2))
  np.testing.assert_allclose(np.asarray(out), np.asarray(out2), atol=2e-6, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(eps), np.asarray(eps2), rtol=1e-5, atol=1e-7)
  broken = dataclasses.replace(idx, step=idx.step.at[1, 0, 20000].set(jnp.nan))
  _, _, eps_b, _, _ = run(broken)
  assert np.isnan(np.asarray(eps_b)[1]).all() and np.isfinite(np.asarray(eps_b)[0]).all()
