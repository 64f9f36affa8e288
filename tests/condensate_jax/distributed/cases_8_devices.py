"""The distributed cases, run by test_distributed.py in a subprocess whose CPU platform
has 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 must precede jax's
start, so these cannot share the suite's process). Every case compares the mesh call with
the single-device `cj.condensate_attention` on the same inputs."""

import dataclasses

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
  with pytest.raises(ValueError, match="top_k_capacity=8: the distributed call implements"):
    dist.condensate_attention(q, k, v, spec.replace(top_k_capacity=8), mesh=MESH)
  with pytest.raises(ValueError, match="query_blocks=True with causal=True, sliding_window=9"):
    dist.condensate_attention(q, k, v, QUERY_BLOCKS["4-key blocks"], mesh=MESH,
                              seq_axis="seq", sliding_window=9)
  with pytest.raises(ValueError, match="a key index serves selection='indexed' and "):
    dist.condensate_attention(q, k, v, spec, mesh=MESH, index=build_index(k))
  with pytest.raises(ValueError, match="expected spec.index_bits=4"):
    dist.condensate_attention(q, k, v, INDEXED, mesh=MESH, index=build_index(k, bits=8))


# ------------------------------------------------------------------ selection="indexed"

from condensate_jax.selection.index import build_index  # noqa: E402

# few candidates (9 for top_k 4): the candidate cut and the exact cut both bind
INDEXED = cj.CondensateSpec(anchor=2, window=4, top_k=4, selection="indexed", candidates=9)


@pytest.mark.parametrize("axes", AXES, ids=str)
def test_indexed_equals_single_device(axes):
  """The same index on both sides: the same candidates, set and counts; the certificate
  to rounding. Ragged lengths, GQA, a sliding window, prefill rows and decode."""
  for t, seed in ((5, 10), (1, 11)):
    q, k, v = _inputs(seed, t=t)
    kw = dict(kv_lengths=jnp.array([64, 41]), sliding_window=30, return_stats=True)
    index = build_index(k, 4, kw["kv_lengths"])
    want = cj.condensate_attention(q, k, v, INDEXED, index=index, **kw)
    got = dist.condensate_attention(q, k, v, INDEXED, mesh=MESH, seq_axis=axes[0],
                                    head_axis=axes[1], index=index, **kw)
    _compare(want, got)
    assert np.asarray(want[1].keys_scored).max() < np.asarray(want[1].visible).max()


BLOCKS = {
    "blocks": cj.CondensateSpec(anchor=2, window=4, selection="blocks", block_size=4,
                                top_blocks=3),
    "centre ranked": cj.CondensateSpec(anchor=1, window=3, selection="blocks",
                                       block_size=8, top_blocks=2, block_rank="centre"),
}


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("axes", AXES, ids=str)
def test_blocks_equals_single_device(name, axes):
  """selection="blocks": the same blocks (set sizes, keys scored), outputs and the
  certificate to rounding; prefill rows and decode, ragged, GQA, a sliding window."""
  for t, seed in ((5, 13), (1, 14)):
    q, k, v = _inputs(seed, t=t)
    kw = dict(kv_lengths=jnp.array([64, 41]), sliding_window=30, return_stats=True)
    want = cj.condensate_attention(q, k, v, BLOCKS[name], **kw)
    got = dist.condensate_attention(q, k, v, BLOCKS[name], mesh=MESH, seq_axis=axes[0],
                                    head_axis=axes[1], **kw)
    _compare(want, got)
    assert np.asarray(want[1].set_size).min() < np.asarray(want[1].visible).max()


QUERY_BLOCKS = {
    "4-key blocks": cj.CondensateSpec(anchor=2, window=4, selection="blocks", block_size=4,
                                      top_blocks=3, query_blocks=True),
    "8-key blocks, anchor 9": cj.CondensateSpec(anchor=9, window=3, selection="blocks",
                                                block_size=8, top_blocks=2,
                                                query_blocks=True),
    "no anchor or window": cj.CondensateSpec(anchor=0, window=0, selection="blocks",
                                             block_size=4, top_blocks=5, query_blocks=True),
}


