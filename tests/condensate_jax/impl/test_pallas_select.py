"""`implementation="pallas_select"` (the specification with its top-k selections on the
Pallas kernel) against "xla": the same sets (checked on one scores array), so outputs
and stats bit for bit on a CPU, for "exact" and "indexed"; rows longer than the kernel's
through the two levels; errors. On a CPU the kernel runs interpreted. On a GPU XLA
compiles the same jnp code into the two programs with other fusions (seen on an H200:
whole rows' normalisers 1-7 ulps apart, the sets equal), so there the float outputs and
stats are compared within 16 ulps and the integer stats exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax.impl import pallas_select
from condensate_jax.selection import index as index_lib
from pallas_kernels.top_select import api as top_api

CASES = {
    # name: (B, T, S, Hq, Hkv, D, kwargs)
    "decode_gqa_ragged": (3, 1, 80, 6, 2, 16, dict(kv_lengths=np.array([80, 41, 5]))),
    "prefill_mqa": (1, 40, 40, 4, 1, 32, {}),
    "prefill_gqa_sliding": (2, 24, 24, 4, 2, 16, dict(sliding_window=16)),
    "chunk_of_a_long_row": (1, 8, 96, 2, 2, 16,
                            dict(q_positions=np.arange(88, 96)[None],
                                 kv_lengths=np.array([96]))),
    "not_causal": (2, 5, 33, 2, 1, 16, dict(causal=False, kv_lengths=np.array([33, 20]))),
}
SPECS = {
    "exact": cj.CondensateSpec(anchor=2, window=4, top_k=5),
    "exact_topk_only": cj.CondensateSpec(anchor=0, window=0, top_k=7),
    "indexed": cj.CondensateSpec(anchor=2, window=4, top_k=5, selection="indexed",
                                 candidates=12),
    "indexed_2bit": cj.CondensateSpec(anchor=1, window=3, top_k=3, selection="indexed",
                                      index_bits=2),
}


def _inputs(b, t, s, hq, hkv, d, seed, integer=False):
  rng = np.random.default_rng(seed)
  draw = ((lambda sh: rng.integers(-2, 3, sh)) if integer else rng.standard_normal)
  return tuple(jnp.asarray(draw(sh), jnp.float32)
               for sh in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))


def _bits(x):
  x = np.asarray(x)
  return x.view(np.int32) if x.dtype == np.float32 else x


BITWISE = jax.default_backend() == "cpu"


def _assert_bitwise(got, want):
  for name, a, e in zip(("out",) + cj.AttentionStats._fields, got, want):
    a, e = np.asarray(a), np.asarray(e)
    if BITWISE or not np.issubdtype(e.dtype, np.floating):
      np.testing.assert_array_equal(_bits(a), _bits(e), err_msg=name)
    else:
      np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=name)
      ok = ~np.isnan(e)
      np.testing.assert_array_max_ulp(a[ok], e[ok], maxulp=16)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("case", ["decode_gqa_ragged", "prefill_gqa_sliding"])
def test_the_sets_are_the_specifications(case, spec_name):
  """The selection functions on one scores array, with and without the kernel: the same
  set bit for bit on every platform (no float arithmetic in between)."""
  from condensate_jax import geometry, softmax   # pylint: disable=import-outside-toplevel
  from condensate_jax.impl import xla_indexed    # pylint: disable=import-outside-toplevel
  from condensate_jax.selection import exact     # pylint: disable=import-outside-toplevel
  b, t, s, hq, hkv, d, kw = CASES[case]
  spec = SPECS[spec_name]
  q, k, _ = _inputs(b, t, s, hq, hkv, d, seed=11)
  lengths = jnp.asarray(kw.get("kv_lengths", np.full((b,), s)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t)) if t > 1 else (
      lengths[:, None] - 1)
  lo, hi = geometry.visible_range(pos, lengths, causal=True,
                                  sliding_window=kw.get("sliding_window"))
  scores = softmax.scores(q, k, 0.25)
  if spec.selection == "exact":
    sets = [exact.select(scores, lo, hi, spec, top_fn=f).in_set
            for f in (None, pallas_select.top_fn)]
  else:
    index = index_lib.build(k, lengths, spec.index_bits)
    sets = [xla_indexed.select(scores, q, index, lo, hi, spec, 0.25, f).in_set
            for f in (None, pallas_select.top_fn)]
  np.testing.assert_array_equal(np.asarray(sets[1]), np.asarray(sets[0]))
  assert not np.asarray(sets[0]).all()


def _run(q, k, v, spec, kw, implementation, **extra):
  out, stats = cj.condensate_attention(q, k, v, spec, implementation=implementation,
                                       return_stats=True, **kw, **extra)
  return (out,) + tuple(stats)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_bitwise_equal_to_xla(case, spec_name):
  b, t, s, hq, hkv, d, kw = CASES[case]
  spec = SPECS[spec_name]
  q, k, v = _inputs(b, t, s, hq, hkv, d, seed=sorted(CASES).index(case))
  want = _run(q, k, v, spec, kw, "xla")
  got = _run(q, k, v, spec, kw, "pallas_select")
  _assert_bitwise(got, want)
  assert np.any(np.asarray(want[4]) < np.asarray(want[5])), "the set drops keys somewhere"


@pytest.mark.parametrize("spec_name", ["exact", "indexed"])
def test_ties_and_the_two_level_rows(spec_name, monkeypatch):
  """Integer scores (many ties: the lower position wins in both) and, with the kernel's
  row limit lowered to 32, rows of 96 keys through top_set's two levels."""
  spec = SPECS[spec_name]
  q, k, v = _inputs(2, 6, 96, 4, 2, 8, seed=3, integer=True)
  kw = dict(q_positions=np.broadcast_to(np.arange(90, 96), (2, 6)),
            kv_lengths=np.array([96, 70]))
  want = _run(q, k, v, spec, kw, "xla")
  _assert_bitwise(_run(q, k, v, spec, kw, "pallas_select"), want)
  monkeypatch.setattr(top_api, "MAX_ROW", 32)
  pallas_select.condensate_pallas_select.clear_cache()   # MAX_ROW is read at trace time
  try:
    assert top_api.two_level_chunk(96, spec.top_k) > 1
    _assert_bitwise(_run(q, k, v, spec, kw, "pallas_select"), want)
  finally:
    pallas_select.condensate_pallas_select.clear_cache()


