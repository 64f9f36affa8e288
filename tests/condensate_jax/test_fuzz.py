"""Issue #15: property / fuzz tests over the public API: a clear error or a correct result.

Each example draws valid inputs (shapes, GQA, dtypes, padding, positions, windows, specs)
and then, half of the time, one malformation of one argument. A malformed call must raise
a `ValueError` that names the argument; any other exception fails. A valid call must give
the right answer: the float64 loop reference (tests/references/np_reference.py) for exact
selection (queries within float noise of a top-k tie excluded), certificates that bound the
true dropped mass in every mode, non-finite outputs exactly where an input is poisoned,
and bitwise dense equality when the set covers every key.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import condensate_jax as cj
from condensate_jax import fast
from tests.references.np_reference import condensate_reference

FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = {"float32": (jnp.float32, 2e-4), "bfloat16": (jnp.bfloat16, 3e-2),
          "float16": (jnp.float16, 3e-3)}


@st.composite
def problems(draw):
  """Valid inputs of condensate_attention / dense_attention as a dict. Shapes and static
  arguments come from small menus (each distinct one is a new XLA compile); the values,
  lengths and positions vary freely."""
  b = draw(st.sampled_from([1, 2]))
  hkv = draw(st.sampled_from([1, 2]))
  g = draw(st.sampled_from([1, 2]))
  d = 8
  s = draw(st.sampled_from([3, 16, 24]))
  t = draw(st.sampled_from([1, 5]))
  dtype = draw(st.sampled_from(sorted(DTYPES)))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, hkv * g, d))
  k = rng.normal(size=(b, s, hkv, d))
  v = rng.normal(size=(b, s, hkv, d))
  kw = {}
  if draw(st.booleans()):
    kw["kv_lengths"] = np.asarray([draw(st.integers(0, s)) for _ in range(b)], np.int32)
  short = (kw["kv_lengths"] < t).any() if "kv_lengths" in kw else s < t
  if draw(st.booleans()) or short:   # default positions need >= T keys in every row
    kw["q_positions"] = np.asarray(
        [[draw(st.integers(0, s - 1)) for _ in range(t)] for _ in range(b)], np.int32)
  kw["causal"] = draw(st.booleans())
  window = draw(st.sampled_from([None, None, 2, 9]))
  if window is not None:
    kw["sliding_window"] = window
  scale = draw(st.sampled_from([None, None, 0.3]))
  if scale is not None:
    kw["scale"] = scale
  selection = draw(st.sampled_from(["exact", "exact", "bounded", "blocks", "certified"]))
  spec = dict(anchor=draw(st.sampled_from([0, 1, 3])), window=draw(st.sampled_from([0, 4])),
              top_k=draw(st.sampled_from([0, 2, 8])))
  if selection != "exact":
    spec.update(selection=selection, block_size=4, top_blocks=draw(st.sampled_from([1, 3])))
    if selection == "certified":   # the Pallas block kernels serve its block bounds
      spec.update(bounds="blocks")
  implementation = draw(st.sampled_from(
      ["xla", "xla_gathered", "pallas"] if selection == "exact" else ["xla", "pallas"]))
  return dict(q=q, k=k, v=v, dtype=dtype, kw=kw, spec=spec, implementation=implementation)


# malformation name -> (function of the problem dict, the argument the error must name)
def _set_kw(name, value):
  def change(p):
    p["kw"][name] = value(p) if callable(value) else value
  return change


def _set(name, value):
  def change(p):
    p[name] = value(p) if callable(value) else value
  return change


MALFORMATIONS = {
    "q_rank": (_set("q", lambda p: p["q"][0]), "q.shape"),
    "k_head_dim": (_set("k", lambda p: p["k"][..., :1]), "k.shape"),
    "v_len": (_set("v", lambda p: p["v"][:, :0]), "shape"),
    "heads": (_set("q", lambda p: np.concatenate([p["q"], p["q"][:, :, :1]], 2)
                   if p["k"].shape[2] > 1 else p["q"][..., :0]), "q"),
    "batch": (lambda p: p.update(k=np.concatenate([p["k"]] * 2), v=np.concatenate([p["v"]] * 2)),
              "k.shape[0]"),
    "int_dtype": (_set("dtype", "int32"), "dtype"),
    "f64_dtype": (_set("dtype", "float64"), "dtype"),
    "kv_neg": (_set_kw("kv_lengths", lambda p: -np.ones(p["q"].shape[0], np.int32)),
               "kv_lengths"),
    "kv_big": (_set_kw("kv_lengths", lambda p: np.full(p["q"].shape[0], p["k"].shape[1] + 1)),
               "kv_lengths"),
    "kv_shape": (_set_kw("kv_lengths", lambda p: np.ones((p["q"].shape[0], 2), np.int32)),
                 "kv_lengths"),
    "kv_float": (_set_kw("kv_lengths", lambda p: np.ones(p["q"].shape[0], np.float32)),
                 "kv_lengths"),
    "pos_big": (_set_kw("q_positions", lambda p: np.full(p["q"].shape[:2], p["k"].shape[1])),
                "q_positions"),
    "pos_neg": (_set_kw("q_positions", lambda p: -np.ones(p["q"].shape[:2], np.int32)),
                "q_positions"),
    "pos_shape": (_set_kw("q_positions", lambda p: np.zeros(p["q"].shape[:1], np.int32)),
                  "q_positions"),
    "pos_huge": (_set_kw("q_positions", lambda p: np.full(p["q"].shape[:2], 2**40)),
                 "q_positions"),
    "window_zero": (_set_kw("sliding_window", 0), "sliding_window"),
    "window_bool": (_set_kw("sliding_window", True), "sliding_window"),
    "window_float": (_set_kw("sliding_window", 2.5), "sliding_window"),
    "window_huge": (_set_kw("sliding_window", 2**40), "sliding_window"),
    "scale_nan": (_set_kw("scale", float("nan")), "scale"),
    "scale_neg": (_set_kw("scale", -1.0), "scale"),
    "scale_overflow": (_set_kw("scale", 1e39), "scale"),
    "scale_str": (_set_kw("scale", "0.5"), "scale"),
    "causal": (_set_kw("causal", "yes"), "causal"),
    "implementation": (_set("implementation", "flash"), "implementation"),
    "spec_type": (_set("spec", None), "spec"),
    "spec_negative": (lambda p: p["spec"].update(top_k=-1), "top_k"),
    "spec_huge": (lambda p: p["spec"].update(window=2**40), "window"),
    "return_stats": (_set("return_stats", "no"), "return_stats"),
}


def _arrays(p):
  if p["dtype"] not in DTYPES:    # as NumPy arrays: jnp would turn float64 into float32
    return tuple(np.asarray(p[n]).astype(p["dtype"]) for n in ("q", "k", "v"))
  return tuple(jnp.asarray(p[n]).astype(DTYPES[p["dtype"]][0]) for n in ("q", "k", "v"))


def _call(p, fn="condensate"):
  q, k, v = _arrays(p)
  if fn == "dense":
    return cj.dense_attention(q, k, v, **p["kw"])
  spec = p["spec"] if not isinstance(p["spec"], dict) else cj.CondensateSpec(**p["spec"])
  return cj.condensate_attention(q, k, v, spec, implementation=p["implementation"],
                                 return_stats=p.get("return_stats", True), **p["kw"])


def _reference(p):
  q, k, v = (np.asarray(x, np.float64) for x in _arrays(p))
  sp = p["spec"]
  kw = dict(p["kw"])
  return condensate_reference(q, k, v, anchor=sp["anchor"], window=sp["window"],
                              top_k=sp["top_k"], **kw)


def _check_result(p, out, stats):
  q = p["q"]
  assert out.shape == q.shape and out.dtype == DTYPES[p["dtype"]][0]
  o = np.asarray(out, np.float64)
  assert np.isfinite(o).all()
  cap = np.asarray(stats.captured_mass)
  drop = np.asarray(stats.dropped_mass)
  bound = np.asarray(stats.dropped_mass_bound)
  assert ((cap >= 0) & (cap <= 1 + 1e-6)).all()
  assert (drop <= bound * (1 + 1e-4) + 1e-6).all(), "a certificate below the true mass"
  if p["spec"].get("selection", "exact") == "exact":
    ref = _reference(p)
    tol = DTYPES[p["dtype"]][1]
    ok = ~ref.ambiguous.transpose(0, 2, 1)                                    # [B, T, Hq]
    np.testing.assert_allclose(o[ok], ref.out[ok], rtol=tol, atol=tol)


HALF_VALID = [None] * len(MALFORMATIONS) + sorted(MALFORMATIONS)


@FUZZ
@given(problems(), st.sampled_from(HALF_VALID))
def test_condensate_attention_gives_a_clear_error_or_the_right_answer(p, malformation):
  if malformation is None:
    out, stats = _call(p)
    _check_result(p, out, stats)
    return
  change, argument = MALFORMATIONS[malformation]
  change(p)
  with pytest.raises(ValueError, match=argument.replace("[", r"\[").replace(".", r"\.")):
    _call(p)


@FUZZ
@given(problems(), st.sampled_from([None] * 20 + sorted(
    m for m in MALFORMATIONS if not m.startswith(("spec", "implementation", "return")))))
def test_dense_attention_gives_a_clear_error_or_the_right_answer(p, malformation):
  if malformation is None:
    out = np.asarray(_call(p, "dense"), np.float64)
    p["spec"] = dict(anchor=0, window=0, top_k=p["k"].shape[1])     # dense = all keys
    ref = _reference(p)
    tol = DTYPES[p["dtype"]][1]
    np.testing.assert_allclose(out, ref.out, rtol=tol, atol=tol)
    return
  change, argument = MALFORMATIONS[malformation]
  change(p)
  with pytest.raises(ValueError, match=argument.replace("[", r"\[").replace(".", r"\.")):
    _call(p, "dense")


@settings(FUZZ, max_examples=16)
@given(problems(), st.sampled_from(["q", "k", "v"]), st.data())
def test_a_poisoned_entry_reaches_exactly_its_readers(p, which, data):
  if p["spec"].get("selection", "exact") == "exact":
    p["spec"]["top_k"] = p["k"].shape[1]            # covers every key: bitwise dense too
  arr = p[which].copy()
  idx = tuple(data.draw(st.integers(0, n - 1)) for n in arr.shape)
  arr[idx] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
  p[which] = arr
  out, stats = _call(p)
  dense = _call(p, "dense")
  bad = ~np.isfinite(np.asarray(out, np.float64)).all(-1)                      # [B, T, Hq]
  # exactly where dense reads it (dense is poisoned by the definition, finite.py)
  np.testing.assert_array_equal(bad, ~np.isfinite(np.asarray(dense, np.float64)).all(-1))
  nan_stats = np.isnan(np.asarray(stats.dropped_mass_bound)).transpose(0, 2, 1)
  np.testing.assert_array_equal(nan_stats, bad)
  if p["spec"].get("selection", "exact") == "exact" and p["implementation"] == "xla":
    np.testing.assert_array_equal(np.asarray(out)[~bad], np.asarray(dense)[~bad])


@FUZZ
@given(st.integers(1, 40), st.sampled_from([1, 3, 4, 16]), st.data())
def test_summaries_give_a_clear_error_or_the_right_boxes(s, block_size, data):
  rng = np.random.default_rng(s)
  k = jnp.asarray(rng.normal(size=(1, s, 2, 4)), jnp.float32)
  bad = data.draw(st.sampled_from([None, "block_size", "kv_lengths", "keys"]))
  if bad == "block_size":
    with pytest.raises(ValueError, match="block_size"):
      cj.build_summaries(k, data.draw(st.sampled_from([0, -1, 2**40, 2.0, True])))
    return
  if bad == "kv_lengths":
    with pytest.raises(ValueError, match="kv_lengths"):
      cj.build_summaries(k, block_size, kv_lengths=[s + 1])
    return
  if bad == "keys":
    with pytest.raises(ValueError, match="k"):
      cj.build_summaries(k[0], block_size)
    return
  length = data.draw(st.integers(0, s))
  summ = cj.build_summaries(k, block_size, kv_lengths=[length])
  kn = np.asarray(k)[0, :length]
  for blk in range(summ.num_blocks):
    keys = kn[blk * block_size:(blk + 1) * block_size]
    if len(keys):
      np.testing.assert_array_equal(np.asarray(summ.kmin)[0, blk], keys.min(0))
      np.testing.assert_array_equal(np.asarray(summ.kmax)[0, blk], keys.max(0))
    else:
      assert np.isposinf(np.asarray(summ.kmin)[0, blk]).all()


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["ok", "q_dtype", "q_rank", "two_queries", "kv_big", "kv_zero",
                        "summary_heads", "summary_dim", "summary_dtype", "swapped",
                        "scale", "spec", "kernel", "method"]), st.integers(0, 2**16))
def test_decode_step_gives_a_clear_error_or_the_specified_answer(case, seed):
  spec = cj.CondensateSpec(anchor=4, window=8, top_k=0, selection="blocks", block_size=8,
                           top_blocks=2)
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(1, 1, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 128, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, 128, 2, 8)), jnp.float32)
  length = int(rng.integers(1, 129))
  summ = cj.build_summaries(k, 8, [length])
  args = dict(q=q, kmin=summ.kmin, kmax=summ.kmax, kv_lengths=jnp.array([length]),
              spec=spec, scale=0.3, method="superblock", kernel="split")
  expect = {
      "q_dtype": ("q", q.astype(jnp.int32)), "q_rank": ("q", q[0]),
      "two_queries": ("q", jnp.concatenate([q, q], 1)),
      "kv_big": ("kv_lengths", jnp.array([129])), "kv_zero": ("kv_lengths", jnp.array([0])),
      "summary_heads": ("kmin", summ.kmin[:, :, :1]), "summary_dim": ("kmin", summ.kmin[..., :4]),
      "summary_dtype": ("kmin", summ.kmin.astype(jnp.bfloat16)),
      "swapped": ("kmin", summ.kmax), "scale": ("scale", float("inf")),
      "spec": ("spec", spec.replace(selection="certified", bounds="blocks")), "kernel": ("kernel", "x"),
      "method": ("method", "x")}
  if case != "ok":
    name, value = expect[case]
    args[name] = value
    if case in ("summary_heads", "summary_dim", "summary_dtype"):
      args["kmax"] = value
    if case == "swapped":
      args["kmax"] = summ.kmin
    with pytest.raises(ValueError, match={"swapped": "kmin > kmax"}.get(case, name)):
      fast.decode_step(args.pop("q"), k, v, args.pop("kmin"), args.pop("kmax"),
                       args.pop("kv_lengths"), **args)
    return
  out, _, eps = fast.decode_step(q, k, v, summ.kmin, summ.kmax, jnp.array([length]),
                                 **{n: args[n] for n in ("spec", "scale", "method", "kernel")})
  # the specification: condensate_attention's "blocks" mode at the decode position
  ref, stats = cj.condensate_attention(q, k, v, spec, q_positions=[[length - 1]],
                                       kv_lengths=[length], scale=0.3, return_stats=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
  assert (np.asarray(stats.dropped_mass)[0, :, 0] <= np.asarray(eps)[0] * (1 + 1e-4) + 1e-6).all()
