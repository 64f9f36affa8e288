"""Needle retrieval of the selection modes (issue #13): does a mode find the keys that
matter, and what does it read to find them?

Inputs (`needle_qkv`): keys like real ones (a shared offset, a few outlier channels, the
rest Gaussian noise); per query head a few single-key "needles" planted at random depths
of its KV head (q_h = sqrt(D) u_h + noise, k += lift * u_h with the needle's score `gain`
noise-score standard deviations above the expected maximum of S noise scores), so exact
top-k finds them and each head's mass sits on a handful of keys among S. v is 0 except one basis vector per needle: a needle is in a head's set
exactly when that head's output has a positive entry on the needle's dimension, the same
probe for every implementation.

Per (S, mode) row: needle recall (mean over heads and needles) and its ratio to exact
top-k's at the same budget, captured softmax mass (mean / min over heads), keys scored
exactly as a fraction of the visible ones, max certified eps, wall seconds of the XLA
specification (informative only). Modes: exact top-k, "indexed" (index_bits,
candidates), "blocks" with top_blocks = top_k / block_size (the same middle-key budget).

config.timing (a GPU run, `retrieval.py:size=gpu`): the timed decode steps on the same
inputs in the same run — `fast.indexed_decode_step` for "indexed" (its scan and its
scan + candidate top-C timed alone too), `fast.decode_step` for "blocks", cuDNN dense for
every row — by `timing.time_loop`, each beside the quality of the step's own output
(needle recall by the same probe, captured mass of its set from all scores, its eps) and
its byte floor (bytes the step must read / measured bandwidth). Setup (index or
summaries, built once per cache) is not in the step: it is kept beside the cache and
appended per token; its build time is reported apart.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj
from condensate_jax import fast
from condensate_jax.selection import index as index_lib
from experiments import manifest as manifest_lib
from experiments.bench import fast_parity, tables, timing
from experiments.results import ResultsStore


def needle_qkv(rng: np.random.Generator, s: int, q_heads: int, kv_heads: int, d: int, *,
               needles: int, gain: float, offset: float, outliers: int,
               outlier_scale: float, query_noise: float):
  """float32 q [1, 1, Hq, D], k, v [1, S, Hkv, D] and the needle positions [Hq, n]."""
  g = q_heads // kv_heads
  chan = np.ones(d, np.float32)
  chan[rng.choice(d, outliers, replace=False)] = outlier_scale
  k = (rng.standard_normal((1, s, kv_heads, d), np.float32) * chan
       + offset * rng.standard_normal(d).astype(np.float32))
  v = np.zeros((1, s, kv_heads, d), np.float32)
  q = np.zeros((1, 1, q_heads, d), np.float32)
  where = np.zeros((q_heads, needles), np.int64)
  for h in range(q_heads):
    u = rng.standard_normal(d).astype(np.float32)
    u /= np.linalg.norm(u)
    q[0, 0, h] = np.sqrt(d) * u + query_noise * rng.standard_normal(d)
    kv = h // g
    taken = set(where[h - h % g: h].ravel().tolist())
    pos = rng.choice([j for j in range(s // 64, s - s // 64) if j not in taken][::7],
                     needles, replace=False)
    where[h] = pos
    # the needle's score sits `gain` noise-score stds above the expected noise maximum
    sigma_s = np.sqrt(np.sum((q[0, 0, h] * chan) ** 2) / d)
    lift = (np.sqrt(2 * np.log(s)) + gain) * sigma_s * np.sqrt(d) / (q[0, 0, h] @ u)
    for i, j in enumerate(pos):
      k[0, j, kv] += lift * u
      v[0, j, kv, (h % g) * needles + i] = 1.0
  return q, k, v, where


def _modes(config, s):
  a = config.attention
  base = cj.CondensateSpec(anchor=a.anchor, window=a.window, top_k=a.top_k)
  out = {"exact": base,
         "indexed": base.replace(selection="indexed", index_bits=a.index_bits,
                                 candidates=a.candidates)}
  m = max(1, a.top_k // a.block_size)
  out["blocks"] = base.replace(selection="blocks", block_size=a.block_size, top_blocks=m)
  return {name: out[name] for name in config.modes}


def _recall(out, where, g):
  """Mean over heads and needles of the probe: the needle's value dimension is > 0."""
  out = np.asarray(out, np.float32)[0, 0]                                    # [Hq, D]
  n = where.shape[1]
  hits = np.array([[out[h, (h % g) * n + i] > 0 for i in range(n)]
                   for h in range(out.shape[0])])
  return hits


