"""What the training jobs share: the corpus of a workdir, the optimizer of a config, the
parity evaluation and the training-curve plots."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

import jax.numpy as jnp
import numpy as np

from condensate_jax import CondensateSpec, metrics
from condensate_jax.train import corpus as corpus_lib
from condensate_jax.train import functional, trainer
from experiments import manifest as manifest_lib
from experiments.errors import ConfigError
from experiments.results import ResultsStore


def make_spec(attention) -> CondensateSpec:
  try:
    return CondensateSpec(**dict(attention))
  except (TypeError, ValueError) as err:
    raise ConfigError(f"config.attention={dict(attention)!r}: {err}") from None


def optim_config(config) -> trainer.OptimConfig:
  try:
    return trainer.OptimConfig(**dict(config.optim))
  except (TypeError, ValueError) as err:
    raise ConfigError(f"config.{err}" if str(err).startswith("optim.")
                      else f"config.optim: {err}") from None


def open_run(config, workdir):
  """(workdir, its metrics store) of a training job, refusing another config's workdir."""
  workdir = manifest_lib.prepare_workdir(workdir)
  store = ResultsStore(workdir / "metrics.jsonl")
  manifest_lib.check_resume(workdir, config.to_dict(), has_rows=bool(store.rows))
  return workdir, store


def eval_data(data: corpus_lib.Corpus, config):
  """(prompts [P, L], windows [N, seq_len + 1]) of the held-out tokens."""
  prompts = corpus_lib.spaced_windows(data.heldout, config.eval.prompts,
                                      config.eval.prompt_len)[:, :config.eval.prompt_len]
  windows = corpus_lib.spaced_windows(data.heldout, config.eval.windows,
                                      config.data.seq_len)
  return prompts, windows


def finish(config, workdir, store, before: int, *, table, panels, plot_name, spec,
           header: str = ""):
  """summary.md (device, spec, header, the table of `table(rows)`) and the plot; the job's
  result dict."""
  rows = list(store)
  text = table(rows)
  (workdir / "summary.md").write_text(
      f"# {config.name}\n\n{manifest_lib.device_info()}\n\n{header}spec: {spec!r}\n\n"
      f"{text}\n")
  if config.plots:
    plot_curves(rows, workdir / plot_name, panels,
                title=f"{config.name}: {spec_label(spec)}")
  return {"table": text, "computed": len(store.rows) - before, "skipped": before,
          "rows": rows}


def corpus_settings(data, lm) -> dict:
  """What the tokens of a corpus depend on: the data settings and the tokenizer (its
  vocabulary size and the ids of a probe text)."""
  probe = "Condensate attention: def f(x): return x ** 2  # ünïcode"
  return {"sources": list(data.sources), "max_chars": int(data.max_chars or 0),
          "holdout": float(data.holdout), "vocab_size": int(lm.vocab_size),
          "probe_ids": list(lm.encode(probe)) if lm.tokenizer is not None else None}


def load_corpus(data, lm, workdir: pathlib.Path) -> corpus_lib.Corpus:
  """The tokenised corpus of this workdir: built on the first run and saved there
  (corpus.npz, atomically), loaded from it on a resume, so a resumed run trains on the
  very same tokens even where another Python would build other text. A corpus.npz built
  with other data settings or another tokenizer is refused (ConfigError)."""
  path = workdir / "corpus.npz"
  settings = corpus_settings(data, lm)
  if path.exists():
    with np.load(path) as f:
      meta = json.loads(str(f["meta"]))
      if meta.get("settings") != settings:
        raise ConfigError(f"{path} was built with other data settings or another "
                          f"tokenizer ({meta.get('settings')} here, {settings} asked); use "
                          "a fresh --workdir.")
      return corpus_lib.Corpus(train=f["train"], heldout=f["heldout"], digest=meta["digest"],
                               documents=tuple(meta["documents"]), chars=meta["chars"])
  if lm.tokenizer is None:
    raise ConfigError(f"model {lm.name}: no tokenizer, so the text corpus cannot be "
                      "tokenised; use a model directory with tokenizer files.")
  try:
    built = corpus_lib.build_corpus(lm.encode, corpus_lib.eos_id(lm.tokenizer),
                                    sources=tuple(data.sources),
                                    max_chars=data.max_chars or None, holdout=data.holdout)
  except ValueError as err:
    raise ConfigError(f"config.data: {err}") from None
  meta = json.dumps({"digest": built.digest, "documents": list(built.documents),
                     "chars": built.chars, "settings": settings})
  tmp = workdir / "corpus.tmp.npz"
  with open(tmp, "wb") as f:
    np.savez(f, train=built.train, heldout=built.heldout, meta=np.asarray(meta))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return built


