"""Fast-path benchmark (DESIGN.md §4-§5): block-selection condensate decode and prefill
against cuDNN and XLA dense attention on the same GPU, selection time included, each
beside its physical floor and the parity of the same settings on the same inputs.

  python -m experiments.run --config=fast_bench.py --workdir=runs/fast_bench
  python -m experiments.fast_bench [smoke|decode|prefill|full]      # standalone

Timing: every method runs inside ONE jitted `lax.fori_loop` of `iterations` calls (as a
model's layers run it; `kernel_profile.chained_loop`); the loop carries q and adds
1e-3 * (sum of every output leaf, integer block lists included) to q's first row, so no
call or part of one can be hoisted or dead-code eliminated, and every method pays the
same read of its outputs. Per-call time = loop time / iterations; median over
`repeats` loops after a warm-up (compile) loop. Dense and condensate are timed the same way.

Every row also checks the step's output against float32 attention over the same set
at the benchmarked size ("kernel err").

Decode takes precomputed block summaries (kmin/kmax, built once per cache by
`blocks.build_summaries` and kept beside it; `append_summaries` updates them per token) as
a kernel input: the timed step reads summaries, selects blocks, runs the split-K kernel,
merges splits and computes eps. Prefill builds its key and query summaries inside the
timed step.

Parity (outside the timed loop, same inputs, same sets): true captured mass of the set
from all scores, the certified eps bound, and max |o - o_cudnn|.
"""

from __future__ import annotations

import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj
from condensate_jax import blocks, blocks_data, blocks_pallas
from experiments import kernel_profile

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------ timing


def time_loop(fn, q, args, iterations, repeats, unroll=False):
  """Median seconds per call of fn(q, *args) -> out (or a tuple / pytree).

  Every output leaf, integer ones included (block lists, ids), feeds the carry, so no part
  of fn can be dead-code eliminated. unroll=True unrolls the loop into straight-line code
  (no per-iteration loop bookkeeping, as in a model whose layers are unrolled)."""

  loop = kernel_profile.chained_loop(fn, iterations, unroll)
  jax.block_until_ready(loop(q, *args))            # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(q, *args))
    times.append((time.perf_counter() - t0) / iterations)
  return statistics.median(times), times


def measure_ceilings(repeats=5):
  """Measured elementwise read+write bandwidth (bytes/s) and bf16 matmul rate (FLOP/s)."""
  n = 1 << 29   # 1 GiB of bf16
  x = jnp.ones((n,), jnp.bfloat16)
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 10, lambda _, y: y * 1.0001 + 1e-3, x))
  jax.block_until_ready(f(x))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    ts.append((time.perf_counter() - t0) / 10)
  bw = 2 * 2 * n / statistics.median(ts)
  m = 8192
  a = jnp.ones((m, m), jnp.bfloat16) * 0.01
  g = jax.jit(lambda a: jax.lax.fori_loop(
      0, 10, lambda _, y: jnp.dot(y, a, preferred_element_type=jnp.float32).astype(
          jnp.bfloat16), a))
  jax.block_until_ready(g(a))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(g(a))
    ts.append((time.perf_counter() - t0) / 10)
  del x, a
  return bw, 2 * m**3 / statistics.median(ts)


# ------------------------------------------------------------------------------ inputs


def make_inputs(kind, seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim, data):
  """bf16 q, k, v; generated one batch row at a time (bounded float32 temporaries)."""
  rows = []
  for b in range(batch):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), b)
    if kind == "topic":
      gen = functools.partial(blocks_data.topic_qkv_jax, batch=1, q_len=q_len,
                              kv_len=kv_len, q_heads=q_heads, kv_heads=kv_heads,
                              head_dim=head_dim, **data)
      if q_len * q_heads * head_dim >= 1 << 31:   # 1M-token prefill: eager temporaries
        gen = jax.jit(gen)                          # would not fit on the GPU
      rows.append(gen(key))
    else:
      rows.append(blocks_data.gaussian_qkv_jax(key, 1, q_len, kv_len, q_heads, kv_heads,
                                               head_dim))
  return tuple(jnp.concatenate(parts, 0) for parts in zip(*rows))