@pytest.mark.parametrize("name", QUERY_BLOCKS)
@pytest.mark.parametrize("axes", AXES, ids=str)
def test_query_blocks_equal_single_device(name, axes):
  """query_blocks: per block of query rows the prefill lists' blocks, found over the
  shards; the same sets (set sizes, keys scored), outputs and certificates to rounding.
  A prefill chunk of 13 rows (a partial last query block) at ragged positions, a chunk
  starting mid-block, and decode (per-query blocks)."""
  for t, seed, pos in ((13, 30, None), (13, 31, [[40], [20]]), (1, 32, None)):
    q, k, v = _inputs(seed, t=t)
    kw = dict(kv_lengths=jnp.array([64, 41]), return_stats=True)
    if pos is not None:
      kw["q_positions"] = jnp.asarray(pos) + jnp.arange(t)[None]
      kw["kv_lengths"] = jnp.asarray(pos)[:, 0] + t
    want = cj.condensate_attention(q, k, v, QUERY_BLOCKS[name], **kw)
    got = dist.condensate_attention(q, k, v, QUERY_BLOCKS[name], mesh=MESH,
                                    seq_axis=axes[0], head_axis=axes[1], **kw)
    _compare(want, got)
    if t > 1:
      blocks = cj.condensate_attention(q, k, v, QUERY_BLOCKS[name].replace(
          query_blocks=False), **kw)
      assert not np.array_equal(np.asarray(blocks[1].set_size),
                                np.asarray(want[1].set_size))   # per-block lists differ
    assert np.asarray(want[1].set_size).min() < np.asarray(want[1].visible).max()


def test_query_blocks_key_by_key_with_ties_across_shards():
  sets, _ = _one_hot_case(22, QUERY_BLOCKS["4-key blocks"].replace(top_blocks=4))
  per_query, _ = _one_hot_case(22, BLOCKS["blocks"].replace(top_blocks=4))
  assert (sets != per_query).any()


def test_query_blocks_skip_blocks_ranked_minus_inf():
  """A ranking that overflows to -inf drops the block on one device (prefill_lists);
  the mesh must not fill the free top_blocks slots with such blocks."""
  rng = np.random.default_rng(0)
  q = jnp.full((1, 4, 1, 4), 1e20, jnp.float32)
  k = jnp.asarray(rng.uniform(0.5, 1, (1, 64, 1, 4)), jnp.float32).at[:, :48].set(-1e20)
  v = jnp.asarray(rng.standard_normal((1, 64, 1, 4)), jnp.float32)
  spec = cj.CondensateSpec(anchor=0, window=4, selection="blocks", block_size=4,
                           top_blocks=5, query_blocks=True)
  want = cj.condensate_attention(q, k, v, spec, return_stats=True)
  got = dist.condensate_attention(q, k, v, spec, mesh=MESH_8, seq_axis="seq",
                                  return_stats=True)
  np.testing.assert_array_equal(np.asarray(got[1].set_size), np.asarray(want[1].set_size))
  np.testing.assert_array_equal(np.asarray(got[1].keys_scored),
                                np.asarray(want[1].keys_scored))


BOUNDED = {
    # top_k 5 with 4-key blocks: the bound rule stops the loop early on some queries
    "bounded": cj.CondensateSpec(anchor=2, window=4, top_k=5, selection="bounded",
                                 block_size=4),
    "bounded, 8-key blocks": cj.CondensateSpec(anchor=1, window=3, top_k=3,
                                               selection="bounded", block_size=8),
    "bounded, top_k 0": cj.CondensateSpec(anchor=2, window=3, top_k=0,
                                          selection="bounded", block_size=4),
    "certified on blocks": cj.CondensateSpec(anchor=2, window=4, selection="certified",
                                             bounds="blocks", block_size=4, epsilon=0.02),
    "certified, 8-key blocks": cj.CondensateSpec(anchor=1, window=3, selection="certified",
                                                 bounds="blocks", block_size=8,
                                                 epsilon=1e-3),
}


