"""Job "fast_bench" (configs/fast_bench.py; DESIGN.md §4-§5): block-selection condensate
decode and prefill against cuDNN and XLA dense attention on the same GPU, selection time
included, each beside its physical floor and the parity of the same settings on the same
inputs.

  python -m experiments.run --config=fast_bench.py --workdir=runs/fast_bench
  python -m experiments.bench.profile table runs/fast_bench/results.jsonl   # cut short

Timing: `timing.time_loop` (every method inside ONE jitted `lax.fori_loop` of
`iterations` calls, each call's outputs chained into the next call's q; per-call time =
loop time / iterations, median over `repeats` loops after a warm-up loop). Dense and
condensate are timed the same way.

Every row also checks the step's output against float32 attention over the same set
at the benchmarked size ("kernel err").

Decode takes precomputed block summaries (kmin/kmax, built once per cache by
`cj.build_summaries` and kept beside it; `cj.append_summaries` updates them per token) as
a kernel input: the timed step reads summaries, selects blocks, runs the split-K kernel,
merges splits and computes eps. Prefill builds its key and query summaries inside the
timed step.

Parity (outside the timed loop, same inputs, same sets; `fast_parity`): true captured
mass of the set from all scores, the certified eps bound, and max |o - o_cudnn|.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp

import condensate_jax as cj
from condensate_jax import fast
from experiments import manifest as manifest_lib
from experiments.bench import fast_parity, synthetic, tables, timing


def _cudnn(q, k, v, causal):
  # cuDNN exists only on GPU; elsewhere (smoke runs) the parity reference is XLA dense
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def _xla(q, k, v, causal):
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def block_spec(config, block_size, top_blocks):
  """The selection="blocks" spec of a row (anchor and window from the config)."""
  return cj.CondensateSpec(anchor=config.anchor, window=config.window, top_k=0,
                           selection="blocks", block_size=block_size,
                           top_blocks=top_blocks)


def time_decode(row, q, k, v, summ, lengths, spec, scale, it, rep, unroll):
  """Times the decode step, its selection alone and its kernel alone (and, on a GPU with
  topic inputs, cuDNN and XLA dense) into row[*_s]."""
  kw = dict(method=row["select_method"], rank=row["rank"], bounds=row["bounds"])
  ns, kern = row["num_splits"], row["kernel"]
  time_loop_ = functools.partial(timing.time_loop, unroll=unroll)
  step = lambda q, k, v, mn, mx, l: fast.decode_step(q, k, v, mn, mx, l, spec=spec,
                                                     scale=scale, num_splits=ns,
                                                     kernel=kern, **kw)
  row["condensate_s"], _ = time_loop_(step, q, (k, v, summ.kmin, summ.kmax, lengths), it,
                                      rep)
  # components, each timed alone the same way: selection (bounds + top-M) and kernel
  # (split-K kernel + merge + eps) on fixed block ids
  sel_fn = lambda q, mn, mx, l: fast.decode_select(q, mn, mx, l, spec=spec, scale=scale,
                                                   **kw)
  row["select_s"], _ = time_loop_(sel_fn, q, (summ.kmin, summ.kmax, lengths), it, rep)
  ids, u = fast.decode_select(q, summ.kmin, summ.kmax, lengths, spec=spec, scale=scale,
                              **kw)
  att_fn = lambda q, k, v, ids, u, l: fast.decode_attend(q, k, v, ids, u, l, spec=spec,
                                                         scale=scale, num_splits=ns,
                                                         kernel=kern)
  row["attend_s"], _ = time_loop_(att_fn, q, (k, v, ids, u, lengths), it, rep)
  if row["inputs"] == "topic" and jax.default_backend() == "gpu":
    row["cudnn_s"], _ = time_loop_(lambda q, k, v: _cudnn(q, k, v, False), q, (k, v), it,
                                   rep)
    try:
      row["xla_s"], _ = time_loop_(lambda q, k, v: _xla(q, k, v, False), q, (k, v), it, rep)
    except Exception as err:  # noqa: BLE001 (OOM at the largest sizes)
      row["xla_s"], row["xla_error"] = None, f"{type(err).__name__}: {str(err)[:120]}"


def run_decode(case, spec, cfg, ceilings, inputs="topic"):
  b, s_len = case["batch"], case["kv_len"]
  hq, hkv, d = cfg.q_heads, cfg.kv_heads, cfg.head_dim
  q, k, v = synthetic.make_inputs(inputs, cfg.seed, b, 1, s_len, hq, hkv, d,
                                  dict(cfg.data))
  lengths = jnp.full((b,), s_len, jnp.int32)
  summ = cj.build_summaries(k, spec.block_size, lengths)
  scale = d**-0.5
  it, rep = cfg.iterations, cfg.repeats
  row = dict(op="decode", inputs=inputs, batch=b, kv_len=s_len, block_size=spec.block_size,
             top_blocks=spec.top_blocks, anchor=spec.anchor, window=spec.window,
             iterations=it, repeats=rep)
  row["select_method"] = case.get("method", "rank")
  row["rank"] = case.get("rank", "bound")
  row["bounds"] = case.get("bounds")             # None: the Triton kernel on a GPU
  row["num_splits"] = case.get("num_splits")     # None: one block per program
  row["kernel"] = case.get("kernel", "fused")
  row["unroll"] = bool(cfg.get("unroll", False))
  kw = dict(method=row["select_method"], rank=row["rank"], bounds=row["bounds"])
  if cfg.timing:
    time_decode(row, q, k, v, summ, lengths, spec, scale, it, rep, row["unroll"])
  bw, _ = ceilings
  nb = summ.num_blocks
  kv_bytes = 2 * b * s_len * hkv * d * 2
  sel_bytes = 2 * b * nb * hkv * d * 2
  read_bytes = 2 * b * hkv * (spec.top_blocks * spec.block_size + spec.anchor
                              + spec.window) * d * 2
  row["dense_floor_s"] = kv_bytes / bw
  row["condensate_floor_s"] = (sel_bytes + read_bytes) / bw
  if cfg.timing:
    out, _, eps, ids = fast.decode_step(q, k, v, summ.kmin, summ.kmax, lengths, spec=spec,
                                        scale=scale, num_splits=row["num_splits"],
                                        kernel=row["kernel"], return_blocks=True, **kw)
    u = None
  else:   # parity only (any backend, no kernel): same selection; eps from its bounds u
    ids, u = fast.decode_select(q, summ.kmin, summ.kmax, lengths, spec=spec, scale=scale,
                                **kw)
    eps = out = None
  row.update(fast_parity.decode_parity(q, k, v, ids, eps, spec, u, out))
  return row


def time_prefill(row, q, k, v, spec, scale, cfg, it, rep):
  """Times the prefill step, its lists alone and its kernel alone (and cuDNN on a GPU,
  XLA dense up to cfg.prefill_xla_max keys) into row[*_s]."""
  step = lambda q, k, v: fast.prefill_step(q, k, v, spec=spec, scale=scale)
  row["condensate_s"], _ = timing.time_loop(step, q, (k, v), it, rep)
  lists_fn = lambda q, k: fast.prefill_lists(q, k, spec)
  row["select_s"], _ = timing.time_loop(lists_fn, q, (k,), it, rep)
  kblocks, kflags = fast.prefill_lists(q, k, spec)
  att_fn = lambda q, k, v, kb, kf: fast.prefill_attend(q, k, v, kb, kf, spec=spec,
                                                       scale=scale)
  row["attend_s"], _ = timing.time_loop(att_fn, q, (k, v, kblocks, kflags), it, rep)
  if jax.default_backend() == "gpu":
    row["cudnn_s"], _ = timing.time_loop(lambda q, k, v: _cudnn(q, k, v, True), q, (k, v),
                                         it, rep)
  if q.shape[1] <= cfg.prefill_xla_max:
    row["xla_s"], _ = timing.time_loop(lambda q, k, v: _xla(q, k, v, True), q, (k, v), it,
                                       rep)
  else:
    row["xla_s"], row["xla_error"] = None, ("not run: T x S scores exceed memory above "
                                            f"{cfg.prefill_xla_max}")


def run_prefill(case, spec, cfg, ceilings):
  t = case["kv_len"]
  h, d = cfg.prefill_heads, cfg.head_dim
  q, k, v = synthetic.make_inputs("topic", cfg.seed, 1, t, t, h, h, d, dict(cfg.data))
  scale = d**-0.5
  it = cfg.prefill_iterations if t > 16384 else cfg.iterations
  rep = cfg.repeats
  if t >= cfg.get("prefill_long", 1 << 62):   # one dense 1M prefill takes ~15 s
    it, rep = 1, cfg.long_repeats
  row = dict(op="prefill", inputs="topic", batch=1, kv_len=t, block_size=spec.block_size,
             top_blocks=spec.top_blocks, anchor=spec.anchor, window=spec.window,
             iterations=it, repeats=rep)
  if cfg.timing:
    time_prefill(row, q, k, v, spec, scale, cfg, it, rep)
  _, mm = ceilings
  kblocks, kflags = fast.prefill_lists(q, k, spec)
  listed = int(jnp.sum(kblocks >= 0))                    # over batch, heads, query blocks
  nq = -(-t // spec.block_size)
  row["blocks_per_query_block"] = listed / (h * nq)
  row["dense_floor_s"] = 2 * h * t * t * d / mm                       # causal: half of 4TSd
  # attention over the listed tiles (QK and PV) + the selection matmul (2D contraction)
  flops = 4 * listed * spec.block_size**2 * d + 2 * h * nq * nq * 2 * d
  row["condensate_floor_s"] = flops / mm
  out = fast.prefill_step(q, k, v, spec=spec, scale=scale)[0] if cfg.timing else None
  row.update(fast_parity.prefill_parity(q, k, v, spec, kblocks, kflags, out=out))
  return row


def run(config, workdir):
  workdir = manifest_lib.prepare_workdir(workdir)
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  print(f"fast_bench on {device}", flush=True)
  ceilings = (timing.measure_ceilings() if jax.default_backend() == "gpu" and config.timing
              else (1e11, 1e12))
  rows = []
  results = workdir / "results.jsonl"
  for case in config.cases:
    spec = block_spec(config, case["block_size"], case["top_blocks"])
    t0 = time.time()
    if case["op"] == "decode":
      row = run_decode(case, spec, config, ceilings, inputs=case.get("inputs", "topic"))
    else:
      row = run_prefill(case, spec, config, ceilings)
    row.update(device=device, data=dict(config.data), wall_s=time.time() - t0,
               bandwidth=ceilings[0], matmul_rate=ceilings[1])
    rows.append(row)
    with results.open("a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in row if k not in ("data", "device")}), flush=True)
    jax.clear_caches()
  text = tables.fast_table(rows, device, ceilings)
  (workdir / "table.md").write_text(text + "\n")
  return dict(table=text, computed=len(rows), skipped=0)
