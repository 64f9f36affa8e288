"""The key index (selection/index.py) and selection="indexed" (impl/xla_indexed.py): bounds
that hold for every computed score (adversarial keys included), append == build, the set
equal to exact top-k's whenever the candidates hold it, certificates that bound the true
dropped mass of the set chosen, and the index's validation."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import condensate_jax as cj
from condensate_jax import softmax
from condensate_jax.selection import index as index_lib
from tests.references.np_reference import condensate_reference


def _keys(rng, s, d, kind):
  """Keys like real ones and adversarial ones: a shared offset and outlier channels,
  huge and tiny magnitudes, constant channels, duplicated keys, a single spike."""
  k = rng.normal(size=(1, s, 2, d))
  if kind == "offset_outliers":
    chan = np.ones(d)
    chan[rng.choice(d, 3, replace=False)] = 20.0
    k = k * chan + rng.normal(size=d) * 5
  elif kind == "huge":
    k = k * 1e4
  elif kind == "tiny":
    k = k * 1e-6
  elif kind == "constant_channels":
    k[..., : d // 2] = 3.0
  elif kind == "duplicates":
    k[:, 1::2] = k[:, ::2][:, : k[:, 1::2].shape[1]]
  elif kind == "spike":
    k = np.zeros_like(k)
    k[0, s // 2, :, 0] = 50.0
  return k


KINDS = ["normal", "offset_outliers", "huge", "tiny", "constant_channels", "duplicates",
         "spike"]


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.sampled_from([2, 4, 8]),
       st.sampled_from(["float32", "bfloat16"]), st.integers(0, 2**16),
       st.sampled_from([0.05, 0.35, 3.0]))
def test_bounds_hold_for_every_computed_score(kind, bits, dtype, seed, scale):
  rng = np.random.default_rng(seed)
  d = 16
  k = jnp.asarray(_keys(rng, 64, d, kind), dtype)
  q = jnp.asarray(rng.normal(size=(1, 3, 4, d)) * rng.choice([1e-3, 1.0, 30.0]), dtype)
  index = cj.build_index(k, bits)
  est, slack = index_lib.index_bounds(q, index, scale)
  s = softmax.scores(q, k, scale)
  assert np.isfinite(np.asarray(est)).all() and (np.asarray(slack) >= 0).all()
  gap = np.asarray(jnp.abs(s - est) - slack)
  assert gap.max() <= 0, f"a score outside its bounds by {gap.max()}"


def test_more_bits_give_tighter_bounds():
  rng = np.random.default_rng(0)
  k = jnp.asarray(_keys(rng, 512, 64, "offset_outliers"), jnp.float32)
  q = jnp.asarray(rng.normal(size=(1, 2, 4, 64)), jnp.float32)
  slack = [float(index_lib.index_bounds(q, cj.build_index(k, b), 0.125)[1].mean())
           for b in (2, 4, 8)]
  assert slack[0] > 3 * slack[1] > 9 * slack[2]


def test_append_equals_build_with_the_same_normalisation():
  rng = np.random.default_rng(1)
  k = jnp.asarray(_keys(rng, 40, 8, "offset_outliers"), jnp.float32)
  full = cj.build_index(k, 4, kv_lengths=[30])
  grown = full
  for j in range(30, 40):
    grown = cj.append_index(grown, k[:, j:j + 1], jnp.array([[j]]))
  again = index_lib.build(k, jnp.array([40]), 4)   # codes under the same mu, sigma:
  codes, step, err = index_lib._encode(k.astype(jnp.float32), full.mu, full.sigma, 4)
  # one key at a time or all at once: XLA fuses the division differently (an ulp), which
  # may flip a code whose value sits on a rounding edge
  diff = np.abs(np.asarray(grown.codes, int) - np.asarray(codes, int))
  assert diff.max() <= 1 and diff.mean() < 1e-2
  np.testing.assert_allclose(np.asarray(grown.step), np.asarray(step), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grown.err), np.asarray(err), rtol=1e-3, atol=1e-6)
  assert not np.array_equal(np.asarray(again.mu), np.asarray(full.mu))  # built anew: own mu
  skipped = cj.append_index(full, k[:, 35:36], jnp.array([[-1]]))
  np.testing.assert_array_equal(np.asarray(skipped.codes), np.asarray(full.codes))


@pytest.mark.parametrize("kind", ["normal", "offset_outliers", "duplicates"])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 40)])
def test_indexed_is_exact_top_k_when_the_candidates_hold_it(kind, causal, window):
  rng = np.random.default_rng(2)
  k = _keys(rng, 96, 16, kind)
  q = rng.normal(size=(1, 6, 4, 16))
  v = rng.normal(size=(1, 96, 2, 16))
  exact = cj.CondensateSpec(anchor=2, window=5, top_k=6)
  kw = dict(causal=causal, sliding_window=window, kv_lengths=[90],
            q_positions=[[10, 40, 60, 80, 88, 89]])
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  ref = condensate_reference(q, k, v, anchor=2, window=5, top_k=6, **kw)
  ok = ~ref.ambiguous.transpose(0, 2, 1)
  out_exact = np.asarray(cj.condensate_attention(*args, exact, **kw))
  for candidates in (24, 96):   # 4x top_k, and every key
    spec = exact.replace(selection="indexed", candidates=candidates)
    out, stats = cj.condensate_attention(*args, spec, return_stats=True, **kw)
    np.testing.assert_allclose(np.asarray(out)[ok], ref.out[ok], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[ok], out_exact[ok])
    assert (np.asarray(stats.keys_scored) <= np.asarray(stats.visible)).all()


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.sampled_from([2, 4, 8]), st.integers(0, 2**16),
       st.sampled_from([1, 4, 12]), st.sampled_from([0.1, 1.0, 4.0]))
def test_certificate_bounds_the_dropped_mass_of_the_set_chosen(kind, bits, seed,
                                                              candidates, sharp):
  rng = np.random.default_rng(seed)
  k = jnp.asarray(_keys(rng, 80, 16, kind), jnp.float32)
  q = jnp.asarray(rng.normal(size=(1, 4, 4, 16)) * sharp, jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, 80, 2, 16)), jnp.float32)
  spec = cj.CondensateSpec(anchor=1, window=3, top_k=4, selection="indexed",
                           index_bits=bits, candidates=candidates)
  _, stats = cj.condensate_attention(q, k, v, spec, return_stats=True)
  drop = np.asarray(stats.dropped_mass)
  bound = np.asarray(stats.dropped_mass_bound)
  assert np.isfinite(bound).all() and (bound <= 1).all()
  assert (drop <= bound * (1 + 1e-4) + 1e-7).all()


def test_candidates_find_needles_that_the_estimate_ranks_first():
  """Single-key needles in offset + outlier-channel keys: 4-bit indexed selection with
  4 x top_k candidates keeps what exact top-k keeps."""
  rng = np.random.default_rng(3)
  s, d = 2048, 64
  k = _keys(rng, s, d, "offset_outliers")
  needles = rng.choice(np.arange(8, s - 64), 6, replace=False)
  q = rng.normal(size=(1, 1, 4, d)) * 0.1
  for h in range(4):
    u = rng.normal(size=d)
    q[0, 0, h] += u
    k[0, needles[h], h // 2] = k[0, needles[h], h // 2] + 3 * u
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, rng.normal(size=(1, s, 2, d)))]
  exact = cj.CondensateSpec(anchor=4, window=16, top_k=32)
  _, se = cj.condensate_attention(*args, exact, return_stats=True)
  _, si = cj.condensate_attention(*args, exact.replace(selection="indexed"),
                                  return_stats=True)
  np.testing.assert_allclose(np.asarray(si.captured_mass), np.asarray(se.captured_mass),
                             rtol=1e-5)
  assert float(np.asarray(si.keys_scored).max()) <= 4 * 32 + 20


def test_validation():
  with pytest.raises(ValueError, match=r"CondensateSpec.index_bits=3: expected one of"):
    cj.CondensateSpec(selection="indexed", index_bits=3)
  with pytest.raises(ValueError, match=r"CondensateSpec.candidates=-1"):
    cj.CondensateSpec(selection="indexed", candidates=-1)
  assert cj.CondensateSpec(top_k=100).num_candidates == 400
  assert cj.CondensateSpec(top_k=4).num_candidates == 64
  assert cj.CondensateSpec(top_k=40, candidates=8).num_candidates == 40
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 2, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 16, 1, 8)), jnp.float32)
  spec = cj.CondensateSpec(anchor=1, window=2, top_k=2, selection="indexed")
  with pytest.raises(ValueError, match=r"implementation='pallas' with spec.selection="
                                       r"'indexed'"):
    cj.condensate_attention(q, k, k, spec, implementation="pallas")
  with pytest.raises(ValueError, match=r"index.bits=8: expected spec.index_bits=4"):
    cj.condensate_attention(q, k, k, spec, index=cj.build_index(k, 8))
  with pytest.raises(ValueError, match=r"index: given with spec.selection='exact'"):
    cj.condensate_attention(q, k, k, spec.replace(selection="exact"),
                            index=cj.build_index(k))
  with pytest.raises(ValueError, match=r"bits=3"):
    cj.build_index(k, 3)
  with pytest.raises(ValueError, match=r"positions has values"):
    cj.append_index(cj.build_index(k), k[:, :1], jnp.array([[16]]))
  with pytest.raises(ValueError, match=r"needs a spec that reads the key index"):
    cj.condensate_attention(q, k, k, spec.replace(selection="exact"),
                            implementation="xla_indexed")


@pytest.mark.parametrize("selection", ["indexed", "certified"])
def test_a_given_index_gives_the_same_answer_and_a_broken_one_poisons_its_readers(
    selection):
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 32, 1, 8)), jnp.float32)
  spec = cj.CondensateSpec(anchor=1, window=2, top_k=3, selection=selection,
                           epsilon=1e-2)
  pos = jnp.array([[5, 9, 14, 20, 26, 31]])
  out = cj.condensate_attention(q, k, k, spec, q_positions=pos)
  index = cj.build_index(k)
  np.testing.assert_array_equal(
      np.asarray(cj.condensate_attention(q, k, k, spec, q_positions=pos, index=index)),
      np.asarray(out))
  broken = index.__class__(index.codes, index.step.at[0, 12, 0].set(jnp.nan), index.err,
                           index.mu, index.sigma, index.bits)
  out_b = np.asarray(cj.condensate_attention(q, k, k, spec, q_positions=pos, index=broken))
  bad = ~np.isfinite(out_b[0]).all(-1)                                    # [T, Hq]
  np.testing.assert_array_equal(bad, np.repeat((np.asarray(pos[0]) >= 12)[:, None], 2, 1))
  np.testing.assert_array_equal(out_b[0][~bad], np.asarray(out)[0][~bad])


def test_extreme_magnitudes_keep_bounds_finite_and_valid():
  """Keys whose squares overflow float32 (2e19) or underflow (1e-25): sigma, the error
  term and ||q sigma|| are computed scaled, so the bounds stay finite and hold."""
  rng = np.random.default_rng(5)
  for magnitude, q_scale in ((2e19, 1.0), (1e-25, 1.0), (1e10, 1e10)):
    k = jnp.asarray(rng.normal(size=(1, 32, 1, 4)) * magnitude, jnp.float32)
    q = jnp.asarray(np.sign(rng.normal(size=(1, 2, 1, 4))) * q_scale, jnp.float32)
    for bits in (2, 8):
      est, slack = index_lib.index_bounds(q, cj.build_index(k, bits), 1.0)
      s = softmax.scores(q, k, 1.0)
      assert np.isfinite(np.asarray(est)).all() and np.isfinite(np.asarray(slack)).all()
      assert (np.asarray(jnp.abs(s - est) - slack) <= 0).all(), (magnitude, bits)


@pytest.mark.parametrize("selection", ["indexed", "certified"])
def test_one_nan_key_breaks_only_its_own_entry(selection):
  rng = np.random.default_rng(6)
  k = jnp.asarray(rng.normal(size=(1, 16, 1, 4)), jnp.float32).at[0, 5, 0, 1].set(jnp.nan)
  index = cj.build_index(k)
  assert np.isfinite(np.asarray(index.mu)).all() and np.isfinite(np.asarray(index.sigma)).all()
  finite_err = np.isfinite(np.asarray(index.err)[0, :, 0])
  assert not finite_err[5] and finite_err[np.arange(16) != 5].all()
  q = jnp.asarray(rng.normal(size=(1, 16, 1, 4)), jnp.float32)
  out = cj.condensate_attention(q, k, k, cj.CondensateSpec(
      anchor=1, window=2, top_k=2, selection=selection))
  bad = ~np.isfinite(np.asarray(out)[0]).all(-1)[:, 0]
  np.testing.assert_array_equal(bad, np.arange(16) >= 5)      # causal: readers of key 5


def test_certificate_holds_exactly_where_every_unselected_key_was_scored():
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.normal(size=(64, 16, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(64, 16, 1, 8)), jnp.float32)
  spec = cj.CondensateSpec(anchor=0, window=0, top_k=3, selection="indexed", candidates=16)
  _, stats = cj.condensate_attention(q, k, k, spec, return_stats=True)
  assert (np.asarray(stats.dropped_mass) <= np.asarray(stats.dropped_mass_bound)).all()


def test_summaries_are_refused_for_the_indexed_mode():
  k = jnp.ones((1, 8, 1, 4), jnp.float32)
  spec = cj.CondensateSpec(anchor=1, window=1, top_k=1, selection="indexed")
  with pytest.raises(ValueError, match=r"summaries: given with spec.selection='indexed'"):
    cj.condensate_attention(k, k, k, spec, summaries=cj.build_summaries(k, 4))


# --- selection="certified" on the index bounds (bounds="index", the default) -------------


def _certified_reference(q, k, spec, scale):
  """float64 NumPy choice of the certified set: the smallest n >= min(top_k, middle) whose
  first n middle keys in bound order (ties to the lower position) leave an index bound
  <= 0.999 * epsilon of the mass; returns (n [B, K, G, T], the float64 ratio at n / eps)."""
  est, slack = index_lib.index_bounds(q, cj.build_index(k, spec.index_bits), scale)
  ub = np.asarray(est, np.float64) + np.asarray(slack, np.float64)      # [B, K, G, T, S]
  sc = np.asarray(softmax.scores(q, k, scale), np.float64)
  b, kh, g, t, s = sc.shape
  n_out = np.zeros((b, kh, g, t), int)
  ratio = np.zeros((b, kh, g, t))
  for i in np.ndindex(b, kh, g, t):
    pos = s - t + i[3]                       # causal, queries at the last T positions
    static = [j for j in range(pos + 1) if j < spec.anchor or j > pos - spec.window]
    middle = [j for j in range(pos + 1) if j not in static]
    order = sorted(middle, key=lambda j: (-ub[i][j], j))
    lse = lambda x: np.logaddexp.reduce(np.asarray(x, np.float64)) if len(x) else -np.inf
    for n in range(min(spec.top_k, len(order)), len(order) + 1):
      lz = lse([sc[i][j] for j in static + order[:n]])
      ld = lse([ub[i][j] for j in order[n:]])
      eps = np.exp(ld - np.logaddexp(lz, ld)) if np.isfinite(ld) else 0.0   # d/(z+d)
      if eps <= 0.999 * spec.epsilon or n == len(order):
        n_out[i] = n
        ratio[i] = eps / (0.999 * spec.epsilon)
        break
  return n_out, ratio


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.sampled_from([2, 4, 8]), st.integers(0, 2**16),
       st.sampled_from([1e-1, 1e-3, 2.0**-20]), st.sampled_from([0.3, 1.0, 4.0]),
       st.sampled_from([0, 5]))
def test_certified_meets_epsilon_with_the_smallest_prefix_of_the_bound_order(
    kind, bits, seed, eps, sharp, top_k):
  rng = np.random.default_rng(seed)
  k = jnp.asarray(_keys(rng, 64, 16, kind), jnp.float32)
  q = jnp.asarray(rng.normal(size=(1, 6, 4, 16)) * sharp, jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, 64, 2, 16)), jnp.float32)
  spec = cj.CondensateSpec(anchor=2, window=3, top_k=top_k, selection="certified",
                           epsilon=eps, index_bits=bits)
  out, stats = cj.condensate_attention(q, k, v, spec, return_stats=True)
  drop, bound = np.asarray(stats.dropped_mass), np.asarray(stats.dropped_mass_bound)
  assert (bound <= eps).all(), bound.max()                    # met on every query
  assert (drop <= bound * (1 + 1e-4) + 1e-30).all()
  size, scored = np.asarray(stats.set_size), np.asarray(stats.keys_scored)
  np.testing.assert_array_equal(size, scored)                 # every scored key attended
  n_ref, ratio = _certified_reference(q, k, spec, 16**-0.5)
  n_static = np.minimum(np.arange(59, 65), 2 + 3)[None, None, :]           # [1, 1, T]
  n = size - n_static                                                       # [B, Hq, T]
  n_ref = n_ref.reshape(1, 4, 6)
  # equal to the float64 choice except where its stopping rule is within 0.1% (rounding)
  near = np.abs(ratio.reshape(1, 4, 6) - 1) < 1e-3
  np.testing.assert_array_equal(n[~near], n_ref[~near])
  dense = cj.dense_attention(q, k, v)
  full = (size == np.asarray(stats.visible)).transpose(0, 2, 1)            # [B, T, Hq]
  np.testing.assert_array_equal(np.asarray(out)[full], np.asarray(dense)[full])


def test_certified_scores_few_keys_where_attention_is_concentrated():
  """Queries aimed at 3 planted keys among 1024 offset + outlier keys: eps 1e-3 is met on
  every query scoring a small fraction of the keys (the index ranks the needles first);
  block bounds on the same inputs score almost everything."""
  rng = np.random.default_rng(11)
  s, d = 1024, 32
  k = _keys(rng, s, d, "offset_outliers")
  q = np.zeros((1, 4, 4, d))
  for h in range(4):
    for t in range(4):
      picks = rng.choice(np.arange(16, s - 64), 3, replace=False)
      x = (k[0, picks, h // 2] - k[0].mean(0)[h // 2]).sum(0)
      q[0, t, h] = 4.0 * x / np.linalg.norm(x) * np.sqrt(d)
  q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, s, 2, d)), jnp.float32)
  spec = cj.CondensateSpec(anchor=4, window=16, top_k=0, selection="certified",
                           epsilon=1e-3)
  _, st_i = cj.condensate_attention(q, k, v, spec, return_stats=True)
  frac = np.asarray(st_i.keys_scored / st_i.visible)
  assert (np.asarray(st_i.dropped_mass_bound) <= 1e-3).all()
  assert frac.mean() < 0.5, frac
  _, st_b = cj.condensate_attention(q, k, v, spec.replace(bounds="blocks", block_size=32,
                                                          top_blocks=2), return_stats=True)
  assert np.asarray(st_b.keys_scored / st_b.visible).mean() > frac.mean()


def test_bounds_validation():
  assert cj.CondensateSpec(selection="certified").bounds == "index"
  assert cj.CondensateSpec(selection="blocks").bounds == "blocks"
  assert cj.CondensateSpec().bounds is None
  spec = cj.CondensateSpec(selection="certified", bounds="blocks")
  assert spec.uses_blocks and not spec.uses_index
  assert spec.replace(selection="indexed").bounds == "index"   # a new mode's own default
  with pytest.raises(ValueError, match=r"CondensateSpec.bounds='box'"):
    cj.CondensateSpec(selection="certified", bounds="box")
  with pytest.raises(ValueError, match=r"bounds='index' with selection='blocks'"):
    cj.CondensateSpec(selection="blocks", bounds="index")
  k = jnp.ones((1, 8, 1, 4), jnp.float32)
  with pytest.raises(ValueError, match=r"summaries: given with spec.selection='certified'"):
    cj.condensate_attention(k, k, k, cj.CondensateSpec(selection="certified"),
                            summaries=cj.build_summaries(k, 4))
  with pytest.raises(ValueError, match=r"implementation='pallas' with spec.selection="
                                       r"'certified' \(bounds='index'\)"):
    cj.condensate_attention(k, k, k, cj.CondensateSpec(selection="certified"),
                            implementation="pallas")