# the loop stops before the last block on some query (checked on the single device);
# "certified, 8-key blocks" at eps 1e-3 expands every block on these inputs
STOPS_EARLY = ("bounded", "bounded, 8-key blocks", "certified on blocks")


def _peaked(seed, t, *, faint, loud, n, span):
  """_inputs with the keys scaled by `faint` and n keys (among the first `span`) set to
  `loud` times the last query's group mean: a few keys hold the mass."""
  q, k, v = _inputs(seed, t=t)
  rng = np.random.default_rng(seed)
  k = faint * k
  for b, j in zip(rng.integers(0, 2, n), rng.integers(0, span, n)):
    k = k.at[b, j].set(loud * q[b, -1].reshape(2, 2, -1).mean(1))
  return q, k, v


@pytest.mark.parametrize("name", BOUNDED)
@pytest.mark.parametrize("axes", AXES, ids=str)
def test_block_loops_equal_single_device(name, axes):
  """selection="bounded" / "certified" (bounds="blocks"): the blocks the single-device
  loop expands (keys scored), the set (sizes, outputs) and the certificate to rounding;
  prefill rows and decode, ragged, GQA, a sliding window; peaked queries so that the loop
  stops before the last block."""
  for t, seed, window in ((5, 30, 30), (1, 31, None)):
    # faint keys and a few loud ones along each query: their blocks are expanded first
    # and the bound rule then stops the loop (keys_scored < visible below)
    q, k, v = _peaked(seed, t, faint=0.05, loud=4.0, n=12, span=40)
    kw = dict(kv_lengths=jnp.array([64, 41]), sliding_window=window, return_stats=True)
    want = cj.condensate_attention(q, k, v, BOUNDED[name], **kw)
    got = dist.condensate_attention(q, k, v, BOUNDED[name], mesh=MESH, seq_axis=axes[0],
                                    head_axis=axes[1], **kw)
    _compare(want, got)
    if name in STOPS_EARLY:     # some query's loop stopped before its last block
      assert (np.asarray(want[1].keys_scored) < np.asarray(want[1].visible)).any()


def test_certified_stops_on_the_mass_of_anchor_and_window():
  # loud anchor and window keys hold most of the mass: their share of Z is what lets the
  # certificate stop early, so a mesh that left them out of the mass would differ
  q, k, v = _inputs(32, t=3)
  k = 0.05 * k
  k = k.at[:, :2].set(2.0 * q[:, :1, ::2].repeat(2, 1)).at[:, 60:].set(
      2.0 * q[:, :1, ::2].repeat(4, 1))
  spec = BOUNDED["certified on blocks"].replace(epsilon=0.05)
  kw = dict(kv_lengths=jnp.array([64, 64]), return_stats=True)
  want = cj.condensate_attention(q, k, v, spec, **kw)
  got = dist.condensate_attention(q, k, v, spec, mesh=MESH_8, seq_axis="seq", **kw)
  _compare(want, got)
  assert (np.asarray(want[1].keys_scored) < np.asarray(want[1].visible)).any()


def test_block_loop_sets_key_by_key_with_ties_across_shards():
  _one_hot_case(22, BOUNDED["bounded"])
  _one_hot_case(23, BOUNDED["bounded"].replace(top_k=9))
  sets, _ = _one_hot_case(24, BOUNDED["certified on blocks"].replace(epsilon=0.3))
  visible = np.arange(62, 65)[None, :, None]           # 3 causal queries at the end of 64
  assert (sets.sum(axis=-1) < visible).any()            # some loop stopped early