def run_row(config, s, mode, spec, inputs, ceilings=None, dense_s=None):
  q, k, v, where = inputs
  g = q.shape[2] // k.shape[2]
  q, k, v = (jnp.asarray(x, config.dtype) for x in (q, k, v))
  t0 = time.time()
  out, stats = cj.condensate_attention(q, k, v, spec, return_stats=True)
  out = jax.block_until_ready(out)
  wall = time.time() - t0
  hits = _recall(out, where, g)
  cap = np.asarray(stats.captured_mass)[0, :, 0]
  scored = np.asarray(stats.keys_scored)[0, :, 0] / np.asarray(stats.visible)[0, :, 0]
  row = {"key": f"{config.name}|S{s}|{mode}|{spec}", "keys": s, "mode": mode,
         "spec": str(spec), "dtype": config.dtype, "recall": float(hits.mean()),
         "recall_min_head": float(hits.mean(1).min()), "captured_mean": float(cap.mean()),
         "captured_min": float(cap.min()), "scored_fraction": float(scored.mean()),
         "eps_max": float(np.asarray(stats.dropped_mass_bound).max()), "wall_s": wall}
  if config.get("timing", False) and mode in ("indexed", "blocks"):
    row.update(time_step(config, mode, spec, q, k, v, where, ceilings))
  if config.get("timing", False):
    row["cudnn_s"] = dense_s
  return row


def time_step(config, mode, spec, q, k, v, where, ceilings):
  """The timed decode step of a mode on these inputs, with the quality of its own output
  and its byte floor (module docstring)."""
  b, _, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  it, rep, size = config.iterations, config.repeats, jnp.dtype(k.dtype).itemsize
  lengths = jnp.full((b,), s_len, jnp.int32)
  scale = d**-0.5
  static = min(spec.anchor, s_len) + min(spec.window, s_len)
  res = {}
  if mode == "indexed":
    t0 = time.time()
    index = jax.block_until_ready(index_lib.pack_index(cj.build_index(k, spec.index_bits)))
    res["setup_s"] = time.time() - t0
    step = lambda q, k, v, ix, n: fast.indexed_decode_step(q, k, v, ix, n, spec=spec,
                                                           scale=scale)
    res["step_s"], _ = timing.time_loop(step, q, (k, v, index, lengths), it, rep)
    scan = lambda q, ix, n: fast.indexed.scan_estimates(q, ix, n, spec=spec, scale=scale)
    res["scan_s"], _ = timing.time_loop(scan, q, (index, lengths), it, rep)
    top = lambda q, ix, n: fast.indexed.candidates(scan(q, ix, n), spec.num_candidates)
    res["scan_topc_s"], _ = timing.time_loop(top, q, (index, lengths), it, rep)
    out, _, eps, ids, _ = fast.indexed_decode_step(q, k, v, index, lengths, spec=spec,
                                                   scale=scale, return_ids=True)
    parity = fast_parity.indexed_parity(q, k, v, ids, eps, spec, out)
    c = min(spec.num_candidates, s_len)
    read = (b * hkv * s_len * index.bytes_per_key + b * hq * c * d * size
            + 2 * b * (hq * min(spec.top_k, c) + hkv * static) * d * size)
  else:   # blocks
    t0 = time.time()
    summ = jax.block_until_ready(cj.build_summaries(k, spec.block_size, lengths))
    res["setup_s"] = time.time() - t0
    step = lambda q, k, v, mn, mx, n: fast.decode_step(q, k, v, mn, mx, n, spec=spec,
                                                       scale=scale)
    res["step_s"], _ = timing.time_loop(step, q, (k, v, summ.kmin, summ.kmax, lengths), it,
                                        rep)
    out, _, eps, ids = fast.decode_step(q, k, v, summ.kmin, summ.kmax, lengths, spec=spec,
                                        scale=scale, return_blocks=True)
    parity = fast_parity.decode_parity(q, k, v, ids, eps, spec, out=out)
    m = min(spec.top_blocks, summ.num_blocks)
    read = (2 * b * summ.num_blocks * hkv * d * size
            + 2 * b * hkv * (m * spec.block_size + static) * d * size)
  # the step's own set, apart from the specification's columns of the same row
  res.update({f"step_{name}": value for name, value in parity.items()})
  hits = _recall(out, where, g)
  res["step_recall"] = float(hits.mean())
  res["step_recall_min_head"] = float(hits.mean(1).min())
  res["read_bytes"] = int(read)
  res["floor_s"] = read / ceilings[0]
  res["dense_floor_s"] = 2 * b * s_len * hkv * d * size / ceilings[0]
  return res