def _positive(config, key, lo=1):
  section, _, name = key.partition(".")
  value = config[section][name] if name else config[section]
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    raise ConfigError(f"config.{key}={value!r}: expected an int >= {lo}.")
  return value


def check_training_config(config, max_length: int):
  """ConfigError naming the key for a training config's bad data / eval / checkpoint
  values (the optimizer's are `optim_config`'s), before anything is built."""
  for key in ("data.batch", "data.accumulate", "eval.prompts", "eval.windows",
              "eval.batch", "eval.prompt_len", "eval.new_tokens", "checkpoint_every"):
    _positive(config, key)
  _positive(config, "data.seq_len", 2)
  _positive(config, "eval.every", 0)
  if config.data.seq_len > max_length:
    raise ConfigError(f"config.data.seq_len={config.data.seq_len}: the model's context is "
                      f"{max_length} tokens; expected at most {max_length}.")
  if config.eval.prompt_len + config.eval.new_tokens > max_length:
    raise ConfigError(f"config.eval.prompt_len + new_tokens = {config.eval.prompt_len} + "
                      f"{config.eval.new_tokens}: expected at most the model's context, "
                      f"{max_length}.")
  if config.model.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: expected 'float32', "
                      "'bfloat16' or 'float16' (the compute dtype; weights stay float32).")


def fit(config, **kwargs):
  """`trainer.fit` with the setting's digest in the checkpoint metadata; a checkpoint of
  another setting is a ConfigError."""
  kwargs["metadata"] = {**kwargs.get("metadata", {}), "setting": setting_digest(config)}
  try:
    return trainer.fit(**kwargs)
  except trainer.CheckpointMismatch as err:
    raise ConfigError(str(err)) from None