# selection="certified" on the key index (its default bounds)
CERTIFIED = {
    "eps 0.02": cj.CondensateSpec(anchor=2, window=4, top_k=2, selection="certified",
                                  epsilon=0.02),
    "eps 1e-3, top_k 0": cj.CondensateSpec(anchor=1, window=3, top_k=0,
                                           selection="certified", epsilon=1e-3),
    "2-bit index, top_k 9": cj.CondensateSpec(anchor=2, window=2, top_k=9,
                                              selection="certified", epsilon=0.05,
                                              index_bits=2),
}


@pytest.mark.parametrize("name", CERTIFIED)
@pytest.mark.parametrize("axes", AXES, ids=str)
def test_certified_on_the_index_equals_single_device(name, axes):
  """The same index on both sides: the same set (sizes, keys scored: the first n keys in
  bound order), outputs and the certificate to rounding; prefill rows and decode, ragged,
  GQA, a sliding window; peaked queries so that the set stops short of every key."""
  spec = CERTIFIED[name]
  for t, seed, window in ((5, 40, 30), (1, 41, None)):
    q, k, v = _peaked(seed, t, faint=0.3, loud=3.0, n=10, span=50)
    kw = dict(kv_lengths=jnp.array([64, 41]), sliding_window=window, return_stats=True)
    index = build_index(k, spec.index_bits, kw["kv_lengths"])
    want = cj.condensate_attention(q, k, v, spec, index=index, **kw)
    got = dist.condensate_attention(q, k, v, spec, mesh=MESH, seq_axis=axes[0],
                                    head_axis=axes[1], index=index, **kw)
    _compare(want, got)
    scored, visible = np.asarray(want[1].keys_scored), np.asarray(want[1].visible)
    assert (scored < visible).any(), "some query's set stops short"
    assert (np.asarray(want[1].dropped_mass_bound) <= spec.epsilon * (1 + 1e-3)).all()
  got = dist.condensate_attention(q, k, v, spec, mesh=MESH_8, seq_axis="seq",
                                  **kw)                   # the index built inside the call
  _compare(cj.condensate_attention(q, k, v, spec, **kw), got)


def test_certified_on_the_index_key_by_key_with_ties_across_shards():
  """Integer keys (ties of bounds across the 8 shard borders: the lower position first)
  and one-hot values: the set of the mesh call key by key."""
  for seed, eps in ((50, 0.3), (51, 0.05)):
    spec = CERTIFIED["eps 0.02"].replace(epsilon=eps)
    sets, _ = _one_hot_case(seed, spec, index=lambda k: build_index(k, 4))
    assert (sets.sum(axis=-1) < np.arange(62, 65)[None, :, None]).any()


def test_blocks_need_whole_blocks_per_shard():
  q, k, v = _inputs(15)
  with pytest.raises(ValueError, match="not whole blocks of spec.block_size=16"):
    dist.condensate_attention(q, k, v, BLOCKS["blocks"].replace(block_size=16),
                              mesh=MESH_8, seq_axis="seq")