def time_dense(config, q, k, v):
  """cuDNN (XLA dense off a GPU) decode over every key, timed as the steps are."""
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  q, k, v = (jnp.asarray(x, config.dtype) for x in (q, k, v))
  fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)
  return timing.time_loop(fn, q, (k, v), config.iterations, config.repeats)[0]


def table(rows) -> str:
  exact = {r["keys"]: r["recall"] for r in rows if r["mode"] == "exact"}
  body = []
  for r in rows:
    ref = exact.get(r["keys"])
    ratio = "—" if not ref else f"{r['recall'] / ref:.3f}"
    body.append([f"{r['keys'] // 1024}K", r["mode"], f"{r['recall']:.3f}", ratio,
                 f"{r['recall_min_head']:.2f}",
                 f"{r['captured_mean']:.4f}/{r['captured_min']:.4f}",
                 f"{100 * r['scored_fraction']:.2f}%", f"{r['eps_max']:.2e}",
                 f"{r['wall_s']:.1f}"])
  text = tables.markdown(["keys", "mode", "needle recall", "vs exact", "worst head",
                          "captured mean/min", "scored exactly", "eps max", "spec s"], body)
  timed = [r for r in rows if r.get("step_s")]
  if not timed:
    return text
  us = lambda x: "—" if x is None else f"{1e6 * x:.1f}"
  body = []
  for r in timed:
    dense = r.get("cudnn_s")
    speed = "—" if not dense else f"{dense / r['step_s']:.2f}x"
    body.append([f"{r['keys'] // 1024}K", r["mode"], us(r["step_s"]), us(dense), speed,
                 us(r["floor_s"]), us(r["dense_floor_s"]), us(r.get("scan_s")),
                 us(r.get("scan_topc_s")), f"{r['step_recall']:.3f}",
                 f"{r['step_captured_mean']:.4f}/{r['step_captured_min']:.4f}",
                 f"{r['step_eps_bound_max']:.2e}", f"{r['setup_s']:.2f}"])
  return text + "\n\nTimed decode steps (same inputs, same run; quality of the step's own output):\n\n" + \
      tables.markdown(["keys", "mode", "step µs", "cuDNN µs", "vs cuDNN", "floor µs",
                       "dense floor µs", "scan µs", "scan+top-C µs", "recall",
                       "captured mean/min", "eps max", "setup s"], body)


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for mode in dict.fromkeys(r["mode"] for r in rows):
    rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["keys"])
    xs = [r["keys"] for r in rs]
    axes[0].plot(xs, [r["recall"] for r in rs], "o-", label=mode)
    axes[1].plot(xs, [100 * r["scored_fraction"] for r in rs], "o-", label=mode)
  for ax, label in zip(axes, ("needle recall", "keys scored exactly (%)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("keys")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[1].set_yscale("log")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, workdir, progress: bool = True):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  workdir = manifest_lib.prepare_workdir(workdir)
  store = ResultsStore(workdir / "results.jsonl")
  manifest_lib.check_resume(workdir, config.to_dict(), has_rows=bool(store.rows))
  manifest_lib.write_manifest(workdir, config.to_dict(), {"job": "retrieval"})
  timed = bool(config.get("timing", False))
  ceilings = timing.measure_ceilings() if timed and jax.default_backend() == "gpu" else (
      1e11, 1e12)
  rows = []
  plan = [(s, mode) for s in config.lengths for mode in config.modes]
  with tqdm(total=len(plan), disable=not progress, desc=config.name, unit="row") as bar:
    for s in config.lengths:
      modes = _modes(config, s)
      inputs = needle_qkv(np.random.default_rng(config.seed + s), s, config.q_heads,
                          config.kv_heads, config.head_dim, **dict(config.data))
      keys = {mode: f"{config.name}|S{s}|{mode}|{spec}" for mode, spec in modes.items()}
      dense_s = (time_dense(config, *inputs[:3])
                 if timed and any(key not in store for key in keys.values()) else None)
      for mode, spec in modes.items():
        bar.set_postfix_str(f"{s // 1024}K {mode}")
        if keys[mode] not in store:
          store.append(run_row(config, s, mode, spec, inputs, ceilings, dense_s))
        rows.append(store.rows[keys[mode]])
        bar.update()
      jax.clear_caches()
  text = table(rows)
  (workdir / "summary.md").write_text(f"# {config.name}\n\n{text}\n")
  if config.plots:
    plot(rows, workdir / "retrieval.png")
  return {"table": text, "computed": len(plan), "skipped": 0, "rows": rows}
