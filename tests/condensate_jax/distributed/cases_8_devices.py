"""The distributed cases, run by test_distributed.py in a subprocess whose CPU platform
has 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 must precede jax's
start, so these cannot share the suite's process). Every case compares the mesh call with
the single-device `cj.condensate_attention` on the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import condensate_jax as cj
from condensate_jax import distributed as dist

assert len(jax.devices()) == 8, "run through test_distributed.py (8 CPU devices)"
MESH = Mesh(np.array(jax.devices()).reshape(4, 2), ("seq", "heads"))
MESH_8 = Mesh(np.array(jax.devices()).reshape(8), ("seq",))
AXES = [("seq", "heads"), ("seq", None), (None, "heads")]
SPECS = {
    "selects": cj.CondensateSpec(anchor=2, window=4, top_k=7),
    "top_k beyond a shard": cj.CondensateSpec(anchor=1, window=3, top_k=21),
    "anchor and window only": cj.CondensateSpec(anchor=3, window=5, top_k=0),
    "top-k only": cj.CondensateSpec(anchor=0, window=0, top_k=5),
    "covers every key": cj.CondensateSpec(anchor=2, window=4, top_k=64),
}


def _inputs(seed, b=2, t=5, s=64, hq=4, hkv=2, d=8, ints=False):
  rng = np.random.default_rng(seed)
  draw = ((lambda shape: rng.integers(-1, 2, shape)) if ints else rng.standard_normal)
  f = lambda shape: jnp.asarray(draw(shape), jnp.float32)
  return f((b, t, hq, d)), f((b, s, hkv, d)), jnp.asarray(rng.standard_normal((b, s, hkv, d)),
                                                          jnp.float32)


def _compare(want, got, atol=2e-6):
  (wo, ws), (go, gs) = want, got
  np.testing.assert_allclose(np.asarray(go), np.asarray(wo), rtol=0, atol=atol)
  for name in ("set_size", "visible", "keys_scored"):
    np.testing.assert_array_equal(np.asarray(getattr(gs, name)),
                                  np.asarray(getattr(ws, name)), err_msg=name)
  for name in ("captured_mass", "dropped_mass", "dropped_mass_bound"):
    np.testing.assert_allclose(np.asarray(getattr(gs, name)), np.asarray(getattr(ws, name)),
                               rtol=1e-5, atol=1e-6, err_msg=name)


CASES = [(name, AXES[0]) for name in SPECS] + [("selects", axes) for axes in AXES[1:]]


@pytest.mark.parametrize("name,axes", CASES, ids=lambda a: f"{a}")
def test_equals_single_device(name, axes):
  """Ragged lengths, GQA (4 q / 2 kv heads), a sliding window, 5 queries."""
  q, k, v = _inputs(0)
  kw = dict(kv_lengths=jnp.array([64, 41]), sliding_window=30, return_stats=True)
  want = cj.condensate_attention(q, k, v, SPECS[name], **kw)
  got = dist.condensate_attention(q, k, v, SPECS[name], mesh=MESH, seq_axis=axes[0],
                                  head_axis=axes[1], **kw)
  _compare(want, got)
  if axes[0] is None:        # heads alone: no merge, the same operations
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_exact_ties_across_shard_borders_pick_the_lower_positions():
  """Integer scores (many ties, some straddling the 8 shards of 8 keys); v one-hot per
  position, so each output row shows which keys the set holds."""
  q, k, _ = _inputs(1, b=1, t=3, s=64, hq=2, hkv=1, d=4, ints=True)
  pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, 60)])                 # d 4 -> 64: v's
  q, k = pad(q), pad(k)
  v = jnp.eye(64, dtype=jnp.float32)[None, :, None, :]                 # [1, S, 1, S]
  spec = cj.CondensateSpec(anchor=1, window=2, top_k=9)
  want = cj.condensate_attention(q, k, v, spec)
  got = dist.condensate_attention(q, k, v, spec, mesh=MESH_8, seq_axis="seq")
  np.testing.assert_array_equal(np.asarray(got) > 0, np.asarray(want) > 0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_decode_and_prefill():
  q, k, v = _inputs(2, t=1)
  spec = SPECS["selects"]
  lengths = jnp.array([64, 17])
  want = cj.condensate_attention(q, k, v, spec, kv_lengths=lengths, return_stats=True)
  got = dist.condensate_attention(q, k, v, spec, mesh=MESH_8, seq_axis="seq",
                                  kv_lengths=lengths, return_stats=True)
  _compare(want, got)
  q, k, v = _inputs(3, t=64)
  want = cj.condensate_attention(q, k, v, spec, return_stats=True)
  got = dist.condensate_attention(q, k, v, spec, mesh=MESH, seq_axis="seq",
                                  head_axis="heads", return_stats=True)
  _compare(want, got)


def test_dense_and_sharded_inputs_under_jit():
  q, k, v = _inputs(4)
  kvs = NamedSharding(MESH, P(None, "seq", "heads", None))
  k_s, v_s = jax.device_put(k, kvs), jax.device_put(v, kvs)
  fn = jax.jit(lambda q, k, v: dist.dense_attention(q, k, v, mesh=MESH, seq_axis="seq",
                                                    head_axis="heads"))
  np.testing.assert_allclose(np.asarray(fn(q, k_s, v_s)),
                             np.asarray(cj.dense_attention(q, k, v)), atol=2e-6)


def test_a_nan_key_reaches_the_same_readers():
  q, k, v = _inputs(5)
  k = k.at[0, 37, 1, 2].set(jnp.nan)
  spec = SPECS["selects"]
  want = cj.condensate_attention(q, k, v, spec)
  got = dist.condensate_attention(q, k, v, spec, mesh=MESH, seq_axis="seq",
                                  head_axis="heads")
  np.testing.assert_array_equal(np.isnan(np.asarray(got)), np.isnan(np.asarray(want)))
  assert np.isnan(np.asarray(got)).any() and not np.isnan(np.asarray(got)).all()


def test_bad_mesh_or_axes_are_clear_errors():
  q, k, v = _inputs(6, s=60)
  spec = SPECS["selects"]
  with pytest.raises(ValueError, match=r"k.shape\[1\]=60: .* expected a multiple of 8"):
    dist.condensate_attention(q, k, v, spec, mesh=MESH_8, seq_axis="seq")
  q, k, v = _inputs(6)
  with pytest.raises(ValueError, match=r"seq_axis='rows': not an axis of the mesh"):
    dist.condensate_attention(q, k, v, spec, mesh=MESH, seq_axis="rows")
  with pytest.raises(ValueError, match="expected two different mesh axes"):
    dist.condensate_attention(q, k, v, spec, mesh=MESH, seq_axis="seq", head_axis="seq")
  with pytest.raises(ValueError, match=r"k.shape\[2\]=2 KV heads: .* multiple of 4"):
    dist.condensate_attention(q, k, v, spec, mesh=Mesh(np.array(jax.devices()).reshape(
        2, 4), ("seq", "heads")), head_axis="heads")
  with pytest.raises(ValueError, match="expected a jax.sharding.Mesh"):
    dist.condensate_attention(q, k, v, spec, mesh="mesh", seq_axis="seq")
  with pytest.raises(ValueError, match="implements selection='exact'"):
    dist.condensate_attention(q, k, v, spec.replace(selection="indexed"), mesh=MESH)
