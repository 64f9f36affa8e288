"""The parity job: condensate vs dense on a real model over a top_k x window x anchor grid.

For every prompt the dense side runs once: greedy decoding of N tokens, then teacher-
forced logits over prompt + those N tokens. Every grid point then runs the same two
passes with condensate attention in every layer and is compared with the dense side at
every parity level of DESIGN.md §1 (condensate_jax.metrics). One results.jsonl row per
grid point x prompt (plus one "dense" row per prompt holding the reference tokens).

A covers-everything point (budget >= prompt length + N) is always added: it must be
bitwise equal to dense (logits and tokens) or the run stops with `GateFailure`.

Block-summary selection (DESIGN.md §4): attention.selection / block_size / top_blocks /
epsilon set the selection of every non-gate point; when any of them is a tuple they are
grid axes too (`selection_variants`), and each row records its point's settings.

Entry point for notebooks: `run(config, workdir)`; `load_model=` injects a model loader.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import time
from typing import Any, Callable, Optional

import numpy as np

import condensate_jax as cj
from condensate_jax import metrics
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
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class GridPoint:
  """One condensate setting of the sweep.

  selection/block_size/top_blocks/epsilon are the block-selection settings of the point
  (DESIGN.md §4); for selection="exact" (and the covering point) they are unused.
  """
  anchor: int
  window: int
  top_k: int
  covering: bool = False  # the point added to cover every key (the exactness gate)
  selection: str = "exact"
  block_size: int = 64
  top_blocks: int = 8
  epsilon: float = 2.0**-24

  @property
  def exact(self) -> bool:
    """True when the point uses exact selection (always for the covering point)."""
    return self.covering or self.selection == "exact"

  @property
  def budget(self) -> int:
    """anchor + window + top_k: the set size of exact selection; for "blocks" points of
    a block grid top_k = top_blocks * block_size; "certified" sets vary per query (see
    set_size in the rows)."""
    return self.anchor + self.window + self.top_k

  @property
  def budget_key(self) -> str:
    """a{anchor}-w{window}-k{top_k}: the last part of every results.jsonl key."""
    return f"a{self.anchor}-w{self.window}-k{self.top_k}"

  @property
  def key(self) -> str:
    """Unique within a grid: budget_key, plus the settings of its selection mode that
    change the set (block_size for "bounded"; block_size and top_blocks for "blocks";
    block_size and epsilon for "certified")."""
    if self.exact:
      return self.budget_key
    extra = {"bounded": "", "blocks": f"-M{self.top_blocks}",
             "certified": f"-e{self.epsilon:g}"}[self.selection]
    return f"{self.budget_key}-{self.selection}-P{self.block_size}{extra}"

  def spec(self, dense_layers=()) -> cj.CondensateSpec:
    spec = cj.CondensateSpec(anchor=self.anchor, window=self.window, top_k=self.top_k,
                             dense_layers=tuple(dense_layers))
    if self.exact:
      return spec
    return spec.replace(selection=self.selection, block_size=self.block_size,
                        top_blocks=self.top_blocks, epsilon=self.epsilon)


BLOCK_AXES = ("selection", "block_size", "top_blocks", "epsilon")


def _int_tuple(config_value, name: str, minimum: int) -> tuple[int, ...]:
  values = tuple(config_value) if isinstance(config_value, (tuple, list)) else (config_value,)
  if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                       for v in values):
    raise ConfigError(
        f"config.{name}={config_value!r}: expected a non-empty tuple of ints >= {minimum}.")
  return values


def _tuple(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def is_block_grid(config) -> bool:
  """True when any of attention.selection/block_size/top_blocks/epsilon is a tuple: the
  block settings are then grid axes (see `selection_variants`). With all four scalar
  (every config before block grids) the grid and the results keys are unchanged."""
  return any(isinstance(config.attention.get(name), (tuple, list)) for name in BLOCK_AXES)


def _check_block_axes(config) -> None:
  a = config.attention
  selections = _tuple(a.get("selection", "exact"))
  if not selections or any(s not in cj.spec.SELECTIONS for s in selections):
    raise ConfigError(
        f"config.attention.selection={a.get('selection')!r}: expected one of "
        f"{cj.spec.SELECTIONS} or a non-empty tuple of them.")
  _int_tuple(a.block_size, "attention.block_size", 1)
  _int_tuple(a.top_blocks, "attention.top_blocks", 0)
  eps = _tuple(a.epsilon)
  if not eps or any(isinstance(e, bool) or not isinstance(e, (int, float))
                    or not 0.0 < e < 1.0 for e in eps):
    raise ConfigError(f"config.attention.epsilon={a.epsilon!r}: expected a float in "
                      "(0, 1) or a non-empty tuple of them.")
  # checked whatever the selection, so a typo is caught even where it would not apply
  if a.get("block_rank", "bound") not in cj.spec.BLOCK_RANKS:
    raise ConfigError(f"config.attention.block_rank={a.get('block_rank')!r}: expected "
                      f"one of {cj.spec.BLOCK_RANKS}.")
  if not isinstance(a.get("query_blocks", False), bool):
    raise ConfigError(f"config.attention.query_blocks={a.get('query_blocks')!r}: "
                      "expected True or False.")


def selection_variants(config) -> list[dict[str, Any]]:
  """The selection settings each (anchor, window) pair is swept over, as GridPoint
  fields (top_k, selection, block_size, top_blocks, epsilon).

  Scalar block settings (`is_block_grid` False): one variant per top_k, every one with
  the configured selection (the behaviour of every config before block grids).
  Block grid: each selection mode takes only the axes that change its set, so no two
  points compute the same thing:
    "exact":     top_k;
    "bounded":   top_k x block_size;
    "blocks":    block_size x top_blocks, with top_k = top_blocks * block_size (the
                 number of middle keys it reads, so its budget is comparable with the
                 exact point of the same top_k);
    "certified": block_size x epsilon, with top_k = 0 (its set size varies per query and
                 is reported as set_size) and top_blocks = the first value (in the
                 Pallas kernel it only sets the read round, not the set).
  """
  a = config.attention
  top_ks = _tuple(a.top_k)
  if not is_block_grid(config):
    base = dict(selection=a.get("selection", "exact"), block_size=a.block_size,
                top_blocks=a.top_blocks, epsilon=a.epsilon)
    return [dict(top_k=k, **base) for k in top_ks]
  sizes, blocks, epsilons = _tuple(a.block_size), _tuple(a.top_blocks), _tuple(a.epsilon)
  first = dict(block_size=sizes[0], top_blocks=blocks[0], epsilon=epsilons[0])
  out = []
  for selection in dict.fromkeys(_tuple(a.selection)):  # ordered, deduplicated
    if selection == "exact":
      out += [dict(first, top_k=k, selection=selection) for k in top_ks]
    elif selection == "bounded":
      out += [dict(first, top_k=k, selection=selection, block_size=p)
              for k in top_ks for p in sizes]
    elif selection == "blocks":
      out += [dict(first, top_k=m * p, selection=selection, block_size=p, top_blocks=m)
              for p in sizes for m in blocks]
    else:
      out += [dict(first, top_k=0, selection=selection, block_size=p, epsilon=e)
              for p in sizes for e in epsilons]
  return out


def check_config(config) -> None:
  """Raises ConfigError naming the first invalid key."""
  _int_tuple(config.attention.top_k, "attention.top_k", 0)
  _int_tuple(config.attention.window, "attention.window", 0)
  _int_tuple(config.attention.anchor, "attention.anchor", 0)
  _check_block_axes(config)
  for variant in selection_variants(config):  # every spec of the grid is valid
    point_spec(GridPoint(0, 0, **variant), config)
  if tuple(config.attention.dense_layers):
    _int_tuple(config.attention.dense_layers, "attention.dense_layers", 0)
  _int_tuple(config.prompts.lengths, "prompts.lengths", 1)
  n = config.generate.new_tokens
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ConfigError(f"config.generate.new_tokens={n!r}: expected an int >= 1.")
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: expected one of {DTYPES}.")
  if not (config.model.path or config.model.name):
    raise ConfigError("config.model.name and config.model.path are both empty: expected "
                      "a model name (e.g. 'smollm2-135m') or a path.")


def grid(config, total_length: int) -> list[GridPoint]:
  """The covers-everything point first, then anchor x window x `selection_variants`
  (top_k for exact selection), deduplicated."""
  a = config.attention
  a0, w0 = tuple(a.anchor)[0], tuple(a.window)[0]
  points = [GridPoint(a0, w0, max(0, total_length - a0 - w0), covering=True)]
  variants = selection_variants(config)
  for anchor in a.anchor:
    for window in a.window:
      for variant in variants:
        point = GridPoint(anchor, window, **variant)
        if point.key != points[0].key and point not in points:
          points.append(point)
  return points


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
  try:
    texts = (prompts_lib.read_texts(files, config.prompts.jsonl_field) if files
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
  logits: np.ndarray    # [T + N, V] float32, teacher forced over `full`
  seconds: float


def dense_reference(lm, prompt, new_tokens: int) -> DenseReference:
  start = time.perf_counter()
  tokens = np.asarray(prompt.tokens, np.int32)[None]
  generated = np.asarray(lm.generate(tokens, new_tokens), np.int32).reshape(-1)
  full = np.concatenate([tokens, generated[None]], axis=1)
  logits = np.asarray(lm.logits(full), np.float32)[0]
  return DenseReference(tokens, full, generated, logits, time.perf_counter() - start)


def _top2_margin(logits: np.ndarray) -> float:
  top2 = np.partition(logits.astype(np.float64), -2)[-2:]
  return float(top2[1] - top2[0])


def point_spec(point: GridPoint, config) -> cj.CondensateSpec:
  """The spec of a grid point; the covers-everything point always uses exact selection
  (it is the exactness gate of the implementation)."""
  a = config.attention
  try:
    spec = point.spec(a.dense_layers)
    if spec.selection == "blocks":
      spec = spec.replace(block_rank=a.get("block_rank", "bound"),
                          query_blocks=a.get("query_blocks", False))
    return spec
  except ValueError as err:
    raise ConfigError(f"config.attention: {err}") from None


def _block_options(config, point) -> str:
  """Key suffix of a "blocks" point's non-default block_rank / query_blocks ("" else, so
  keys written before these options existed still match)."""
  if point.exact or point.selection != "blocks":
    return ""
  a = config.attention
  rank, qb = a.get("block_rank", "bound"), a.get("query_blocks", False)
  return (f"-r{rank}" if rank != "bound" else "") + ("-qb" if qb else "")


# Gate tolerance (relative to max |dense logit|) for implementations that sum the same
# set in another order and so are exact only up to float rounding (cj.attention.
# BITWISE_DENSE names the bitwise ones, whose gate stays bit for bit).
GATE_RTOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def gate_passes(row, greedy, implementation: str, dtype: str, dense_logits) -> bool:
  """Covers-everything parity: bitwise for BITWISE_DENSE implementations; otherwise
  identical greedy tokens and max |dlogit| <= GATE_RTOL[dtype] * max |dense logit|."""
  if not greedy["exact"]:
    return False
  if implementation in cj.attention.BITWISE_DENSE:
    return row["bitwise_frac"] == 1.0
  diff = float(row["max_abs_logit_diff"])
  return diff <= GATE_RTOL[dtype] * float(np.abs(dense_logits).max())


def condensate_row(lm, ref: DenseReference, point: GridPoint, config) -> dict[str, Any]:
  spec = point_spec(point, config)
  impl = config.attention.implementation
  start = time.perf_counter()
  generated = np.asarray(
      lm.generate(ref.tokens, config.generate.new_tokens, attention=spec,
                  implementation=impl), np.int32).reshape(-1)
  logits, stats = lm.logits(ref.full, attention=spec, implementation=impl,
                            return_stats=True)
  logits = np.asarray(logits, np.float32)[0]
  seconds = time.perf_counter() - start
  greedy = metrics.greedy_match(ref.generated, generated)
  row = {"kind": "condensate", "point": dataclasses.asdict(point), "budget": point.budget,
         **metrics.logit_parity(ref.logits, logits),
         **{f"greedy_{k}": v for k, v in greedy.items()},
         **metrics.attention_summary(stats), "tokens": generated.tolist(),
         "seconds": seconds}
  first = greedy["first_divergence"]
  # Dense top-1 minus top-2 logit where greedy first diverged (same context up to there):
  # a tiny margin means a near-tie flipped; a large one means the output really moved.
  row["greedy_divergence_margin"] = None if first is None else _top2_margin(
      ref.logits[ref.tokens.shape[1] - 1 + first])
  row.update(set_size_summary(stats))
  row["covers"] = point.budget >= ref.full.shape[1]
  row["exact"] = gate_passes(row, greedy, impl, config.model.dtype, ref.logits)
  return row


def set_size_summary(stats) -> dict[str, float]:
  """Keys attended per query (the budget a query used; it varies per query in
  "certified" mode): mean and max over layers, heads and queries, and the mean at the
  last position (the longest context)."""
  size = np.asarray(stats.set_size, np.float64)
  return {"set_size_mean": float(np.mean(size)), "set_size_max": float(np.max(size)),
          "set_size_last_mean": float(np.mean(size[..., -1]))}


def _fails_gate(row: dict[str, Any]) -> bool:
  """A finished row of an exact-selection point that covers every key but is not equal
  to dense. Block-selection points are never gate points (their top_k is a budget, and
  their sum runs in another order)."""
  return (row["covers"] and not row["exact"]
          and row.get("selection", "exact") == "exact")


def _keys(config, model_id: str, prompt, point: Optional[GridPoint]) -> str:
  base = (f"{model_id}|{config.model.dtype}|{prompt.id}:{prompt.sha}|"
          f"N{config.generate.new_tokens}")
  if point is None:
    return f"{base}|dense"
  a = config.attention
  layers = ",".join(map(str, a.dense_layers))
  if not point.exact:  # the same string as before block grids for scalar settings
    layers += (f"|{point.selection}-P{point.block_size}-M{point.top_blocks}"
               f"-e{point.epsilon!r}{_block_options(config, point)}")
  return f"{base}|{a.implementation}|dl[{layers}]|{point.budget_key}"


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
  check_config(config)
  lm = load_language_model(config, load_model)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_id = config.model.path or config.model.name
  prompts = make_prompts(config, lm)
  new_tokens = config.generate.new_tokens
  points = grid(config, max(p.length for p in prompts) + new_tokens)
  store = ResultsStore(workdir / "results.jsonl")
  manifest_lib.write_manifest(workdir, config.to_dict(), {
      "model": model_id, "num_layers": int(lm.num_layers), "max_length": int(lm.max_length),
      "rows_already_done": len(store.rows)})

  plan = [(p, pt, _keys(config, model_id, p, pt)) for p in prompts for pt in points]
  for prompt, point, key in plan:  # a finished failing gate row still fails the run
    row = store.rows.get(key)
    if row is not None and config.gate and _fails_gate(row):
      raise GateFailure(_gate_message(row))
  pending = [item for item in plan if item[2] not in store]
  dense_pending = [p for p in prompts if _keys(config, model_id, p, None) not in store]
  computed = 0
  with tqdm(total=len(pending) + len(dense_pending), disable=not progress,
            desc=config.name, unit="row") as bar:
    for prompt in prompts:
      dense_key = _keys(config, model_id, prompt, None)
      todo = [(pt, key) for p, pt, key in pending if p is prompt]
      if not todo and dense_key in store:
        continue
      bar.set_postfix_str(f"{prompt.id} dense")
      ref = dense_reference(lm, prompt, new_tokens)
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
        # Does greedy decoding (KV cache) agree with the teacher-forced argmax?
        t = prompt.length
        tf_argmax = np.argmax(ref.logits[t - 1:t - 1 + new_tokens], axis=-1)
        store.append({"key": dense_key, "kind": "dense", **common,
                      "tokens": ref.generated.tolist(),
                      "text": lm.decode(ref.generated.tolist()),
                      "generate_matches_teacher_forced_argmax":
                          bool(np.array_equal(tf_argmax, ref.generated)),
                      "seconds": ref.seconds, "finished": _now()})
        computed += 1
        bar.update()
      for point, key in todo:
        bar.set_postfix_str(f"{prompt.id} {point.key}")
        row = condensate_row(lm, ref, point, config)
        spec = point_spec(point, config)
        row.update({"key": key, **common, "point_key": point.key,
                    "implementation": config.attention.implementation,
                    "selection": spec.selection, "block_rank": spec.block_rank,
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
                       dense_rows=[store.rows[_keys(config, model_id, p, None)]
                                   for p in prompts])
  if config.plots:
    report.plot_all(workdir, summary)
  return {"summary": summary, "table": table, "computed": computed,
          "skipped": len(plan) + len(prompts) - computed, "workdir": str(workdir)}
