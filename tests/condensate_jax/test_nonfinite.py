"""Issue #15, repros 1-3, 13, 15: a non-finite input gives non-finite outputs and NaN
stats for exactly the queries that read it (`condensate_jax/finite.py`), in every
selection mode and implementation and in the fast steps; every other query is unaffected;
the fast steps validate their inputs; scales that leave float32 are refused and huge
finite scales give masses in [0, 1].

Expected sets are computed here from the definition (causal, every key < kv_length
visible): a NaN in q row (t, h) reaches (t, h) only; a NaN / Inf in the k or v row of key
j, KV head g reaches every query t >= j of the query heads of g; one beyond kv_lengths
reaches nobody."""

import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax import fast

G = 2           # query heads per KV head
BLOCK = dict(anchor=1, window=2, top_k=2, block_size=4, top_blocks=1)
MODES = [("exact", "xla"), ("exact", "xla_gathered"), ("exact", "pallas"),
         ("blocks", "xla"), ("blocks", "pallas"), ("bounded", "xla"),
         ("certified", "xla"), ("certified", "pallas")]


def _spec(selection):
  if selection == "exact":
    return cj.CondensateSpec(anchor=1, window=4, top_k=2)
  return cj.CondensateSpec(selection=selection, **BLOCK,
                           bounds="blocks" if selection == "certified" else None)


def _qkv(t=16, s=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(1, t, 2 * G, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(1, s, 2, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(1, s, 2, d)), jnp.float32))


def _expected(where, t=16, kv_length=16):
  """[T, Hq] bool: the queries that read the poisoned entry."""
  which, pos, head = where
  bad = np.zeros((t, 2 * G), bool)
  if which == "q":
    bad[pos, head] = True
  elif pos < kv_length:
    bad[pos:, head * G:(head + 1) * G] = True
  return bad


POISONS = {  # name: (array, position, head, value)
    "q": ("q", 3, 0, np.nan), "k": ("k", 10, 0, np.nan), "k_inf": ("k", 6, 1, -np.inf),
    "v": ("v", 10, 1, np.nan), "v_inf": ("v", 12, 0, np.inf),
    "v_padding": ("v", 15, 0, np.nan), "k_padding": ("k", 15, 1, np.nan)}


def _poisoned(name):
  q, k, v = _qkv()
  which, pos, head, value = POISONS[name]
  arrays = dict(q=q, k=k, v=v)
  arrays[which] = arrays[which].at[0, pos, head, 0].set(value)
  padded = name.endswith("padding")
  kw = dict(kv_lengths=jnp.array([15]), q_positions=jnp.clip(jnp.arange(16) - 1, 0)[None]
            ) if padded else {}
  return (q, k, v), (arrays["q"], arrays["k"], arrays["v"]), kw, _expected(
      (which, pos, head), kv_length=15 if padded else 16)


@pytest.mark.parametrize("selection,implementation", MODES)
@pytest.mark.parametrize("name", sorted(POISONS))
def test_nonfinite_input_reaches_exactly_its_readers(selection, implementation, name):
  clean, dirty, kw, expected = _poisoned(name)
  spec = _spec(selection)
  out, stats = cj.condensate_attention(*dirty, spec, implementation=implementation,
                                       return_stats=True, **kw)
  bad_out = ~np.isfinite(np.asarray(out[0])).all(-1)                         # [T, Hq]
  np.testing.assert_array_equal(bad_out, expected)
  for field in ("captured_mass", "dropped_mass", "dropped_mass_bound"):
    x = np.asarray(getattr(stats, field))[0].T                                # [T, Hq]
    np.testing.assert_array_equal(np.isnan(x), expected, err_msg=field)
    assert np.isfinite(x[~expected]).all(), field
  # queries before the poisoned block are untouched, bitwise
  ref = cj.condensate_attention(*clean, spec, implementation=implementation, **kw)
  first = POISONS[name][1] // 4 * 4
  np.testing.assert_array_equal(np.asarray(out)[0, :first], np.asarray(ref)[0, :first])


@pytest.mark.parametrize("name", sorted(POISONS))
def test_dense_is_nonfinite_exactly_where_condensate_is(name):
  clean, dirty, kw, expected = _poisoned(name)
  out = cj.dense_attention(*dirty, **kw)
  np.testing.assert_array_equal(~np.isfinite(np.asarray(out[0])).all(-1), expected)
  ref = cj.dense_attention(*clean, **kw)
  np.testing.assert_array_equal(np.asarray(out)[0][~expected], np.asarray(ref)[0][~expected])


def test_covers_everything_stays_bitwise_dense():
  q, k, v = _qkv()
  spec = cj.CondensateSpec(anchor=1, window=4, top_k=16)
  np.testing.assert_array_equal(
      np.asarray(cj.condensate_attention(q, k, v, spec)), np.asarray(cj.dense_attention(q, k, v)))