def _one_hot_case(seed, spec, index=None):
  """Integer scores (ties at every cut, some across the 8 shard borders) and v one-hot per
  position: each output row shows which keys the set holds."""
  q, k, _ = _inputs(seed, b=1, t=3, s=64, hq=2, hkv=1, d=4, ints=True)
  pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, 60)])
  q, k = pad(q), pad(k)
  v = jnp.eye(64, dtype=jnp.float32)[None, :, None, :]
  kw = {} if index is None else {"index": index(k)}
  want = cj.condensate_attention(q, k, v, spec, **kw)
  got = dist.condensate_attention(q, k, v, spec, mesh=MESH_8, seq_axis="seq", **kw)
  np.testing.assert_array_equal(np.asarray(got) > 0, np.asarray(want) > 0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  return np.asarray(want) > 0, (q, k, v)


@pytest.mark.parametrize("seed", [20, 21])
def test_indexed_and_blocks_sets_key_by_key_with_ties_across_shards(seed):
  exact, (q, k, v) = _one_hot_case(seed, cj.CondensateSpec(anchor=1, window=2, top_k=6))
  indexed, _ = _one_hot_case(seed, INDEXED.replace(anchor=1, window=2, top_k=6,
                                                    candidates=8, index_bits=2),
                             index=lambda k: build_index(k, 2))
  assert (indexed != exact).any()          # the 2-bit candidate cut binds somewhere
  _one_hot_case(seed, BLOCKS["blocks"])


def test_broken_index_entries_and_nan_keys_reach_the_same_readers():
  q, k, v = _inputs(16)
  index = build_index(k)
  index = dataclasses.replace(index, step=index.step.at[0, 20, 1].set(jnp.nan))
  for spec, kw in ((INDEXED, {"index": index}), (INDEXED, {}), (BLOCKS["blocks"], {}),
                   (BOUNDED["bounded"], {})):
    kk = k if kw else k.at[0, 37, 1, 2].set(jnp.nan)
    want = cj.condensate_attention(q, kk, v, spec, return_stats=True, **kw)
    got = dist.condensate_attention(q, kk, v, spec, mesh=MESH, seq_axis="seq",
                                    head_axis="heads", return_stats=True, **kw)
    for a, b in ((got[0], want[0]), (got[1].dropped_mass_bound, want[1].dropped_mass_bound)):
      np.testing.assert_array_equal(np.isnan(np.asarray(a)), np.isnan(np.asarray(b)))
    assert np.isnan(np.asarray(got[0])).any()
    ok = ~np.isnan(np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[0])[ok], np.asarray(want[0])[ok], atol=2e-6)


def test_indexed_builds_its_index_over_the_shards():
  """index=None: built from the sharded k (mu and sigma summed across shards, so equal
  to the single-device index up to summation order): same set sizes, outputs close."""
  q, k, v = _inputs(12)
  want = cj.condensate_attention(q, k, v, INDEXED, return_stats=True)
  got = dist.condensate_attention(q, k, v, INDEXED, mesh=MESH_8, seq_axis="seq",
                                  return_stats=True)
  _compare(want, got, atol=1e-5)


# ------------------------------------------------------------------ models over a mesh

from condensate_jax.weights import tiny  # noqa: E402


