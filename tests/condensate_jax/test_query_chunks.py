"""Query chunking (`query_chunk`, `QUERY_CHUNK_ELEMENTS`): a call over chunks of queries
gives every query the set, outputs and stats of the unchunked call in every selection mode
(to float rounding: XLA computes a [c, D] x [D, S] product with other kernels for other
c, so scores may differ in the last bit), dense and a covering condensate spec stay bit
for bit equal under the same chunking (the exactness contract), the budget chunks a long
call, and bad values raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from condensate_jax import attention as attention_lib

SPECS = {
    "exact": cj.CondensateSpec(anchor=2, window=5, top_k=6),
    "exact_capacity": cj.CondensateSpec(anchor=2, window=5, top_k=6, top_k_capacity=9),
    "indexed": cj.CondensateSpec(anchor=2, window=5, top_k=6, selection="indexed",
                                 candidates=12),
    "certified_index": cj.CondensateSpec(anchor=1, window=4, selection="certified",
                                         epsilon=1e-2),
    "blocks": cj.CondensateSpec(anchor=1, window=4, selection="blocks", block_size=8,
                                top_blocks=2),
    # runs whole (test_query_blocks_specs_run_whole)
    "blocks_query_blocks": cj.CondensateSpec(anchor=1, window=4, selection="blocks",
                                             block_size=8, top_blocks=2,
                                             query_blocks=True),
    "bounded": cj.CondensateSpec(anchor=1, window=4, top_k=5, selection="bounded",
                                 block_size=8),
}


def _inputs(t=45, s=45, b=2, hq=4, hkv=2, d=16, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  return q, k, v, dict(kv_lengths=jnp.asarray([s, s - 7], jnp.int32),
                      q_positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))


def _bits(x):
  return np.asarray(x).view(np.uint8)


COUNTS = ("set_size", "visible", "keys_scored")


@pytest.mark.parametrize("name", sorted(set(SPECS) - {"blocks_query_blocks"}))
@pytest.mark.parametrize("chunk", [1, 8, 22])     # 45 = 2 * 22 + 1: the rest joins
def test_chunked_equals_whole(name, chunk):
  spec = SPECS[name]
  q, k, v, lengths = _inputs()
  kw = dict(lengths, return_stats=True)
  whole, whole_stats = cj.condensate_attention(q, k, v, spec, query_chunk=10**6, **kw)
  out, stats = cj.condensate_attention(q, k, v, spec, query_chunk=chunk, **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(whole), rtol=2e-5, atol=2e-6)
  for field, a, b in zip(stats._fields, stats, whole_stats):
    if field in COUNTS:     # the same sets
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                 err_msg=field)


@pytest.mark.parametrize("chunk", [1, 6, 44, None])
def test_dense_and_covering_condensate_bitwise_under_chunks(chunk, monkeypatch):
  monkeypatch.setattr(attention_lib, "QUERY_CHUNK_ELEMENTS", 2 * 4 * 45 * 5)
  q, k, v, lengths = _inputs(t=45, s=45)
  out = cj.dense_attention(q, k, v, **lengths, query_chunk=chunk)
  np.testing.assert_allclose(np.asarray(out), np.asarray(cj.dense_attention(
      q, k, v, **lengths, query_chunk=10**6)), rtol=2e-5, atol=2e-6)
  for covering in (cj.CondensateSpec(anchor=0, window=0, top_k=45),
                   cj.CondensateSpec(anchor=3, window=9, top_k=40, top_k_capacity=44),
                   cj.CondensateSpec(anchor=1, window=4, top_k=45, selection="indexed",
                                     candidates=45)):
    for impl in ("xla", "pallas_select") if covering.selection == "indexed" else ("xla",):
      cond = cj.condensate_attention(q, k, v, covering, **lengths, query_chunk=chunk,
                                     implementation=impl)
      np.testing.assert_array_equal(_bits(cond), _bits(out), err_msg=f"{covering} {impl}")


def test_budget_chunks_long_calls(monkeypatch):
  """Under a small budget the default (query_chunk=None) runs chunked, and gives the
  same bits; the chunk is the budget's."""
  q, k, v, lengths = _inputs(t=40, s=40)
  spec = SPECS["indexed"]
  whole = cj.condensate_attention(q, k, v, spec, **lengths)
  monkeypatch.setattr(attention_lib, "QUERY_CHUNK_ELEMENTS", 2 * 4 * 40 * 3)
  assert attention_lib.query_chunk_size(None, q, k) == 3
  calls = []
  real_map = jax.lax.map
  monkeypatch.setattr(jax.lax, "map", lambda f, xs, **kw: calls.append(1) or
                      real_map(f, xs, **kw))
  out = cj.condensate_attention(q, k, v, spec, **lengths)
  assert calls, "the budget did not chunk the call"
  np.testing.assert_allclose(np.asarray(out), np.asarray(whole), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("block_size", [1, 8])
def test_query_blocks_specs_run_whole(block_size):
  """query_blocks lists hang on the call's first position and its block rows: a spec
  with them is never chunked (bitwise the whole call, also for non-contiguous positions
  and one-row blocks, which a chunk would turn into decode-style calls)."""
  q, k, v, lengths = _inputs(t=41, s=90)
  lengths["q_positions"] = lengths["q_positions"] * 2 + 1
  spec = SPECS["blocks_query_blocks"].replace(block_size=block_size)
  kw = dict(lengths, return_stats=True)
  whole, _ = cj.condensate_attention(q, k, v, spec, query_chunk=10**6, **kw)
  out, _ = cj.condensate_attention(q, k, v, spec, query_chunk=1, **kw)
  np.testing.assert_array_equal(_bits(out), _bits(whole))


def test_gradients_through_chunks():
  q, k, v, lengths = _inputs(t=41, s=41)
  for spec in (SPECS["exact"], SPECS["blocks"]):
    loss = lambda chunk: lambda q, k, v: jnp.sum(jnp.sin(cj.condensate_attention(
        q, k, v, spec, query_chunk=chunk, **lengths)))
    whole = jax.grad(loss(10**6), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(loss(8), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(chunked, whole):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_rest_of_one_query_joins_the_last_chunk():
  seen = []

  def call(qc, pc):
    seen.append(qc.shape[1])
    return qc

  q = jnp.arange(2 * 17 * 1 * 1, dtype=jnp.float32).reshape(2, 17, 1, 1)
  pos = jnp.broadcast_to(jnp.arange(17, dtype=jnp.int32), (2, 17))
  out = attention_lib.over_query_chunks(call, q, pos, 4, return_stats=False)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(q))
  assert seen == [4, 5]      # three chunks of 4 mapped (traced once), the rest 4 + 1


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_query_chunk_raises(bad):
  q, k, v, lengths = _inputs(t=8, s=8)
  with pytest.raises(ValueError, match="query_chunk"):
    cj.dense_attention(q, k, v, query_chunk=bad)
  with pytest.raises(ValueError, match="query_chunk"):
    cj.condensate_attention(q, k, v, SPECS["exact"], query_chunk=bad)
