"""Bad input raises ValueError naming the argument, its value and what is allowed."""

import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj

F32 = jnp.float32


def qkv(b=2, t=4, s=8, hq=4, hkv=2, d=8, dtype=F32):
  return (jnp.ones((b, t, hq, d), dtype), jnp.ones((b, s, hkv, d), dtype),
          jnp.ones((b, s, hkv, d), dtype))


SPEC = cj.CondensateSpec(1, 2, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(anchor=-1), r"anchor=-1.*int in \[0, "),
    (dict(window=-3), r"window=-3.*int in \[0, "),
    (dict(top_k=-1), r"top_k=-1.*int in \[0, "),
    (dict(top_k=2.5), r"top_k=2.5.*int"),
    (dict(anchor=True), r"anchor=True"),
    (dict(selection="fast"), r"selection='fast'.*'exact'"),
    (dict(block_size=0), r"block_size=0.*int in \[1, "),
    (dict(epsilon=0.0), r"epsilon=0.0.*\(0, 1\)"),
    (dict(epsilon=float("nan")), r"epsilon=nan"),
    (dict(dense_layers=(1, -2)), r"dense_layers=\(1, -2\).*non-negative"),
    (dict(dense_layers=3), r"dense_layers=3"),
    (dict(block_rank="mean"), r"block_rank='mean'.*'bound', 'centre'"),
    (dict(block_rank="centre", selection="certified"),
     r"block_rank='centre' with selection='certified'"),
])
def test_spec_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    cj.CondensateSpec(**kwargs)


def test_spec_is_frozen_hashable_and_normalised():
  a = cj.CondensateSpec(1, 2, 3, dense_layers=(3, 0, 3))
  b = cj.CondensateSpec(1, 2, 3, dense_layers=[0, 3])
  assert a == b and hash(a) == hash(b) and a.dense_layers == (0, 3)
  assert a.for_layer(0) is None and a.for_layer(1) is a
  assert a.budget == 6 and a.covers(6) and not a.covers(7)
  with pytest.raises(Exception):
    a.top_k = 5


def _call(fn, *args, **kwargs):
  if fn is cj.dense_attention:
    return fn(*args, **kwargs)
  return fn(*args, SPEC, **kwargs)


FNS = [cj.dense_attention, cj.condensate_attention]


@pytest.mark.parametrize("fn", FNS, ids=["dense", "condensate"])
@pytest.mark.parametrize("make, kwargs, match", [
    (lambda: (jnp.ones((2, 4, 8)),) + qkv()[1:], {}, r"q.shape=\(2, 4, 8\).*4 dims"),
    (lambda: qkv()[:2] + (jnp.ones((2, 8, 2, 4)),), {}, r"k.shape=.*v.shape=.*equal"),
    (lambda: qkv(hq=3), {}, r"q heads 3, k/v heads 2.*multiple"),
    (lambda: (qkv()[0], jnp.ones((3, 8, 2, 8)), jnp.ones((3, 8, 2, 8))), {},
     r"k.shape\[0\]=3.*batch size of q, 2"),
    (lambda: (qkv()[0], jnp.ones((2, 8, 2, 4)), jnp.ones((2, 8, 2, 4))), {},
     r"k.shape\[3\]=4.*head dim of q, 8"),
    (lambda: qkv(dtype=jnp.int32), {}, r"q.dtype=int32.*float32.*bfloat16.*float16"),
    (lambda: (jnp.ones((2, 4, 4, 8), jnp.bfloat16),) + qkv()[1:], {},
     r"dtypes bfloat16, float32, float32.*one dtype"),
    (qkv, dict(kv_lengths=jnp.array([8, 9])), r"kv_lengths.*\[8, 9\].*\[0, 8\]"),
    (qkv, dict(kv_lengths=jnp.array([8])), r"kv_lengths.shape=\(1,\).*\(2,\)"),
    (qkv, dict(kv_lengths=jnp.array([8.0, 8.0])), r"kv_lengths.dtype=float32.*integer"),
    (qkv, dict(q_positions=jnp.array([[0, 1, 2, 8]] * 2)),
     r"q_positions.*\[0, 8\].*\[0, 7\]"),
    (qkv, dict(q_positions=jnp.array([[-1, 1, 2, 3]] * 2)), r"q_positions.*\[-1, 3\]"),
    (qkv, dict(q_positions=jnp.zeros((2, 3), jnp.int32)),
     r"q_positions.shape=\(2, 3\).*\(2, 4\)"),
    (qkv, dict(sliding_window=0), r"sliding_window=0.*None or an int in \[1, "),
    (qkv, dict(scale=-1.0), r"scale=-1.0.*a float > 0 that stays finite"),
    (qkv, dict(causal="yes"), r"causal='yes'.*True or False"),
    (lambda: (jnp.ones((1, 1, 2, 4)), jnp.ones((1, 0, 2, 4)), jnp.ones((1, 0, 2, 4))), {},
     r"k.shape\[1\]=0"),
    (lambda: (jnp.ones((1, 1, 2, 0)), jnp.ones((1, 3, 2, 0)), jnp.ones((1, 3, 2, 0))), {},
     r"q.shape\[3\]=0.*head dim >= 1"),
    (qkv, dict(kv_lengths=np.array([2**32 + 3, 8], np.uint64)),
     r"kv_lengths has values in \[8, 4294967299\].*\[0, 8\]"),
    (qkv, dict(q_positions=np.full((2, 4), -2**40, np.int64)),
     r"q_positions has values in \[-1099511627776, -1099511627776\]"),
])
def test_attention_validation(fn, make, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _call(fn, *make(), **kwargs)


def test_condensate_specific_validation():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"spec=\(1, 2, 3\).*CondensateSpec"):
    cj.condensate_attention(q, k, v, (1, 2, 3))
  with pytest.raises(ValueError, match=r"implementation='cuda'.*'xla'"):
    cj.condensate_attention(q, k, v, SPEC, implementation="cuda")
  with pytest.raises(ValueError, match=r"return_stats='no'"):
    cj.condensate_attention(q, k, v, SPEC, return_stats="no")
  with pytest.raises(ValueError,
                     match=r"implementation='xla_masked' with spec.selection='blocks'"):
    cj.condensate_attention(q, k, v, SPEC.replace(selection="blocks"),
                            implementation="xla_masked")
  with pytest.raises(ValueError, match=r"implementation=\['xla'\]: expected a str"):
    cj.condensate_attention(q, k, v, SPEC, implementation=["xla"])
  with pytest.raises(ValueError, match=r"selection='blocks': condensate_mask"):
    cj.condensate_mask(q, k, SPEC.replace(selection="blocks"))
  with pytest.raises(ValueError, match=r"v: expected an array"):
    cj.condensate_attention(q, k, [[1.0]], SPEC)


def test_numpy_inputs_accepted():
  q, k, v = (np.asarray(x) for x in qkv())
  np.testing.assert_array_equal(cj.condensate_attention(q, k, v, SPEC),
                                cj.condensate_attention(*qkv(), SPEC))
