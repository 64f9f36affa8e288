"""Model-level decode and prefill on the fast path (issue #14): what a user of
`lm.generate` gets, with the parity of the same setting beside it.

Per (model, prompt length, batch), in one run on one device:
  dense      `lm.generate(attention=None, implementation="fast")`: every layer on the dense
             kernel (cuDNN on a GPU in bf16/fp16, XLA otherwise);
  each spec  `lm.generate(attention=spec, implementation="fast")`: the timed decode steps
             (`fast.decode_step` for "blocks", `fast.indexed_decode_step` for "indexed"),
             the prefill kernels where they exist (`models.fast_path`).
Timed (median of `repeats` after a compiling call): `lm.prefill` of the prompts into an
empty cache of the generate's size ("prefill s") and, from that prefilled cache after one
untimed step, a jitted loop of N - 2 greedy decode steps (`generate.step` on the fast
path, the cache a loop carry updated in place, as in `lm.generate`'s loop): decode step =
its time / (N - 2), tokens/s = B / step, selection and index/summary updates included
(the loop's one copy of the input cache per call lands in the steps). Not (generate's
time - the prefill's) / (N - 1), as before 2026-12-04: with a prefill of seconds (the
"indexed" XLA-specification prefill at 32K, B = 8: 7.9 s) that difference is noise of
the prefill's size (seen: a 32K step "faster" than the 256-token one). "context share":
1 - (decode step at `short` tokens) / (decode step at this length), the same model and
batch: the part of the step that grows with the context (attention and its cache reads),
measured, not modelled; the rest is weights, MLP and LM head.
Parity of the same spec: greedy tokens against dense (match fraction, earliest
divergence over the rows), and KL(dense || spec) of every decode step's distribution
with both caches fed dense's greedy tokens (mean, max), float32 on the device.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from condensate_jax import CondensateSpec, metrics
from condensate_jax import generate as gen
from condensate_jax.models import fast_path
from experiments import manifest as manifest_lib
from experiments import prompts as prompts_lib
from experiments.bench import tables
from experiments.results import ResultsStore


def make_specs(config) -> dict:
  """name -> CondensateSpec (None: dense) of config.specs."""
  out = {"dense": None}
  for name, kw in config.specs.items():
    out[name] = CondensateSpec(**dict(kw))
  return out


def prompt_tokens(lm, length: int, batch: int, seed: int) -> np.ndarray:
  """[batch, length] ids: the built-in prompts (cycled over rows) through the model's
  tokenizer, or random ids for a model without one."""
  if lm.tokenizer is None:
    return np.random.default_rng(seed).integers(0, lm.vocab_size, (batch, length),
                                                dtype=np.int32)
  texts = prompts_lib.BUILTIN_TEXTS
  num = min(batch, len(texts))
  built = prompts_lib.build_prompts(texts, lm.encode, num=num, lengths=(length,))
  return np.asarray([built[b % num].tokens for b in range(batch)], np.int32)


def _timed(fn, repeats: int):
  """(median seconds of `repeats` calls after one compiling call, the last result)."""
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def _empty_cache(lm, batch, n, spec):
  from condensate_jax import generate as gen  # pylint: disable=import-outside-toplevel
  # the fast path's whole-block cache may round past max_length (positions never used)
  return gen.init_cache(lm.config, batch, fast_path.cache_length(n, spec), lm.dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "steps"))
def decode_loop(graphdef, state, tok, cache, *, attention, steps):
  """`steps` greedy decode steps of the fast path from a filled cache: (last tokens [B],
  cache)."""
  def body(_, carry):
    tok, cache = carry
    logits, cache = gen.step(graphdef, state, tok[:, None], cache, attention=attention,
                             implementation=fast_path.NAME)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache
  return jax.lax.fori_loop(0, steps, body, (tok, cache))


def time_generate(lm, tokens, new_tokens, spec, repeats):
  """(prefill s, decode s per step, tokens [B, N]) on the fast path (module docstring):
  `lm.prefill` into an empty cache, then `decode_loop` from the filled cache; the tokens
  are `lm.generate`'s (one untimed call)."""
  if new_tokens < 3:
    raise ValueError(f"new_tokens={new_tokens}: expected >= 3 (one untimed step, then "
                     "a timed loop of new_tokens - 2).")
  b, t = tokens.shape
  cache = _empty_cache(lm, b, t + new_tokens, spec)
  t1, (last, filled) = _timed(lambda: lm.prefill(tokens, cache, spec,
                                                 implementation=fast_path.NAME), repeats)
  logits, filled = lm.step(jnp.argmax(last, axis=-1)[:, None].astype(jnp.int32), filled,
                           spec, implementation=fast_path.NAME)   # the cache's structure
  tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  steps = new_tokens - 2
  tn, _ = _timed(lambda: decode_loop(lm.graphdef, lm.state, tok, filled, attention=spec,
                                     steps=steps), repeats)
  out = lm.generate(tokens, new_tokens, spec, implementation=fast_path.NAME)
  return t1, tn / steps, np.asarray(out)


