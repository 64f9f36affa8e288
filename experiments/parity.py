"""The parity job: condensate vs dense on a real model over a top_k x window x anchor grid.

For every prompt the dense side runs once: greedy decoding of N tokens, then teacher-
forced logits over prompt + those N tokens (held as final hidden states on the device; the
parity statistics run there, a chunk of positions' logits at a time). Every grid point then
runs the same two
passes with condensate attention in every layer and is compared with the dense side at
every parity level of DESIGN.md §1 (condensate_jax.metrics). One results.jsonl row per
grid point x prompt (plus one "dense" row per prompt holding the reference tokens).

A covers-everything point (budget >= prompt length + N) is always added: it must be
bitwise equal to dense (logits and tokens) or the run stops with `GateFailure`. Its logits
come from the program a user runs, without stats outputs (`lm.hidden(..,
return_stats=False)`): with them XLA may fuse the layer ops around attention differently
(measured: Gemma 3 on an H200, where one attention call is bitwise either way); the
stats program, whose numbers every other row reports, must still equal dense to float
rounding (`GATE_RTOL`), and its bitwise fraction and largest logit difference stay in
the row (`stats_program_*`).

Block-summary selection (DESIGN.md §4): attention.selection / block_size / top_blocks /
epsilon set the selection of every non-gate point; when any of them is a tuple they are
grid axes too (`grid.selection_variants`), and each row records its point's settings.

Entry point for notebooks: `run(config, workdir)`; `load_model=` injects a model loader.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

import condensate_jax as cj
from condensate_jax import metrics
from experiments import grid
from experiments import manifest as manifest_lib
from experiments import prompts as prompts_lib
from experiments import report
from experiments.errors import ConfigError, ExperimentError, GateFailure, ModelUnavailable
from experiments.results import ResultsStore

OFFLINE_HINT = (
    "Offline? Run the offline config instead:\n"
    "  python -m experiments.run --config=smollm2_parity.py\n"
    "or point this config at local weights (HF dir with config.json + safetensors, or a "
    ".gguf):\n  --config.model.path=/path/to/weights")


def load_language_model(config, load_model: Optional[Callable] = None):
  """The config's model; offline hub / missing files -> ModelUnavailable (short)."""
  source = config.model.path or config.model.name
  if load_model is None:
    try:
      from condensate_jax.weights.registry import load_model  # pylint: disable=g-import-not-at-top
    except ImportError as err:
      raise ModelUnavailable(
          f"cannot load model {source!r}: the model registry is not available ({err}).")
  try:
    return load_model(source, dtype=config.model.dtype)
  except OSError as err:  # offline hub errors subclass OSError, as do missing files
    lines = str(err).strip().splitlines() or [type(err).__name__]
    detail = "\n".join(lines[:8])  # loader messages are short; never a traceback
    raise ModelUnavailable(f"cannot load model {source!r}: {detail}\n{OFFLINE_HINT}") from None
  except ValueError as err:
    raise ModelUnavailable(f"cannot load model {source!r}: {err}") from None


def make_prompts(config, lm) -> list[prompts_lib.Prompt]:
  files = [f.strip() for f in str(config.prompts.files).split(",") if f.strip()]
  # prompts.builtin (optional): comma-separated names of built-in texts, the only sources
  builtin = [n.strip() for n in str(config.prompts.get("builtin", "")).split(",") if n.strip()]
  try:
    unknown = [n for n in builtin if n not in prompts_lib.BUILTIN_TEXTS]
    if unknown or (builtin and files):
      raise ValueError(f"prompts.builtin={config.prompts.builtin!r}: expected names from "
                       f"{list(prompts_lib.BUILTIN_TEXTS)} and no prompts.files.")
    texts = (prompts_lib.read_texts(files, config.prompts.jsonl_field) if files
             else {n: prompts_lib.BUILTIN_TEXTS[n] for n in builtin} if builtin
             else prompts_lib.BUILTIN_TEXTS)
    prompts = prompts_lib.build_prompts(texts, lm.encode, num=config.prompts.num,
                                        lengths=tuple(config.prompts.lengths))
  except ValueError as err:
    raise ConfigError(str(err)) from None
  limit = int(lm.max_length) - config.generate.new_tokens
  too_long = [p.length for p in prompts if p.length > limit]
  if too_long:
    raise ConfigError(
        f"config.prompts.lengths={tuple(config.prompts.lengths)!r}: {max(too_long)} is "
        f"longer than the model context {lm.max_length} minus generate.new_tokens "
        f"{config.generate.new_tokens}; expected lengths <= {limit}.")
  return prompts