def test_broken_summaries_poison_the_queries_that_see_their_block():
  q, k, v = _qkv()
  spec = _spec("blocks")
  summ = cj.build_summaries(k, 4)
  broken = cj.BlockSummaries(summ.kmin.at[0, 1, 0, 0].set(jnp.nan), summ.kmax, 4)
  out, stats = cj.condensate_attention(q, k, v, spec, summaries=broken, return_stats=True)
  expected = np.zeros((16, 2 * G), bool)
  expected[4:, :G] = True                       # block 1 = keys 4..7, KV head 0
  np.testing.assert_array_equal(~np.isfinite(np.asarray(out[0])).all(-1), expected)
  np.testing.assert_array_equal(np.isnan(np.asarray(stats.dropped_mass_bound)[0].T), expected)


def test_summaries_carry_nan_keys():
  k = _qkv(s=256)[1].at[0, 200, 0, 0].set(jnp.nan)
  summ = cj.build_summaries(k, 16)
  assert np.isnan(summ.kmin[0, 12, 0, 0]) and np.isnan(summ.kmax[0, 12, 0, 0])
  assert np.isfinite(np.asarray(summ.kmin)[0, :12]).all()
  empty = cj.empty_summaries(1, 256, 2, 8, 16)
  appended = cj.append_summaries(empty, k[:, 200:201], jnp.array([[200]]))
  assert np.isnan(appended.kmax[0, 12, 0, 0])


@pytest.mark.parametrize("scale", [1e5, 1e10, 1e30])
@pytest.mark.parametrize("selection,implementation", [("exact", "xla"), ("blocks", "xla")])
def test_huge_finite_scales_keep_masses_in_unit_range(scale, selection, implementation):
  q, k, v = _qkv()
  out, stats = cj.condensate_attention(q, k, v, _spec(selection), scale=scale,
                                       implementation=implementation, return_stats=True)
  cap, drop = np.asarray(stats.captured_mass), np.asarray(stats.dropped_mass)
  finite = np.isfinite(np.asarray(out)).all(-1)[0].T                          # [Hq, T]
  assert ((cap[0] >= 0) & (cap[0] <= 1))[finite].all()
  np.testing.assert_allclose((cap + drop)[0][finite], 1.0, rtol=1e-6)
  assert np.isnan(cap[0][~finite]).all()      # an overflowed output says so


@pytest.mark.parametrize("scale", [1e39, 1e-50, float("inf"), -1.0, 0.0])
def test_scales_outside_float32_are_refused(scale):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"scale=.*finite and nonzero in float32"):
    cj.condensate_attention(q, k, v, _spec("exact"), scale=scale)


# --- the fast steps ---------------------------------------------------------------

DSPEC = cj.CondensateSpec(anchor=16, window=64, top_k=0, selection="blocks",
                          block_size=16, top_blocks=4)


def _decode_inputs():
  q, k, v = _qkv(t=1, s=512, d=16, seed=1)
  return q, k, v, jnp.array([500])


@pytest.mark.parametrize("method,kernel", [("rank", "fused"), ("rank", "split"),
                                           ("superblock", "split")])
@pytest.mark.parametrize("where,heads", [
    (("q", 0, 0, np.nan), [0]), (("k", 200, 0, np.nan), [0, 1]),     # a middle block
    (("k", 480, 1, np.nan), [2, 3]), (("k", 3, 1, np.nan), [2, 3]),  # window, anchor
    (("k", 200, 0, np.inf), [0, 1]), (("v", 490, 0, np.nan), [0, 1]),
    (("v", 505, 0, np.nan), []), (("k", 505, 1, np.nan), [])])       # beyond kv_length