def forced_parity(lm, tokens, forced, spec):
  """Per decode step, `metrics.row_parity` of dense's and spec's logits with both caches
  fed the same tokens (dense's greedy ones: teacher forcing through the caches); the
  prefill's last position counts as step 0. Returns summarize_rows' dict."""
  b, t = tokens.shape
  n = forced.shape[1]
  specs = (None, spec)
  caches, logits = [], []
  for side in specs:
    out, cache = lm.prefill(tokens, _empty_cache(lm, b, t + n, spec), side,
                            implementation=fast_path.NAME)
    caches.append(cache)
    logits.append(out)
  rows = [_rows(*logits)]
  for i in range(n - 1):
    step_in = jnp.asarray(forced[:, i:i + 1])
    logits = []
    for side in range(2):
      out, caches[side] = lm.step(step_in, caches[side], specs[side],
                                  implementation=fast_path.NAME)
      logits.append(out[:, -1])
    rows.append(_rows(*logits))
  stacked = tuple(jnp.concatenate(parts) for parts in zip(*rows))
  out = metrics.summarize_rows(stacked)
  out["max_kl"] = float(jnp.max(stacked[3]))
  return out


@jax.jit
def _rows(dense, cond):
  return metrics.row_parity(dense, cond)


def greedy_match(dense, cond) -> tuple[float, int]:
  """(fraction of equal tokens, earliest first divergence over rows; N when none)."""
  same = dense == cond
  first = [int(np.argmin(r)) if not r.all() else r.size for r in same]
  return float(same.mean()), min(first)


def run_case(lm, config, model_name, length, batch, spec_name, spec, dense_tokens,
             short_step_s):
  tokens = prompt_tokens(lm, length, batch, config.seed)
  prefill_s, step_s, out = time_generate(lm, tokens, config.new_tokens, spec,
                                         config.repeats)
  row = {"model": model_name, "length": length, "batch": batch, "spec": spec_name,
         "spec_repr": repr(spec), "prefill_s": prefill_s, "step_s": step_s,
         "tokens_per_s": batch / step_s if step_s > 0 else float("nan"),
         "new_tokens": config.new_tokens, "dense_kernel": fast_path.dense_kernel(lm.dtype),
         "short_step_s": short_step_s,
         "context_share": (1.0 - short_step_s / step_s) if short_step_s and step_s else None}
  if dense_tokens is None:
    row["greedy_match"], row["first_divergence"] = 1.0, config.new_tokens
    row["mean_kl"], row["max_kl"] = 0.0, 0.0
  else:
    row["greedy_match"], row["first_divergence"] = greedy_match(dense_tokens, out)
    parity = forced_parity(lm, tokens, dense_tokens, spec)
    row["mean_kl"], row["max_kl"] = parity["mean_kl"], parity["max_kl"]
    row["top1_agreement"] = parity["top1_agreement"]
  return row, out