@dataclasses.dataclass
class DenseReference:
  tokens: np.ndarray    # [1, T] the prompt
  full: np.ndarray      # [1, T + N] prompt + dense greedy tokens
  generated: np.ndarray  # [N]
  hidden: Any           # [T + N, D] final hidden states, teacher forced over `full`, on
                        # the device: parity is computed there from them, a chunk of
                        # positions' logits at a time (lm.hidden_parity), so no [T, V]
                        # logits are held (Gemma 3: V = 262144)
  seconds: float


def host_logits(lm, hidden, start: int, stop: int) -> np.ndarray:
  """Logits [stop - start, V] float32 of rows start..stop-1 of hidden states [T, D]."""
  return np.asarray(lm.head(hidden[start:stop]), np.float32)


def dense_reference(lm, prompt, new_tokens: int, sampling=None,
                    implementation="xla") -> DenseReference:
  """The dense side of a prompt: decoded tokens (greedy, or sampled with `sampling`, the
  lm.generate keyword arguments of `grid.decoding`) and teacher-forced logits
  (`implementation`: "xla", or the mesh placement of `grid.model_implementation`)."""
  start = time.perf_counter()
  tokens = np.asarray(prompt.tokens, np.int32)[None]
  generated = np.asarray(lm.generate(tokens, new_tokens, implementation=implementation,
                                     **(sampling or {})), np.int32).reshape(-1)
  full = np.concatenate([tokens, generated[None]], axis=1)
  hidden = lm.hidden(full, implementation=implementation)[0]
  return DenseReference(tokens, full, generated, jax.block_until_ready(hidden),
                        time.perf_counter() - start)


def _top2_margin(logits: np.ndarray) -> float:
  top2 = np.partition(logits.astype(np.float64), -2)[-2:]
  return float(top2[1] - top2[0])


# Gate tolerance (relative to max |dense logit|) for implementations that sum the same
# set in another order and so are exact only up to float rounding (cj.attention.
# BITWISE_DENSE names the bitwise ones, whose gate stays bit for bit).
GATE_RTOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def gate_passes(row, greedy, implementation: str, dtype: str, dense_scale: float) -> bool:
  """Covers-everything parity: bitwise for BITWISE_DENSE implementations; otherwise
  identical greedy tokens and max |dlogit| <= GATE_RTOL[dtype] * dense_scale (the max
  |dense logit|). The program with stats outputs (row["stats_program_*"]) must agree with
  dense to that float tolerance in either case."""
  if not greedy["exact"]:
    return False
  within_rounding = lambda diff: float(diff) <= GATE_RTOL[dtype] * float(dense_scale)
  # the stats program (every other row's statistics come from it): float rounding
  stats_diff = row.get("stats_program_max_abs_logit_diff")
  if stats_diff is not None and not within_rounding(stats_diff):
    return False
  if implementation in cj.attention.BITWISE_DENSE:
    return row["bitwise_frac"] == 1.0
  return within_rounding(row["max_abs_logit_diff"])


# Implementations that run a spec with top_k_capacity (one compiled program per grid).
SHARED_PROGRAM_IMPLEMENTATIONS = ("xla", "xla_masked")


def shared_capacity(points, config) -> int:
  """The top_k_capacity every exact-selection point of the grid runs with (the largest
  top_k among them, so anchor x window x top_k compile to one decode and one teacher-
  forced program per prompt length, the sets and outputs bit for bit the static ones'),
  or 0 where the implementation has no runtime sizes. The covers-everything point keeps
  its static spec (its top_k spans the whole context)."""
  if (config.attention.implementation not in SHARED_PROGRAM_IMPLEMENTATIONS
      or grid.mesh_axes(config)):      # the mesh call takes static sizes
    return 0
  return max([p.top_k for p in points if p.exact and not p.covering] or [0])


def row_spec(point: grid.GridPoint, config, capacity: int) -> cj.CondensateSpec:
  """The spec a row runs: the point's, with the grid's top_k_capacity where it shares."""
  spec = grid.point_spec(point, config)
  if capacity and point.exact and not point.covering and spec.top_k <= capacity:
    spec = spec.replace(top_k_capacity=capacity)
  return spec