def test_decode_step_poisons_exactly_the_heads_that_read_it(method, kernel, where, heads):
  q, k, v, lengths = _decode_inputs()
  arrays = dict(q=q, k=k, v=v)
  which, pos, head, value = where
  arrays[which] = arrays[which].at[0, pos, head, 0].set(value)
  summ = cj.build_summaries(arrays["k"], 16, lengths)
  out, lse, eps, ids = fast.decode_step(arrays["q"], arrays["k"], arrays["v"], summ.kmin,
                                        summ.kmax, lengths, spec=DSPEC, scale=0.25,
                                        method=method, kernel=kernel, return_blocks=True)
  expected = np.isin(np.arange(2 * G), heads)
  np.testing.assert_array_equal(~np.isfinite(np.asarray(out)[0, 0]).all(-1), expected)
  np.testing.assert_array_equal(np.isnan(np.asarray(eps)[0]), expected)
  np.testing.assert_array_equal(np.isnan(np.asarray(lse)[0]), expected)
  assert ((np.asarray(ids) >= -1) & (np.asarray(ids) < 32)).all()


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(q=a["q"].astype(jnp.int32)), r"q.dtype=int32"),
    (lambda a: a.update(kv_lengths=jnp.array([1000])), r"kv_lengths has values in \[1000"),
    (lambda a: a.update(kmin=a["kmin"][:, :, :1], kmax=a["kmax"][:, :, :1]),
     r"kmin.shape=\(1, 32, 1, 16\): expected \[B, nb, Hkv, D\]"),
    (lambda a: a.update(kmin=a["kmin"][..., :8], kmax=a["kmax"][..., :8]), r"kmin.shape"),
    (lambda a: a.update(kmin=a["kmax"], kmax=a["kmin"]), r"kmin > kmax"),
    (lambda a: a.update(scale=float("nan")), r"scale=nan"),
    (lambda a: a.update(q=a["q"][:, 0]), r"q.shape=\(1, 4, 16\): expected 4 dims"),
    (lambda a: a.update(q=jnp.concatenate([a["q"]] * 2, 1)), r"one query per row"),
    (lambda a: a.update(spec=_spec("exact")), r"spec.selection='exact'"),
    (lambda a: a.update(spec=_spec("certified")), r"implements selection='blocks'"),
    (lambda a: a.update(kernel="x"), r"kernel='x'"),
    (lambda a: a.update(bounds="x"), r"bounds='x'"),
    (lambda a: a.update(num_splits=0), r"num_splits=0"),
])
def test_decode_step_validates_its_inputs(change, message):
  q, k, v, lengths = _decode_inputs()
  summ = cj.build_summaries(k, 16, lengths)
  args = dict(q=q, kmin=summ.kmin, kmax=summ.kmax, kv_lengths=lengths, spec=DSPEC,
              scale=0.25)
  change(args)
  with pytest.raises(ValueError, match=message):
    fast.decode_step(args.pop("q"), k, v, args.pop("kmin"), args.pop("kmax"),
                     args.pop("kv_lengths"), **args)


def test_prefill_step_poisons_exactly_the_queries_that_read_it():
  spec = cj.CondensateSpec(anchor=16, window=32, top_k=0, selection="blocks",
                           block_size=16, top_blocks=2)
  q, k, v = _qkv(t=128, s=128, d=16, seed=2)
  ref, _ = fast.prefill_step(q, k, v, spec=spec, scale=0.25)
  for which, head, heads in (("q", 1, [1]), ("k", 1, [2, 3]), ("v", 0, [0, 1])):
    arrays = dict(q=q, k=k, v=v)
    arrays[which] = arrays[which].at[0, 70, head, 0].set(np.nan)
    o, lse = fast.prefill_step(arrays["q"], arrays["k"], arrays["v"], spec=spec, scale=0.25)
    expected = np.zeros((128, 2 * G), bool)
    if which == "q":
      expected[70, heads] = True
    else:
      expected[70:, heads] = True
    np.testing.assert_array_equal(~np.isfinite(np.asarray(o)[0]).all(-1), expected)
    np.testing.assert_array_equal(np.isnan(np.asarray(lse)[0]).T, expected)
    np.testing.assert_array_equal(np.asarray(o)[0, :64], np.asarray(ref)[0, :64])
  for kw, message in ((dict(scale=float("nan")), "scale=nan"),
                      (dict(scale=0.25, method="x"), "method='x'"),
                      (dict(scale=0.25, kernel_kw=(("a",),)), "kernel_kw")):
    with pytest.raises(ValueError, match=message):
      fast.prefill_step(q, k, v, spec=spec, **kw)
  with pytest.raises(ValueError, match=r"q.shape\[1\]=128: expected 1 <= T <= S = 64"):
    fast.prefill_step(q, k[:, :64], v[:, :64], spec=spec, scale=0.25)


def test_decode_step_with_an_empty_set_gives_zeros_not_nan():
  q, k, v, lengths = _decode_inputs()
  spec = DSPEC.replace(anchor=0, window=0, top_blocks=0)
  summ = cj.build_summaries(k, 16, lengths)
  out, lse, eps = fast.decode_step(q, k, v, summ.kmin, summ.kmax, lengths, spec=spec,
                                   scale=0.25, method="superblock", kernel="split")
  assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
  assert (np.asarray(eps) == 1).all()


def test_a_window_beyond_int32_reach_restricts_nothing():
  q, k, v = _qkv()
  for causal in (True, False):
    np.testing.assert_array_equal(
        np.asarray(cj.dense_attention(q, k, v, causal=causal, sliding_window=2**31 - 1)),
        np.asarray(cj.dense_attention(q, k, v, causal=causal)))