def setting_digest(config) -> str:
  """sha256 of the config keys that change a row (a checkpoint's setting)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  d = {k: v for k, v in config.to_dict().items()
       if k not in manifest_lib.NON_RESULT_KEYS}
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def batch_fn(tokens: np.ndarray, data, seed: int):
  """step -> [accumulate, batch, seq_len + 1] int32 windows (a function of the step)."""
  shape = (data.accumulate, data.batch)

  def fn(step):
    flat = corpus_lib.sample_windows(tokens, step, batch=shape[0] * shape[1],
                                     length=data.seq_len, seed=seed)
    return jnp.asarray(flat.reshape(shape + (data.seq_len + 1,)))

  corpus_lib.check_windows(tokens, data.seq_len, "train tokens")
  return fn


def heldout_nll(fn: functional.Functional, params, windows, spec, batch: int) -> float:
  """Mean next-token NLL of held-out windows [N, T + 1] (nats per token), `batch`
  windows per call."""
  total = sum(float(fn.nll_sum(params, jnp.asarray(windows[i:i + batch]), spec))
              for i in range(0, windows.shape[0], batch))
  return total / (windows.shape[0] * (windows.shape[1] - 1))


def parity(ref_lm, ref_spec, cond_lm, cond_spec, prompts: np.ndarray, new_tokens: int,
           ref_tokens: Optional[np.ndarray] = None) -> dict:
  """The runner's parity levels of cond_lm under cond_spec against ref_lm under ref_spec
  (None: dense) on prompts [P, L]: greedy tokens (match fraction, earliest and mean first
  divergence over prompts), and with both fed the reference's greedy tokens, KL(ref ||
  cond) and top-1 agreement of the next-token distributions at the new positions.
  ref_tokens: the reference's greedy tokens, when known (a frozen teacher)."""
  length = prompts.shape[1]
  if ref_tokens is None:
    ref_tokens = np.asarray(ref_lm.generate(prompts, new_tokens, ref_spec))
  cond_tokens = np.asarray(cond_lm.generate(prompts, new_tokens, cond_spec))
  rows = [metrics.greedy_match(r, c) for r, c in zip(ref_tokens, cond_tokens)]
  first = [row["prefix"] for row in rows]
  seq = np.concatenate([prompts, ref_tokens[:, :-1]], axis=1)
  h_ref = ref_lm.hidden(seq, ref_spec)[:, length - 1:]
  h_cond = cond_lm.hidden(seq, cond_spec)[:, length - 1:]
  par = metrics.logit_parity_on_device(ref_lm.head(h_ref), cond_lm.head(h_cond))
  return {"greedy_match": float(np.mean(ref_tokens == cond_tokens)),
          "first_divergence_min": int(min(first)),
          "first_divergence_mean": float(np.mean(first)),
          "greedy_exact": float(np.mean([row["exact"] for row in rows])),
          "kl": par["mean_kl"], "top1": par["top1_agreement"]}, ref_tokens


def attention_stats(lm, windows: np.ndarray, spec) -> dict:
  """`metrics.attention_summary` of lm under spec on held-out windows [N, T] (captured
  mass of the set, certified eps, keys read)."""
  _, stats = lm.logits(windows, spec, return_stats=True)
  s = metrics.attention_summary(stats)
  eps = np.asarray(stats.dropped_mass_bound, np.float64)
  s["certified_eps_mean"] = float(np.mean(eps))
  return s


def spec_label(spec: CondensateSpec) -> str:
  """A short name of a spec for titles: its sizes and the mode's own knobs."""
  parts = [f"anchor {spec.anchor}", f"window {spec.window}"]
  if spec.selection in ("exact", "indexed", "bounded"):
    parts.append(f"top-k {spec.top_k}")
  if spec.selection in ("blocks", "bounded", "certified"):
    parts.append(f"P {spec.block_size}" + (f" M {spec.top_blocks}"
                                           if spec.selection == "blocks" else ""))
  if spec.dense_layers:
    parts.append(f"dense layers {list(spec.dense_layers)}")
  return f"{spec.selection}: " + ", ".join(parts)


def plot_curves(rows, path, panels, title: str = ""):
  """One panel per (key, label, log-scale) of `panels`; a line per group of rows (the
  "arm" field, or one line), eval rows (kind "eval") or train rows (kind "train") as the
  key's prefix says ("train:" or "eval:")."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  arms = list(dict.fromkeys(r.get("arm", "") for r in rows))
  cols = min(3, len(panels))
  nrows = -(-len(panels) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
  for ax, (key, label, log) in zip(axes.ravel(), panels):
    kind, _, field = key.partition(":")
    for arm in arms:
      pts = sorted((r["step"], float(r[field])) for r in rows
                   if r.get("kind") == kind and r.get("arm", "") == arm and field in r
                   and r[field] is not None)
      if log:   # a zero (e.g. the KL of the untouched weights) has no place on a log axis
        pts = [(x, y) for x, y in pts if y > 0]
      if pts:
        x, y = zip(*pts)
        ax.plot(x, y, marker="o" if kind == "eval" else None, ms=3, lw=1.2,
                label=arm or None)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    if log:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if arms != [""]:
      ax.legend(fontsize=7)
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