# ------------------------------------------------------------------------------ decode


def _cudnn(q, k, v, causal):
  # cuDNN exists only on GPU; elsewhere (smoke runs) the parity reference is XLA dense
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def _xla(q, k, v, causal):
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def _set_parity(s, in_set, v_rows, o_kernel=None):
  """s [..., S] float32 scores (-inf = invisible), in_set [..., S], v_rows [..., S, D]:
  captured mass, max |o_set - o_dense| (float32, from all scores), the max, the set's
  normaliser and (given the kernel's output o_kernel [..., D]) max |o_kernel - o_set|."""
  m = jnp.max(s, -1, keepdims=True)
  e = jnp.exp(s - m)
  e_set = jnp.where(in_set, e, 0.0)
  z, z_set = jnp.sum(e, -1), jnp.sum(e_set, -1)
  o = jnp.einsum("...s,...sd->...d", e, v_rows) / z[..., None]
  o_set = jnp.einsum("...s,...sd->...d", e_set, v_rows) / z_set[..., None]
  k_err = (None if o_kernel is None else
           float(jnp.max(jnp.abs(o_kernel.astype(jnp.float32) - o_set))))
  return z_set / z, jnp.max(jnp.abs(o - o_set), -1), m[..., 0], z_set, k_err


def _middle_counts(pos, spec, nb, s_len):
  """Middle keys per block [nb] of one causal query at position pos (blocks.middle_counts)."""
  lo, hi = jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), pos, jnp.int32)
  return blocks.middle_counts(lo, hi, spec, nb, s_len)[0][0, 0]


