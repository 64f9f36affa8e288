"""experiments.bench: the timing method, the tables, the profile CLI and the parity sets
(checked against the ops' own definitions), on tiny inputs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import condensate_jax as cj
from experiments.bench import fast_parity, profile, tables, timing
from pallas_kernels.block_sparse import reference as block_sparse_ref


def test_time_loop_times_every_call_of_a_chained_loop():
  calls = []

  def fn(q, k):
    calls.append(1)                      # traced once: the calls run inside one program
    return q * k, jnp.argmax(k)          # an integer output feeds the carry too

  median, samples = timing.time_loop(fn, jnp.ones((2, 3)), (jnp.full((2, 3), 2.0),),
                                     iterations=3, repeats=2, warmup=2)
  assert len(samples) == 2 and median > 0 and len(calls) == 1
  out = timing.chained_loop(lambda q: q, 4)(jnp.zeros((1, 2)))
  assert float(out[0, 0]) == pytest.approx(0.0) and out.shape == (1, 2)


def test_markdown_table():
  assert tables.markdown(("a", "b"), [["1", "2"]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |"
  assert tables.fmt_time(None) == "—" and tables.fmt_time(2e-3) == "2.000 ms"
  assert tables.fmt_time(2e-6) == "2.0 µs"


def test_profile_cli_table_and_usage(tmp_path, capsys):
  row = dict(op="decode", inputs="topic", batch=1, kv_len=8192, block_size=64,
             top_blocks=16, select_method="rank", kernel="fused", condensate_floor_s=1e-5,
             dense_floor_s=1e-4, captured_mean=0.9, captured_min=0.5, eps_bound_max=0.1,
             max_abs_err=0.01, device="dev", bandwidth=1e11, matmul_rate=1e12)
  path = tmp_path / "results.jsonl"
  path.write_text(json.dumps(row) + "\n")
  assert profile.main(["table", str(path)]) == 0
  out = capsys.readouterr().out
  assert out.startswith("device: dev;") and "| decode | topic | 1 | 8K | 64/16 lean |" in out
  assert profile.main(["nonsense"]) == 2
  assert "usage: python -m experiments.bench.profile" in capsys.readouterr().err


def test_prefill_row_set_is_the_prefill_ops_mask():
  t = s = 96
  spec = cj.CondensateSpec(anchor=3, window=10, top_k=0, selection="blocks",
                           block_size=16, top_blocks=2)
  rng = np.random.default_rng(0)
  kblocks = jnp.asarray(rng.integers(-1, s // 16, (1, 2, t // 16, 4)), jnp.int32)
  kflags = jnp.asarray(rng.integers(0, 2, kblocks.shape), jnp.int32)
  want = block_sparse_ref.prefill_mask(t, s, kblocks, kflags, block_size=16, anchor=3,
                                       window=10)                     # [B, H, T, S]
  for r in range(t):
    got = fast_parity.prefill_row_set(r, t, s, kblocks, kflags, spec)
    assert bool(jnp.all(got == want[:, :, r])), r


def test_decode_parity_of_a_set_that_holds_every_key():
  """M blocks covering the whole middle: everything captured, eps 0, no error."""
  b, s, hq, hkv, d = 1, 64, 4, 2, 8
  spec = cj.CondensateSpec(anchor=4, window=8, top_k=0, selection="blocks",
                           block_size=16, top_blocks=4)
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal(x), jnp.float32)
             for x in ((b, 1, hq, d), (b, s, hkv, d), (b, s, hkv, d)))
  ids = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (b, hkv, 4))
  u = jnp.zeros((b, hkv, hq // hkv, 4), jnp.float32)
  res = fast_parity.decode_parity(q, k, v, ids, None, spec, u)
  assert res["set_keys"] == s and res["captured_min"] == pytest.approx(1.0)
  assert res["eps_bound_max"] == 0.0 and res["max_abs_err"] < 1e-6


def test_prefill_select_bench_checks_bitwise_first(monkeypatch, capsys):
  """The prefill bench on a tiny shape (CPU: the kernel interpreted): both selections
  give the same bits, the table is printed, bad flags name themselves."""
  from condensate_jax.models import fast_path  # pylint: disable=import-outside-toplevel
  from experiments.bench import prefill_select  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(prefill_select.SHAPES, "tiny", (160, 4, 2, 16))
  monkeypatch.setitem(prefill_select.SPECS, "exact", cj.CondensateSpec(4, 8, 20))
  monkeypatch.setitem(prefill_select.SPECS, "indexed", cj.CondensateSpec(
      4, 8, 20, selection="indexed", candidates=40))
  monkeypatch.setattr(fast_path, "PREFILL_CHUNK", 64)
  assert prefill_select.main(["--shapes=tiny", "--repeats=1"]) == 0
  out = capsys.readouterr().out
  assert "| tiny | exact | True | True | 0 |" in out
  assert "| tiny | indexed | True | True | 0 |" in out
  with pytest.raises(ValueError, match="--specs"):
    prefill_select.main(["--shapes=tiny", "--specs=blocks"])