def test_given_index_and_covering_spec_is_dense():
  q, k, v = _inputs(2, 12, 12, 4, 2, 16, seed=5)
  lengths = jnp.array([12, 9], jnp.int32)
  spec = cj.CondensateSpec(anchor=1, window=2, top_k=4, selection="indexed", candidates=8)
  index = index_lib.build_index(k, spec.index_bits, kv_lengths=lengths)
  pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  kw = dict(kv_lengths=lengths, q_positions=pos)
  _assert_bitwise(_run(q, k, v, spec, kw, "pallas_select", index=index),
                  _run(q, k, v, spec, kw, "xla", index=index))
  cover = cj.CondensateSpec(anchor=1, window=2, top_k=12, selection="indexed")
  dense = cj.dense_attention(q, k, v, **kw)
  for s in (cover, cj.CondensateSpec(anchor=1, window=2, top_k=12)):
    out = cj.condensate_attention(q, k, v, s, **kw, implementation="pallas_select")
    _assert_bitwise((out,), (dense,))


def test_nonfinite_inputs_poison_as_xla():
  spec = SPECS["indexed"]
  q, k, v = _inputs(1, 6, 40, 2, 1, 8, seed=7)
  k = k.at[0, 10, 0, 3].set(jnp.nan)
  kw = dict(q_positions=np.arange(34, 40)[None], kv_lengths=np.array([40]))
  got, want = (_run(q, k, v, spec, kw, i) for i in ("pallas_select", "xla"))
  assert np.isnan(np.asarray(want[0])).any()
  _assert_bitwise(got, want)


@pytest.mark.parametrize("spec,match", [
    (cj.CondensateSpec(anchor=1, window=2, top_k=2, selection="certified"),
     "'pallas_select' implements"),
    (cj.CondensateSpec(anchor=1, window=2, top_k=2, selection="blocks", block_size=4,
                       top_blocks=2), "implementation='pallas_select'"),
    (cj.CondensateSpec(anchor=1, window=2, top_k=2, top_k_capacity=4),
     "runtime sizes"),
])
def test_refused_specs(spec, match):
  q, k, v = _inputs(1, 1, 16, 2, 1, 8, seed=0)
  with pytest.raises(ValueError, match=match):
    cj.condensate_attention(q, k, v, spec, implementation="pallas_select")


def test_direct_call_refuses_other_selections():
  q, k, v = _inputs(1, 1, 16, 2, 1, 8, seed=0)
  spec = cj.CondensateSpec(anchor=1, window=2, top_k=2, selection="bounded",
                           block_size=4, top_blocks=2)
  with pytest.raises(ValueError, match="spec.selection='bounded'"):
    pallas_select.condensate_pallas_select(
        q, k, v, jnp.zeros((1, 1), jnp.int32), jnp.full((1,), 16, jnp.int32), spec=spec,
        causal=True, sliding_window=None, scale=0.25, return_stats=False)


def test_jit_traces_once_per_shape():
  spec = SPECS["exact"]
  q, k, v = _inputs(1, 4, 24, 2, 1, 8, seed=1)
  fn = jax.jit(lambda q, k, v: cj.condensate_attention(q, k, v, spec,
                                                       implementation="pallas_select"))
  _assert_bitwise((fn(q, k, v),), (cj.condensate_attention(q, k, v, spec,
                                                           implementation="xla"),))