def table(rows) -> str:
  # stored rows hold non-finite floats as strings ("nan": a step too short to time)
  f = lambda r, key: float(r[key]) if r.get(key) is not None else None
  dense = {(r["model"], r["length"], r["batch"]): r for r in rows if r["spec"] == "dense"}
  body = []
  for r in rows:
    d = dense.get((r["model"], r["length"], r["batch"]))

    def gain(key, inv=False):
      x, y = f(r, key), (None if d is None else f(d, key))
      if not x or not y or not (np.isfinite(x) and np.isfinite(y)):
        return "—"
      return f"{(y / x) if inv else (x / y):.2f}x"

    share = f(r, "context_share")
    body.append([r["model"], str(r["length"]), str(r["batch"]), r["spec"],
                 f"{f(r, 'tokens_per_s'):.1f}", gain("tokens_per_s"),
                 f"{1e3 * f(r, 'step_s'):.2f}", "—" if share is None else f"{100 * share:.0f}%",
                 f"{f(r, 'prefill_s'):.3f}", gain("prefill_s", inv=True),
                 f"{f(r, 'greedy_match'):.3f}", str(r["first_divergence"]),
                 tables.fmt_num(f(r, "mean_kl")), tables.fmt_num(f(r, "max_kl"))])
  return tables.markdown(["model", "tokens", "B", "spec", "decode tok/s", "vs dense",
                          "step ms", "context share", "prefill s", "prefill vs dense",
                          "greedy match", "first divergence", "mean KL", "max KL"], body)


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  cases = list(dict.fromkeys((r["model"], r["length"], r["batch"]) for r in rows))
  specs = list(dict.fromkeys(r["spec"] for r in rows))
  by = {(r["model"], r["length"], r["batch"], r["spec"]): r for r in rows}
  fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(cases)) * 1.6, 3.6))
  x = np.arange(len(cases))
  width = 0.8 / len(specs)
  for i, s in enumerate(specs):
    tps = [float(by.get(c + (s,), {}).get("tokens_per_s", np.nan)) for c in cases]
    kl = [float(by.get(c + (s,), {}).get("mean_kl", np.nan)) for c in cases]
    axes[0].bar(x + i * width, tps, width, label=s)
    axes[1].bar(x + i * width, np.maximum(np.asarray(kl, float), 1e-12), width, label=s)
  labels = [f"{m}\n{n} tok, B={b}" for m, n, b in cases]
  for ax, name in zip(axes, ("decode tokens/s", "mean KL(dense || spec)")):
    ax.set_xticks(x + 0.4 - width / 2, labels, fontsize=7)
    ax.set_ylabel(name)
    ax.grid(alpha=0.3, axis="y")
  axes[1].set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _load(config, entry):
  from condensate_jax.weights.registry import load_model  # pylint: disable=import-outside-toplevel
  return load_model(entry["path"] or entry["name"], dtype=config.dtype)


def run(config, workdir, progress: bool = True):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  if isinstance(config.new_tokens, bool) or not isinstance(config.new_tokens, int) or (
      config.new_tokens < 3):
    raise ValueError(f"config.new_tokens={config.new_tokens!r}: expected an int >= 3 (one "
                     "untimed decode step, then a timed loop of new_tokens - 2).")
  workdir = manifest_lib.prepare_workdir(workdir)
  store = ResultsStore(workdir / "results.jsonl")
  manifest_lib.check_resume(workdir, config.to_dict(), has_rows=bool(store.rows))
  manifest_lib.write_manifest(workdir, config.to_dict(), {"job": "model_bench"})
  specs = make_specs(config)
  plan = [(m, n, b, s) for m in config.models for n in config.models[m]["lengths"]
          for b in config.batches for s in specs]
  rows = []
  before = len(store.rows)
  with tqdm(total=len(plan), disable=not progress, desc=config.name, unit="row") as bar:
    for model_name, entry in config.models.items():
      lm = None
      for length in entry["lengths"]:
        for batch in config.batches:
          keys = {s: f"{config.name}|{model_name}|{length}|{batch}|{s}|{specs[s]!r}"
                  for s in specs}
          if any(k not in store for k in keys.values()):
            lm = lm or _load(config, entry)
            short = prompt_tokens(lm, config.short, batch, config.seed)
            dense_tokens, short_s = None, {}
            for name, spec in specs.items():
              bar.set_postfix_str(f"{model_name} {length} B={batch} {name}")
              short_s[name] = time_generate(lm, short, config.new_tokens, spec,
                                            config.repeats)[1]
              row, out = run_case(lm, config, model_name, length, batch, name, spec,
                                  dense_tokens, short_s[name])
              if name == "dense":
                dense_tokens = out
              if keys[name] not in store:
                store.append({"key": keys[name], **row})
              bar.update()
            jax.clear_caches()
          else:
            bar.update(len(specs))
          rows += [store.rows[keys[s]] for s in specs]
  text = table(rows)
  device = manifest_lib.device_info()
  (workdir / "summary.md").write_text(f"# {config.name}\n\n{device}\n\n{text}\n")
  if config.plots:
    plot(rows, workdir / "model_bench.png")
  computed = len(store.rows) - before
  return {"table": text, "computed": computed, "skipped": len(plan) - computed, "rows": rows}