def condensate_row(lm, ref: DenseReference, point: grid.GridPoint, config,
                   capacity: int = 0) -> dict[str, Any]:
  spec = row_spec(point, config, capacity)
  impl = grid.model_implementation(config)
  sampling = grid.decoding(config)
  start = time.perf_counter()
  generated = np.asarray(
      lm.generate(ref.tokens, config.generate.new_tokens, attention=spec,
                  implementation=impl, **sampling), np.int32).reshape(-1)
  hidden, stats = lm.hidden(ref.full, attention=spec, implementation=impl,
                            return_stats=True)
  hidden = hidden[0]
  parity = lm.hidden_parity(ref.hidden, hidden)
  with_stats = {}
  if point.covering:     # the gate reads the program without stats outputs (module doc)
    with_stats = {f"stats_program_{k}": parity[k]
                  for k in ("bitwise_frac", "max_abs_logit_diff")}
    hidden = lm.hidden(ref.full, attention=spec, implementation=impl)[0]
    parity = lm.hidden_parity(ref.hidden, hidden)
  seconds = time.perf_counter() - start
  greedy = metrics.greedy_match(ref.generated, generated)
  row = {"kind": "condensate", "point": dataclasses.asdict(point), "budget": point.budget,
         **parity, **with_stats,
         **{f"greedy_{k}": v for k, v in greedy.items()},
         **metrics.attention_summary(stats), "tokens": generated.tolist(),
         "seconds": seconds, "decoding": "sampled" if sampling else "greedy"}
  if sampling:   # the distributions the N tokens were drawn from, along dense's tokens
    t, n = ref.tokens.shape[1], config.generate.new_tokens
    row.update(metrics.sampled_parity(host_logits(lm, ref.hidden, t - 1, t - 1 + n),
                                      host_logits(lm, hidden, t - 1, t - 1 + n),
                                      sampling["temperature"], sampling["top_p"]))
  first = greedy["first_divergence"]
  # Dense top-1 minus top-2 logit where greedy first diverged (same context up to there):
  # a tiny margin means a near-tie flipped; a large one means the output really moved.
  # (sampled runs: None, a margin between the top two logits says nothing about a draw)
  at = ref.tokens.shape[1] - 1 + (first or 0)
  row["greedy_divergence_margin"] = None if first is None or sampling else _top2_margin(
      host_logits(lm, ref.hidden, at, at + 1)[0])
  row.update(set_size_summary(stats))
  if spec.selection == "certified":   # its target, met or not on every query
    row["eps_met_frac"] = float(np.mean(np.asarray(stats.dropped_mass_bound)
                                        <= spec.epsilon))
  row["covers"] = point.budget >= ref.full.shape[1]
  row["exact"] = gate_passes(row, greedy, grid.implementation_label(config),
                             config.model.dtype,
                             parity["dense_max_abs_logit"])
  row["top_k_capacity"] = spec.top_k_capacity   # 0: a program of its own
  return row


def set_size_summary(stats) -> dict[str, float]:
  """Keys attended per query (the budget a query used; it varies per query in
  "certified" mode): mean and max over layers, heads and queries, and the mean at the
  last position (the longest context)."""
  size = np.asarray(stats.set_size, np.float64)
  visible = np.asarray(stats.visible, np.float64)
  frac = np.asarray(stats.keys_scored, np.float64)[visible > 0] / visible[visible > 0]
  eps = np.asarray(stats.dropped_mass_bound, np.float64).ravel()
  # the distributions over (layer, head, query) of the fraction of visible keys scored
  # and of the certified eps (what "certified" reports per query)
  quant = lambda x, qs: [float(v) for v in np.quantile(x, qs)] if x.size else None
  return {"set_size_mean": float(np.mean(size)), "set_size_max": float(np.max(size)),
          "set_size_last_mean": float(np.mean(size[..., -1])),
          "scored_frac_q10_50_90_max": quant(frac, [0.1, 0.5, 0.9, 1.0]),
          "eps_q50_90_99_max": quant(eps, [0.5, 0.9, 0.99, 1.0])}


def _fails_gate(row: dict[str, Any]) -> bool:
  """A finished row of an exact-selection point that covers every key but is not equal
  to dense. Block-selection points are never gate points (their top_k is a budget, and
  their sum runs in another order)."""
  return (row["covers"] and not row["exact"]
          and row.get("selection", "exact") == "exact")