def decode_parity(q, k, v, ids, eps, spec, u=None, out=None):
  """Captured mass of the selected set (all scores, float32), the certified eps (given,
  or computed here from the bounds u [B, K, G, nb] as decode_attend does),
  max |o_set - o_dense| in float32 and, given the step's output out [B, 1, Hq, D],
  max |out - o_set| (the kernel's own error at this size)."""
  b, _, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  p = spec.block_size
  qg = q[:, 0].reshape(b, hkv, g, d)
  s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
  j = jnp.arange(s_len)
  static = (j < spec.anchor) | (j > s_len - 1 - spec.window)
  chosen = jnp.zeros((b, hkv, s_len // p + 1), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None],
      jnp.where(ids >= 0, ids, s_len // p)].set(True)[..., :-1]
  in_set = static | jnp.repeat(chosen, p, axis=-1)[..., :s_len]        # [B, K, S]
  vt = v.transpose(0, 2, 1, 3).astype(jnp.float32)[:, :, None]          # [B, K, 1, S, D]
  o_k = None if out is None else out[:, 0].reshape(b, hkv, g, d)
  cap, err, m, z_set, k_err = _set_parity(s, in_set[:, :, None], vt, o_k)
  if eps is None:
    n_mid = _middle_counts(s_len - 1, spec, s_len // p, s_len)
    terms = jnp.where(chosen[:, :, None] | (n_mid == 0), NEG_INF,
                      u + jnp.log(jnp.maximum(n_mid, 1)))                 # [B, K, G, nb]
    log_delta = jax.nn.logsumexp(terms, axis=-1) - m                     # [B, K, G]
    eps = blocks._log_delta_to_eps(log_delta, jnp.log(z_set))
  # diagnostic, not timed: the same M blocks ranked by the block centre q.c_b instead of
  # the upper bound (blocks straddling two segments have loose min/max boxes)
  summ = blocks.build_summaries(k, p)
  cen = blocks.block_centres(q, summ, d**-0.5)[:, :, :, 0]               # [B, K, G, nb]
  _, ids_c = jax.lax.top_k(blocks.group_score(cen, head_axis=2, block_axis=3),
                           ids.shape[-1])
  chosen_c = jnp.zeros((b, hkv, s_len // p), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None], ids_c].set(True)
  in_set_c = static | jnp.repeat(chosen_c, p, axis=-1)[..., :s_len]
  cap_c = _set_parity(s, in_set_c[:, :, None], vt)[0]
  return dict(kernel_err=k_err, captured_centre_rank_mean=float(cap_c.mean()),
              captured_centre_rank_min=float(cap_c.min()),
              captured_mean=float(cap.mean()), captured_min=float(cap.min()),
              dropped_max=float(1 - cap.min()), eps_bound_max=float(eps.max()),
              eps_bound_median=float(jnp.median(eps)), max_abs_err=float(err.max()),
              set_keys=int(in_set[0, 0].sum()))


def _time_decode(row, q, k, v, summ, lengths, spec, scale, it, rep, unroll):
  kw = dict(method=row["select_method"], rank=row["rank"], bounds=row["bounds"])
  ns, kern = row["num_splits"], row["kernel"]
  time_loop_ = functools.partial(time_loop, unroll=unroll)
  step = lambda q, k, v, mn, mx, l: blocks_pallas.decode_step(q, k, v, mn, mx, l, spec=spec,
                                                              scale=scale, num_splits=ns,
                                                              kernel=kern, **kw)
  row["condensate_s"], _ = time_loop_(step, q, (k, v, summ.kmin, summ.kmax, lengths), it,
                                      rep)
  # components, each timed alone the same way: selection (bounds + top-M) and kernel
  # (split-K kernel + merge + eps) on fixed block ids
  sel_fn = lambda q, mn, mx, l: blocks_pallas.decode_select(q, mn, mx, l, spec=spec,
                                                            scale=scale, **kw)
  row["select_s"], _ = time_loop_(sel_fn, q, (summ.kmin, summ.kmax, lengths), it, rep)
  ids, u = blocks_pallas.decode_select(q, summ.kmin, summ.kmax, lengths, spec=spec,
                                       scale=scale, **kw)
  att_fn = lambda q, k, v, ids, u, l: blocks_pallas.decode_attend(q, k, v, ids, u, l,
                                                                  spec=spec, scale=scale,
                                                                  num_splits=ns,
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
  q, k, v = make_inputs(inputs, cfg.seed, b, 1, s_len, hq, hkv, d, dict(cfg.data))
  lengths = jnp.full((b,), s_len, jnp.int32)
  summ = blocks.build_summaries(k, spec.block_size, lengths)
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
    _time_decode(row, q, k, v, summ, lengths, spec, scale, it, rep, row["unroll"])
  bw, _ = ceilings
  nb = summ.num_blocks
  kv_bytes = 2 * b * s_len * hkv * d * 2
  sel_bytes = 2 * b * nb * hkv * d * 2
  read_bytes = 2 * b * hkv * (spec.top_blocks * spec.block_size + spec.anchor
                              + spec.window) * d * 2
  row["dense_floor_s"] = kv_bytes / bw
  row["condensate_floor_s"] = (sel_bytes + read_bytes) / bw
  if cfg.timing:
    out, _, eps, ids = blocks_pallas.decode_step(q, k, v, summ.kmin, summ.kmax, lengths,
                                                 spec=spec, scale=scale,
                                                 num_splits=row["num_splits"],
                                                 kernel=row["kernel"],
                                                 return_blocks=True, **kw)
    u = None
  else:   # parity only (any backend, no kernel): same selection; eps from its bounds u
    ids, u = blocks_pallas.decode_select(q, summ.kmin, summ.kmax, lengths, spec=spec,
                                         scale=scale, **kw)
    eps = out = None
  row.update(decode_parity(q, k, v, ids, eps, spec, u, out))
  return row


# ------------------------------------------------------------------------------ prefill


def prefill_parity(q, k, v, spec, kblocks, kflags, n_rows=32, out=None):
  """Sampled query rows: captured mass of the set, the per-query certified eps (from
  per-query bounds of the blocks not attended), max |o_set - o_dense| in float32 and,
  given the step's output out [B, T, H, D], max |out - o_set| on those rows."""
  b, t, h, d = q.shape
  s_len = k.shape[1]
  p = spec.block_size
  scale = d**-0.5
  summ = blocks.build_summaries(k, p)
  rows = np.unique(np.linspace(t // 8, t - 1, n_rows).astype(int))
  j = jnp.arange(s_len)
  vt = v.transpose(0, 2, 1, 3).astype(jnp.float32)                      # [B, H, S, D]
  caps, epss, errs, k_errs = [], [], [], []
  for r in rows:
    pos = s_len - t + int(r)
    lists, flags = kblocks[:, :, r // p], kflags[:, :, r // p]          # [B, H, L]
    hit = lists[..., None] == (j // p)                                    # [B, H, L, S]
    listed = jnp.any(hit, -2)
    flagged = jnp.any(hit & (flags[..., None] > 0), -2)
    static = (j < spec.anchor) | (j > pos - spec.window)
    middle = (j >= spec.anchor) & (j <= pos - spec.window)
    vis = j <= pos
    in_set = listed & vis & (static | (flagged & middle))
    s = jnp.einsum("bhd,bshd->bhs", q[:, r], k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(vis, s, NEG_INF)
    cap, err, m, z_set, k_err = _set_parity(s, in_set, vt,
                                            None if out is None else out[:, r])
    caps.append(cap)
    errs.append(err)
    k_errs.append(k_err)
    # certificate: blocks holding middle keys of this query whose middle keys were not
    # attended, each bounded by its per-query U_b
    u = blocks_pallas.fast_bounds(q[:, r], summ.kmin, summ.kmax, scale)[:, :, 0]   # [B,H,nb]
    nbk = summ.num_blocks
    n_mid = _middle_counts(pos, spec, nbk, s_len)
    taken = jnp.any((lists[..., None] == jnp.arange(nbk)) & (flags[..., None] > 0), -2)
    terms = jnp.where((n_mid > 0) & ~taken,
                      u - m[..., None] + jnp.log(jnp.maximum(n_mid, 1)), NEG_INF)
    epss.append(blocks._log_delta_to_eps(jax.nn.logsumexp(terms, -1), jnp.log(z_set)))
  cap, eps, err = jnp.stack(caps), jnp.stack(epss), jnp.stack(errs)
  return dict(captured_mean=float(cap.mean()), captured_min=float(cap.min()),
              dropped_max=float(1 - cap.min()), eps_bound_max=float(eps.max()),
              eps_bound_median=float(jnp.median(eps)), max_abs_err=float(err.max()),
              kernel_err=None if out is None else max(k_errs), parity_rows=len(rows))


def _time_prefill(row, q, k, v, spec, scale, cfg, it, rep):
  step = lambda q, k, v: blocks_pallas.prefill_step(q, k, v, spec=spec, scale=scale)
  row["condensate_s"], _ = time_loop(step, q, (k, v), it, rep)
  lists_fn = lambda q, k: blocks_pallas.prefill_lists(q, k, spec)
  row["select_s"], _ = time_loop(lists_fn, q, (k,), it, rep)
  kblocks, kflags = blocks_pallas.prefill_lists(q, k, spec)
  att_fn = lambda q, k, v, kb, kf: blocks_pallas.prefill_attend(q, k, v, kb, kf, spec=spec,
                                                                scale=scale)
  row["attend_s"], _ = time_loop(att_fn, q, (k, v, kblocks, kflags), it, rep)
  if jax.default_backend() == "gpu":
    row["cudnn_s"], _ = time_loop(lambda q, k, v: _cudnn(q, k, v, True), q, (k, v), it, rep)
  if q.shape[1] <= cfg.prefill_xla_max:
    row["xla_s"], _ = time_loop(lambda q, k, v: _xla(q, k, v, True), q, (k, v), it, rep)
  else:
    row["xla_s"], row["xla_error"] = None, f"not run: T x S scores exceed memory above {cfg.prefill_xla_max}"


def run_prefill(case, spec, cfg, ceilings):
  t = case["kv_len"]
  h, d = cfg.prefill_heads, cfg.head_dim
  q, k, v = make_inputs("topic", cfg.seed, 1, t, t, h, h, d, dict(cfg.data))
  scale = d**-0.5
  it = cfg.prefill_iterations if t > 16384 else cfg.iterations
  rep = cfg.repeats
  if t >= cfg.get("prefill_long", 1 << 62):   # one dense 1M prefill takes ~15 s
    it, rep = 1, cfg.long_repeats
  row = dict(op="prefill", inputs="topic", batch=1, kv_len=t, block_size=spec.block_size,
             top_blocks=spec.top_blocks, anchor=spec.anchor, window=spec.window,
             iterations=it, repeats=rep)
  if cfg.timing:
    _time_prefill(row, q, k, v, spec, scale, cfg, it, rep)
  _, mm = ceilings
  kblocks, kflags = blocks_pallas.prefill_lists(q, k, spec)
  listed = int(jnp.sum(kblocks >= 0))                    # over batch, heads, query blocks
  nq = -(-t // spec.block_size)
  row["blocks_per_query_block"] = listed / (h * nq)
  row["dense_floor_s"] = 2 * h * t * t * d / mm                       # causal: half of 4TSd
  # attention over the listed tiles (QK and PV) + the selection matmul (2D contraction)
  flops = 4 * listed * spec.block_size**2 * d + 2 * h * nq * nq * 2 * d
  row["condensate_floor_s"] = flops / mm
  out = blocks_pallas.prefill_step(q, k, v, spec=spec, scale=scale)[0] if cfg.timing else None
  row.update(prefill_parity(q, k, v, spec, kblocks, kflags, out=out))
  return row


# ------------------------------------------------------------------------------ report


def _fmt_t(x):
  if x is None:
    return "—"
  return f"{x * 1e3:.3f} ms" if x >= 1e-3 else f"{x * 1e6:.1f} µs"


def _variant(r):
  """Row label beyond P/M: "lean" (rank selection + fused kernels, decode_step's default)
  or "split" (XLA top-M + split-K kernel + XLA merge: the first run's step; rows of runs
  before the kernel field existed), another method, centre ranking, unrolled loop."""
  if r["op"] != "decode":
    return ""
  method, kern = r.get("select_method"), r.get("kernel", "split")
  parts = ["lean" if (method, kern) == ("rank", "fused") else
           "split" if (method, kern) == ("superblock", "split") else f"{method} {kern}"]
  parts += ["centre"] if r.get("rank") == "centre" else []
  parts += ["unrolled"] if r.get("unroll") else []
  return "".join(" " + p for p in parts)


def table(rows, device, ceilings):
  bw, mm = ceilings
  out = [f"device: {device}; measured read+write bandwidth {bw / 1e12:.2f} TB/s, bf16 "
         f"matmul {mm / 1e12:.0f} TFLOP/s", "",
         "| op | inputs | B | keys | P/M | condensate (select + attend alone) | floor | "
         "cuDNN | XLA | dense floor | speedup vs best dense | captured mean/min | "
         "eps bound max | max abs err | kernel err |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
         "| --- |"]
  for r in rows:
    dense = [x for x in (r.get("cudnn_s"), r.get("xla_s")) if x]
    speed = (f"{min(dense) / r['condensate_s']:.1f}×" if dense and r.get("condensate_s")
             else "—")
    out.append(
        f"| {r['op']} | {r['inputs']} | {r['batch']} | {r['kv_len'] // 1024}K | "
        f"{r['block_size']}/{r['top_blocks']}{_variant(r)} | "
        f"{_fmt_t(r.get('condensate_s'))} ({_fmt_t(r.get('select_s'))} + {_fmt_t(r.get('attend_s'))}) | "
        f"{_fmt_t(r['condensate_floor_s'])} | {_fmt_t(r.get('cudnn_s'))} | "
        f"{_fmt_t(r.get('xla_s'))} | {_fmt_t(r['dense_floor_s'])} | {speed} | "
        f"{r['captured_mean']:.4f}/{r['captured_min']:.4f} | {r['eps_bound_max']:.2e} | "
        f"{r.get('max_abs_err', r.get('max_abs_err_vs_cudnn', float('nan'))):.3g} | "
        f"{'—' if r.get('kernel_err') is None else format(r['kernel_err'], '.2g')} |")
  return "\n".join(out)


def run(config, workdir):
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  print(f"fast_bench on {device}", flush=True)
  ceilings = (measure_ceilings() if jax.default_backend() == "gpu" and config.timing
              else (1e11, 1e12))
  rows = []
  results = workdir / "results.jsonl"
  for case in config.cases:
    spec = cj.CondensateSpec(anchor=config.anchor, window=config.window, top_k=0,
                             selection="blocks", block_size=case["block_size"],
                             top_blocks=case["top_blocks"])
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
  text = table(rows, device, ceilings)
  (workdir / "table.md").write_text(text + "\n")
  return dict(table=text, computed=len(rows), skipped=0)


def profile_main(arg):
  """`profile decode KEYS_K P M [bound|centre [METHOD [split|fused]]]` or `profile prefill
  KEYS_K [P M]`: per-kernel device time of one step at the benchmark's shapes and inputs
  (experiments.kernel_profile); METHOD: a `decode_select` method (default rank, kernel
  fused: `decode_step`'s defaults)."""
  from configs import fast_bench as fast_bench_config
  usage = ("expected: profile decode KEYS_K P M [bound|centre [METHOD [split|fused]]]  or  "
           "profile prefill KEYS_K [P M]")
  if not arg or arg[0] not in ("decode", "prefill") or len(arg) < 2:
    raise ValueError(f"arguments {arg}: {usage}")
  cfg = fast_bench_config.get_config("cases=quick")
  op, s_len = arg[0], int(arg[1]) * 1024
  p, m = (int(arg[2]), int(arg[3])) if len(arg) >= 4 else (64, 16)
  spec = cj.CondensateSpec(anchor=cfg.anchor, window=cfg.window, top_k=0, selection="blocks",
                           block_size=p, top_blocks=m)
  scale = cfg.head_dim**-0.5
  if op == "decode":
    rank = arg[4] if len(arg) > 4 else "bound"
    method = arg[5] if len(arg) > 5 else "rank"
    kern = arg[6] if len(arg) > 6 else "fused"
    q, k, v = make_inputs("topic", cfg.seed, 1, 1, s_len, cfg.q_heads, cfg.kv_heads,
                          cfg.head_dim, dict(cfg.data))
    lengths = jnp.full((1,), s_len, jnp.int32)
    summ = blocks.build_summaries(k, p, lengths)
    fn = lambda q, k, v, a, c, l: blocks_pallas.decode_step(q, k, v, a, c, l, spec=spec,
                                                            scale=scale, rank=rank,
                                                            method=method, kernel=kern)
    res = kernel_profile.profile(fn, q, (k, v, summ.kmin, summ.kmax, lengths), 10)
    title = (f"decode B=1 {arg[1]}K keys P={p} M={m} rank={rank} method={method} "
             f"kernel={kern}")
  else:
    h = cfg.prefill_heads
    q, k, v = make_inputs("topic", cfg.seed, 1, s_len, s_len, h, h, cfg.head_dim,
                          dict(cfg.data))
    fn = lambda q, k, v: blocks_pallas.prefill_step(q, k, v, spec=spec, scale=scale)
    res = kernel_profile.profile(fn, q, (k, v), 3)
    title = f"prefill {arg[1]}K tokens P={p} M={m}"
  return kernel_profile.format_profile(title, res)


def main(argv=None):
  """`python -m experiments.fast_bench [ARG [WORKDIR]]` (ARG as after `fast_bench.py:`,
  e.g. `cases=ordered` or `cases=parity,timing=false`), `... table RESULTS.jsonl` to
  print the table of a (possibly interrupted) run, or `... profile ...` (see
  `profile_main`) for a per-kernel breakdown of one step."""
  import sys
  arg = (argv or sys.argv)[1:]
  if arg and arg[0] == "profile":
    print(profile_main(arg[1:]))
    return
  if arg and arg[0] == "table":
    rows = [json.loads(line) for line in pathlib.Path(arg[1]).read_text().splitlines()]
    print(table(rows, rows[0]["device"], (rows[0]["bandwidth"], rows[0]["matmul_rate"])))
    return
  from configs import fast_bench as fast_bench_config
  config = fast_bench_config.get_config(arg[0] if arg else None)
  workdir = arg[1] if len(arg) > 1 else f"runs/fast_bench-{time.strftime('%Y%m%d-%H%M%S')}"
  print("\n" + run(config, workdir)["table"])


if __name__ == "__main__":
  main()