@pytest.mark.parametrize("family", ["llamalike", "gemma3"])
def test_models_over_a_mesh_equal_one_device(family):
  """Teacher-forced logits and stats, ragged greedy decoding with the cache sharded along
  the sequence (and heads where the model has several KV heads); Gemma 3's local layers
  (window 16) through the same call (its decoding: the spec only, to keep CI time)."""
  lm = tiny.tiny_random(family)
  heads = "heads" if lm.config.num_kv_heads % 2 == 0 else None
  placement = dist.Placement(MESH, seq_axis="seq", head_axis=heads)
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, lm.vocab_size, (2, 45)).astype(np.int32)     # 45: padded to 48
  spec = cj.CondensateSpec(anchor=2, window=4, top_k=6)
  want, want_stats = lm.logits(tokens, attention=spec, return_stats=True)
  got, got_stats = lm.logits(tokens, attention=spec, implementation=placement,
                             return_stats=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got_stats.set_size),
                                np.asarray(want_stats.set_size))
  lengths = np.array([45, 30])
  indexed = cj.CondensateSpec(anchor=2, window=4, top_k=4, selection="indexed",
                              candidates=8)
  blocks = cj.CondensateSpec(anchor=2, window=4, selection="blocks", block_size=4,
                             top_blocks=2)
  bounded = cj.CondensateSpec(anchor=2, window=4, top_k=4, selection="bounded",
                              block_size=4)
  certified = cj.CondensateSpec(anchor=2, window=4, selection="certified",
                                bounds="blocks", block_size=4, epsilon=0.05)
  on_index = cj.CondensateSpec(anchor=2, window=4, top_k=2, selection="certified",
                               epsilon=0.05)
  query_blocks = blocks.replace(query_blocks=True)
  for attention in ((None, spec, indexed, blocks, query_blocks, bounded, certified, on_index)
                    if family == "llamalike" else (spec,)):
    want = lm.generate(tokens, 5, attention, prompt_lengths=lengths)
    got = lm.generate(tokens, 5, attention, implementation=placement, prompt_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_model_placement_errors():
  lm = tiny.tiny_random("llamalike")
  tokens = np.zeros((1, 8), np.int32)
  with pytest.raises(ValueError, match="implements selection in"):
    lm.logits(tokens, attention=cj.CondensateSpec(anchor=1, window=1, top_k=4,
                                                  top_k_capacity=8),
              implementation=dist.Placement(MESH, seq_axis="seq"))
  with pytest.raises(ValueError, match=r"Placement.seq_axis='rows': not an axis"):
    lm.logits(tokens, implementation=dist.Placement(MESH, seq_axis="rows"))
  with pytest.raises(ValueError, match="expected a multiple of 8"):
    lm.logits(tokens, implementation=dist.Placement(MESH_8, head_axis="seq"))


def test_parity_runner_over_a_mesh(tmp_path):
  """The smoke parity grid with config.attention.mesh: the dense reference and every row
  through the mesh, the covers-everything gate passing within rounding."""
  from experiments import cli, parity  # pylint: disable=import-outside-toplevel
  config = cli.load_config("smoke.py")
  config.attention.mesh = "seq=4,heads=2"
  config.attention.top_k = (4,)
  config.attention.window = (8,)
  config.prompts.num = 1
  config.generate.new_tokens = 6
  config.plots = False
  import json  # pylint: disable=import-outside-toplevel
  parity.run(config, tmp_path, progress=False)
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  cond = [r for r in rows if r["kind"] == "condensate"]
  assert len(cond) == 2 and all(r["implementation"] == "xla@mesh(seq=4,heads=2)"
                                for r in cond)
  covering = [r for r in cond if r["covers"]]
  assert len(covering) == 1 and covering[0]["exact"]
  assert covering[0]["max_abs_logit_diff"] <= 1e-4 * covering[0]["dense_max_abs_logit"]
  with pytest.raises(Exception, match="config.attention.mesh='seq=3,rows=2'"):
    config.attention.mesh = "seq=3,rows=2"
    parity.run(config, tmp_path / "bad", progress=False)


def test_mesh_bench_job(tmp_path):
  """The multi-device benchmark's wiring: rows for 1 and 4 devices, each equal to the
  one-device call, with the collectives' bytes of its shapes."""
  from experiments import cli  # pylint: disable=import-outside-toplevel
  from experiments.bench import mesh_bench  # pylint: disable=import-outside-toplevel
  config = cli.load_config("mesh_bench.py:size=smoke")
  config.devices, config.lengths, config.batches = (1, 4), (1024,), (1,)
  result = mesh_bench.run(config, tmp_path, progress=False)
  one, four = result["rows"]
  assert (one["devices"], four["devices"]) == (1, 4)
  assert one["gather_bytes"] == 0 and four["gather_bytes"] == 4 * 64 * 1 * 4 * 5
  # the stated bytes are the compiled program's: no collective beyond them (a global
  # count over the sequence outside the shards once gathered a [B, S, Hkv] array)
  for name in ("dense", "condensate"):
    assert four[f"{name}_compiled_gather_bytes"] == (four["gather_bytes"]
                                                     if name == "condensate" else 0)
    assert four[f"{name}_compiled_reduce_bytes"] == four["merge_bytes"]
    assert four[f"{name}_compiled_other_bytes"] == 0
  for r in (one, four):
    assert r["dense_s"] > 0 and r["condensate_s"] > 0
    assert r["dense_max_abs_vs_one_device"] <= 1e-6
    assert r["condensate_max_abs_vs_one_device"] <= 1e-6
  assert "| 4 | 1K | 1 |" in result["table"]