def _gate_message(row: dict[str, Any]) -> str:
  impl = row["implementation"]
  wanted = ("bitwise equal to dense" if impl in cj.attention.BITWISE_DENSE else
            "equal to dense up to float rounding (GATE_RTOL) with identical tokens")
  # Stored rows hold NaN/Inf as strings: convert before formatting.
  return (f"exactness gate FAILED: point {row['point_key']} covers every key of prompt "
          f"{row['prompt']['id']} but is not {wanted} (bitwise fraction "
          f"{float(row['bitwise_frac']):.4f}, max |dlogit| "
          f"{float(row['max_abs_logit_diff']):.3g}, max ulp {row['max_ulp_diff']}, greedy "
          f"{row['greedy_equal']}/{row['greedy_n']}). The attention implementation "
          f"{impl!r} is broken; no summary table was produced.")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run(config, workdir, *, load_model: Optional[Callable] = None,
        progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) a parity sweep into `workdir`; returns {"summary": rows,
  "table": markdown, "computed": rows computed now, "skipped": rows reused}."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  grid.check_config(config)
  lm = load_language_model(config, load_model)
  workdir = manifest_lib.prepare_workdir(workdir)
  store = ResultsStore(workdir / "results.jsonl")
  manifest_lib.check_resume(workdir, config.to_dict(), has_rows=bool(store.rows))
  model_id = config.model.path or config.model.name
  prompts = make_prompts(config, lm)
  new_tokens = config.generate.new_tokens
  points = grid.grid(config, max(p.length for p in prompts) + new_tokens)
  capacity = shared_capacity(points, config)
  manifest_lib.write_manifest(workdir, config.to_dict(), {
      "model": model_id, "num_layers": int(lm.num_layers), "max_length": int(lm.max_length),
      "rows_already_done": len(store.rows)})

  plan = [(p, pt, grid.keys(config, model_id, p, pt)) for p in prompts for pt in points]
  for prompt, point, key in plan:  # a finished failing gate row still fails the run
    row = store.rows.get(key)
    if row is not None and config.gate and _fails_gate(row):
      raise GateFailure(_gate_message(row))
  pending = [item for item in plan if item[2] not in store]
  dense_pending = [p for p in prompts if grid.keys(config, model_id, p, None) not in store]
  computed = 0
  with tqdm(total=len(pending) + len(dense_pending), disable=not progress,
            desc=config.name, unit="row") as bar:
    for prompt in prompts:
      dense_key = grid.keys(config, model_id, prompt, None)
      todo = [(pt, key) for p, pt, key in pending if p is prompt]
      if not todo and dense_key in store:
        continue
      bar.set_postfix_str(f"{prompt.id} dense")
      ref = dense_reference(lm, prompt, new_tokens, grid.decoding(config),
                            grid.model_implementation(config, dense=True))
      common = {"model": model_id, "dtype": config.model.dtype,
                "prompt": {"id": prompt.id, "source": prompt.source,
                           "length": prompt.length, "sha": prompt.sha},
                "new_tokens": new_tokens}
      if dense_key in store:
        if store.rows[dense_key]["tokens"] != ref.generated.tolist():
          raise ExperimentError(
              f"dense greedy tokens for prompt {prompt.id} differ from the ones stored "
              f"in {store.path}: the dense path is not deterministic here (another "
              "device or version?). Use a fresh --workdir.")
      else:
        # Does greedy decoding (KV cache) agree with the teacher-forced argmax? (Sampled
        # runs: is every drawn token inside the teacher-forced nucleus?)
        t = prompt.length
        tf = host_logits(lm, ref.hidden, t - 1, t - 1 + new_tokens)
        sampling = grid.decoding(config)
        if sampling:
          probs = metrics.sampling_probs(tf, sampling["temperature"], sampling["top_p"])
          consistent = bool(np.all(probs[np.arange(new_tokens), ref.generated] > 0))
        else:
          consistent = bool(np.array_equal(np.argmax(tf, axis=-1), ref.generated))
        store.append({"key": dense_key, "kind": "dense", **common,
                      "tokens": ref.generated.tolist(),
                      "text": lm.decode(ref.generated.tolist()),
                      "decoding": sampling or "greedy",
                      "generate_matches_teacher_forced_argmax": consistent,
                      "seconds": ref.seconds, "finished": _now()})
        computed += 1
        bar.update()
      for point, key in todo:
        bar.set_postfix_str(f"{prompt.id} {point.key}")
        row = condensate_row(lm, ref, point, config, capacity)
        spec = grid.point_spec(point, config)
        row.update({"key": key, **common, "point_key": point.key,
                    "implementation": grid.implementation_label(config),
                    "selection": spec.selection, "bounds": spec.bounds,
                    "block_rank": spec.block_rank,
                    "query_blocks": spec.query_blocks,
                    "dense_layers": list(config.attention.dense_layers),
                    "finished": _now()})
        store.append(row)
        computed += 1
        bar.update()
        if config.gate and _fails_gate(row):
          raise GateFailure(_gate_message(row))
      del ref

  # Rows are matched to their point by results key; point_key is restamped so rows
  # written before a point's key gained its selection suffix still aggregate.
  rows = [dict(store.rows[key], point_key=point.key) for _, point, key in plan]
  summary = report.aggregate(rows, points)
  table = report.markdown_table(summary)
  report.write_summary(workdir, config, summary, table,
                       dense_rows=[store.rows[grid.keys(config, model_id, p, None)]
                                   for p in prompts])
  if config.plots:
    report.plot_all(workdir, summary)
  return {"summary": summary, "table": table, "computed": computed,
          "skipped": len(plan) + len(prompts) - computed, "workdir": str(workdir)}
