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
exactly as a fraction of the visible ones, max certified eps, CPU wall seconds (XLA
specification; informative only). Modes: exact top-k, "indexed" (index_bits,
candidates), "blocks" with top_blocks = top_k / block_size (the same middle-key budget).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj
from experiments import manifest as manifest_lib
from experiments.bench import tables
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


def run_row(config, s, mode, spec, inputs):
  q, k, v, where = inputs
  g = q.shape[2] // k.shape[2]
  t0 = time.time()
  out, stats = cj.condensate_attention(*(jnp.asarray(x, config.dtype) for x in (q, k, v)),
                                       spec, return_stats=True)
  out = np.asarray(jax.block_until_ready(out), np.float32)[0, 0]              # [Hq, D]
  wall = time.time() - t0
  n = where.shape[1]
  hits = np.array([[out[h, (h % g) * n + i] > 0 for i in range(n)]
                   for h in range(out.shape[0])])
  cap = np.asarray(stats.captured_mass)[0, :, 0]
  scored = np.asarray(stats.keys_scored)[0, :, 0] / np.asarray(stats.visible)[0, :, 0]
  return {"key": f"{config.name}|S{s}|{mode}|{spec}", "keys": s, "mode": mode,
          "spec": str(spec), "recall": float(hits.mean()),
          "recall_min_head": float(hits.mean(1).min()), "captured_mean": float(cap.mean()),
          "captured_min": float(cap.min()), "scored_fraction": float(scored.mean()),
          "eps_max": float(np.asarray(stats.dropped_mass_bound).max()), "wall_s": wall}


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
  return tables.markdown(["keys", "mode", "needle recall", "vs exact", "worst head",
                          "captured mean/min", "scored exactly", "eps max", "CPU s"], body)


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
  rows = []
  plan = [(s, mode) for s in config.lengths for mode in config.modes]
  with tqdm(total=len(plan), disable=not progress, desc=config.name, unit="row") as bar:
    for s in config.lengths:
      modes = _modes(config, s)
      inputs = needle_qkv(np.random.default_rng(config.seed + s), s, config.q_heads,
                          config.kv_heads, config.head_dim, **dict(config.data))
      for mode, spec in modes.items():
        key = f"{config.name}|S{s}|{mode}|{spec}"
        bar.set_postfix_str(f"{s // 1024}K {mode}")
        if key not in store:
          store.append(run_row(config, s, mode, spec, inputs))
        rows.append(store.rows[key])
        bar.update()
  text = table(rows)
  (workdir / "summary.md").write_text(f"# {config.name}\n\n{text}\n")
  if config.plots:
    plot(rows, workdir / "retrieval.png")
  return {"table": text, "computed": len(plan), "skipped": 0, "rows": rows}
