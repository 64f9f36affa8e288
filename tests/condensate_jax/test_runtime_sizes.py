"""CondensateSpec.top_k_capacity: anchor / window / top_k as runtime values of one
compiled program, bit for bit the static spec's outputs and stats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensate_jax import CondensateSpec, condensate_attention
from condensate_jax import generate as gen
from condensate_jax.spec import Sizes
from condensate_jax.weights.registry import load_model


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint32) if x.dtype == np.float32 else x


def _assert_bitwise(a, b, what):
  np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=what)


def _qkv(seed, b=2, t=5, s=37, hq=6, hkv=2, d=8, ties=False):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, hq, d))
  k = jax.random.normal(kk, (b, s, hkv, d))
  if ties:   # repeated keys: equal scores, the lower position must win at the cut
    k = k.at[:, 1::3].set(k[:, ::3][:, :k[:, 1::3].shape[1]])
  return q, k, jax.random.normal(kv, (b, s, hkv, d))


# (anchor, window, top_k): empty parts, a cut inside ties, top_k beyond the middle keys
SIZES = [(1, 4, 3), (0, 0, 0), (2, 1, 9), (0, 6, 16), (3, 2, 40), (50, 50, 1)]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("anchor,window,top_k", SIZES)
def test_runtime_sizes_bitwise_equal_static(anchor, window, top_k, ties):
  q, k, v = _qkv(3, ties=ties)
  kw = dict(q_positions=jnp.array([[30, 31, 32, 33, 34], [10, 11, 12, 13, 14]]),
            kv_lengths=jnp.array([35, 15]), return_stats=True)
  static = CondensateSpec(anchor=anchor, window=window, top_k=top_k)
  for capacity in sorted({max(top_k, 1), 16 if top_k <= 16 else 64, 64}):
    if capacity < top_k:
      continue
    dynamic = static.replace(top_k_capacity=capacity)
    out1, st1 = condensate_attention(q, k, v, static, **kw)
    out2, st2 = condensate_attention(q, k, v, dynamic, **kw)
    _assert_bitwise(out1, out2, f"output, capacity {capacity}")
    for name, a, b in zip(st1._fields, st1, st2):
      _assert_bitwise(a, b, f"stats.{name}, capacity {capacity}")


def test_sliding_window_and_gqa_bitwise_equal_static():
  q, k, v = _qkv(5, b=1, t=7, s=29, hq=8, hkv=2)
  kw = dict(sliding_window=11, return_stats=True)
  static = CondensateSpec(anchor=1, window=2, top_k=3)
  out1, st1 = condensate_attention(q, k, v, static, **kw)
  out2, st2 = condensate_attention(q, k, v, static.replace(top_k_capacity=8), **kw)
  _assert_bitwise(out1, out2, "output")
  _assert_bitwise(st1.dropped_mass_bound, st2.dropped_mass_bound, "bound")


def test_one_program_serves_every_size():
  q, k, v = _qkv(7)
  traces = []

  @jax.jit
  def run(q, k, v, sizes):
    traces.append(1)
    program = CondensateSpec(anchor=0, window=0, top_k=0, top_k_capacity=32)
    return condensate_attention(q, k, v, program, sizes=sizes)

  for a, w, t in [(1, 4, 3), (2, 0, 9), (0, 8, 32)]:
    got = run(q, k, v, Sizes(np.int32(a), np.int32(w), np.int32(t)))
    want = condensate_attention(q, k, v, CondensateSpec(anchor=a, window=w, top_k=t))
    _assert_bitwise(got, want, f"sizes {(a, w, t)}")
  assert len(traces) == 1


def test_spec_validation():
  with pytest.raises(ValueError, match="top_k_capacity=8 with selection='blocks'"):
    CondensateSpec(selection="blocks", top_k=8, top_k_capacity=8)
  with pytest.raises(ValueError, match="top_k=9 with top_k_capacity=8"):
    CondensateSpec(top_k=9, top_k_capacity=8)
  with pytest.raises(ValueError, match="top_k_capacity=-1"):
    CondensateSpec(top_k_capacity=-1)
  spec = CondensateSpec(anchor=2, window=3, top_k=4, top_k_capacity=8)
  assert spec.program_spec == CondensateSpec(anchor=0, window=0, top_k=0, top_k_capacity=8)
  assert tuple(int(x) for x in spec.sizes) == (2, 3, 4)
  assert CondensateSpec().program_spec == CondensateSpec() and CondensateSpec().sizes is None


def test_bad_sizes_raise():
  q, k, v = _qkv(1)
  program = CondensateSpec(anchor=0, window=0, top_k=0, top_k_capacity=8)
  sizes = Sizes(1, 2, 9)
  with pytest.raises(ValueError, match=r"top_k in \[0, 8\]"):
    condensate_attention(q, k, v, program, sizes=sizes)
  with pytest.raises(ValueError, match="expected spec.program_spec"):
    condensate_attention(q, k, v, program.replace(top_k=3), sizes=Sizes(1, 2, 3))
  with pytest.raises(ValueError, match="given with spec.top_k_capacity=0"):
    condensate_attention(q, k, v, CondensateSpec(), sizes=Sizes(1, 2, 3))
  with pytest.raises(ValueError, match="three int scalars"):
    condensate_attention(q, k, v, program, sizes=Sizes(1, 2, [3, 4]))
  with pytest.raises(ValueError, match="not bools or floats"):
    condensate_attention(q, k, v, program, sizes=Sizes(1.7, 2, 3))
  with pytest.raises(ValueError, match="not bools or floats"):
    condensate_attention(q, k, v, program, sizes=Sizes(True, 2, 3))
  with pytest.raises(ValueError, match=r"anchor, window in \[0, 2147483647\]"):
    condensate_attention(q, k, v, program, sizes=Sizes(2**40, 2, 3))
  with pytest.raises(ValueError, match="runtime sizes are implemented by 'xla'"):
    condensate_attention(q, k, v, program.replace(top_k=3), implementation="xla_gathered")


@pytest.fixture(scope="module")
def lm():
  return load_model("tiny-random")


def test_model_logits_stats_and_ragged_generate_bitwise_equal_static(lm):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, lm.vocab_size, (2, 40))
  before_fwd, before_dec = gen.forward._cache_size(), gen.decode._cache_size()
  grid = [(1, 4, 3), (0, 8, 0), (3, 2, 40)]
  for a, w, t in grid:
    static = CondensateSpec(anchor=a, window=w, top_k=t, dense_layers=(1,))
    dynamic = static.replace(top_k_capacity=40)
    l1, s1 = lm.logits(tokens, attention=static, return_stats=True)
    l2, s2 = lm.logits(tokens, attention=dynamic, return_stats=True)
    _assert_bitwise(l1, l2, f"logits {(a, w, t)}")
    for name, x, y in zip(s1._fields, s1, s2):
      _assert_bitwise(x, y, f"stats.{name} {(a, w, t)}")
    g1 = lm.generate(tokens, 6, attention=static, prompt_lengths=[40, 29])
    g2 = lm.generate(tokens, 6, attention=dynamic, prompt_lengths=[40, 29])
    _assert_bitwise(g1, g2, f"generate {(a, w, t)}")
  # one program each for the four runtime-size specs, one per static spec
  assert gen.forward._cache_size() - before_fwd == len(grid) + 1
  assert gen.decode._cache_size() - before_dec == len(grid) + 1


def test_covering_spec_stats_have_every_head(lm):
  # top_k >= S - anchor - window takes exact selection's no-top_k path: its stats must
  # still be [B, Hq, T] (stacked with a dense layer's)
  tokens = np.arange(30, dtype=np.int32)[None] % lm.vocab_size
  spec = CondensateSpec(anchor=2, window=3, top_k=25, dense_layers=(0,))
  logits, stats = lm.logits(tokens, attention=spec, return_stats=True)
  dense = lm.logits(tokens)
  _assert_bitwise(logits, dense, "covering logits")
  hq = lm.config.num_heads
  assert stats.set_size.shape == (lm.num_layers, 1, hq, 30)
  np.testing.assert_array_equal(np.asarray(stats.set_size), np.asarray(stats.visible))


def test_model_step_with_runtime_sizes(lm):
  tokens = np.arange(20, dtype=np.int32)[None] % lm.vocab_size
  static = CondensateSpec(anchor=1, window=3, top_k=2)
  dynamic = static.replace(top_k_capacity=4)
  outs = []
  for spec in (static, dynamic):
    cache = lm.init_cache(1, 24)
    logits, cache = lm.step(tokens, cache, attention=spec)
    nxt, _ = lm.step(tokens[:, :1], cache, attention=spec)
    outs.append((logits, nxt))
  _assert_bitwise(outs[0][0], outs[1][0], "prefill logits")
  _assert_bitwise(outs[0][1], outs[1][1], "step logits")
