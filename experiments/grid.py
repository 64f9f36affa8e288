"""The grid algebra of the parity job: its points, their specs and their results keys.

A parity config sweeps anchor x window x `selection_variants` (top_k for exact selection;
block-selection settings as extra axes when any of attention.selection / block_size /
top_blocks / epsilon is a tuple), plus the covers-everything point of the exactness gate
(`grid`). `point_spec` is the CondensateSpec of a point, `keys` the results.jsonl key of a
(prompt, point) row (resume matches rows by it), `check_config` validates a parity config.
Pure functions of the config: no model, no attention call (experiments/parity.py runs them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

import condensate_jax as cj
from experiments.errors import ConfigError

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
  bounds: Optional[str] = None   # "certified": "index" or "blocks" (None: the spec's default)

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
    if self.selection == "indexed":   # its index settings are the grid's (scalars)
      return f"{self.budget_key}-indexed"
    if self.selection == "certified" and self.bounds != "blocks":
      return f"{self.budget_key}-certified-index-e{self.epsilon:g}"
    extra = {"bounded": "", "blocks": f"-M{self.top_blocks}",
             "certified": f"-e{self.epsilon:g}"}[self.selection]
    return f"{self.budget_key}-{self.selection}-P{self.block_size}{extra}"

  def spec(self, dense_layers=()) -> cj.CondensateSpec:
    spec = cj.CondensateSpec(anchor=self.anchor, window=self.window, top_k=self.top_k,
                             dense_layers=tuple(dense_layers))
    if self.exact:
      return spec
    return spec.replace(selection=self.selection, block_size=self.block_size,
                        top_blocks=self.top_blocks, epsilon=self.epsilon,
                        bounds=self.bounds if self.selection == "certified" else None)


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
  if a.get("bounds", "index") not in cj.spec.BOUNDS:
    raise ConfigError(f"config.attention.bounds={a.get('bounds')!r}: expected one of "
                      f"{cj.spec.BOUNDS} (what selection='certified' bounds keys with).")
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
    "indexed":   top_k (attention.index_bits and attention.candidates are scalars);
    "bounded":   top_k x block_size;
    "blocks":    block_size x top_blocks, with top_k = top_blocks * block_size (the
                 number of middle keys it reads, so its budget is comparable with the
                 exact point of the same top_k);
    "certified": with attention.bounds = "index" (default): epsilon, with top_k = 0 (its
                 set size varies per query and is reported as set_size); with
                 bounds = "blocks": block_size x epsilon, top_k = 0 and top_blocks = the
                 first value (in the Pallas kernel it only sets the read round, not the
                 set).
  """
  a = config.attention
  top_ks = _tuple(a.top_k)
  bounds = a.get("bounds", "index")
  if not is_block_grid(config):
    base = dict(selection=a.get("selection", "exact"), block_size=a.block_size,
                top_blocks=a.top_blocks, epsilon=a.epsilon)
    if base["selection"] == "certified":
      base["bounds"] = bounds
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
    elif selection == "indexed":
      out += [dict(first, top_k=k, selection=selection) for k in top_ks]
    elif bounds == "index":
      out += [dict(first, top_k=0, selection=selection, epsilon=e, bounds=bounds)
              for e in epsilons]
    else:
      out += [dict(first, top_k=0, selection=selection, block_size=p, epsilon=e,
                   bounds=bounds) for p in sizes for e in epsilons]
  return out


def check_config(config) -> None:
  """Raises ConfigError naming the first invalid key."""
  _int_tuple(config.attention.top_k, "attention.top_k", 0)
  _int_tuple(config.attention.window, "attention.window", 0)
  _int_tuple(config.attention.anchor, "attention.anchor", 0)
  _check_block_axes(config)
  specs = [point_spec(GridPoint(0, 0, **variant), config)  # every spec of the grid
           for variant in selection_variants(config)]
  specs.append(point_spec(GridPoint(0, 0, 0, covering=True), config))
  for spec in specs:   # the implementation serves every point (before any row runs)
    try:
      cj.attention.resolve_implementation(config.attention.implementation, spec)
    except ValueError as err:
      raise ConfigError(f"config.attention.implementation: {err}") from None
  if mesh_axes(config):
    if config.attention.implementation not in ("xla", "xla_masked"):
      raise ConfigError(f"config.attention.implementation="
                        f"{config.attention.implementation!r} with config.attention.mesh="
                        f"{config.attention.mesh!r}: the mesh call is the XLA one; expected "
                        "'xla' (or no mesh).")
    placement = model_implementation(config)
    for spec in specs:
      try:
        cj.distributed.check_placement(placement, spec)
      except ValueError as err:
        raise ConfigError(f"config.attention.mesh={config.attention.mesh!r}: {err}") from None
  if tuple(config.attention.dense_layers):
    _int_tuple(config.attention.dense_layers, "attention.dense_layers", 0)
  _int_tuple(config.prompts.lengths, "prompts.lengths", 1)
  n = config.generate.new_tokens
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ConfigError(f"config.generate.new_tokens={n!r}: expected an int >= 1.")
  g = config.generate
  temperature, top_p, seed = (g.get("temperature", 0.0), g.get("top_p", 1.0),
                              g.get("seed", 0))
  if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
      or not 0 <= temperature < float("inf")):
    raise ConfigError(f"config.generate.temperature={temperature!r}: expected a float "
                      ">= 0 (0: greedy).")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
    raise ConfigError(f"config.generate.top_p={top_p!r}: expected a float in (0, 1].")
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    raise ConfigError(f"config.generate.seed={seed!r}: expected an int in [0, 2**32).")
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


def point_spec(point: GridPoint, config) -> cj.CondensateSpec:
  """The spec of a grid point; the covers-everything point always uses exact selection
  (it is the exactness gate of the implementation)."""
  a = config.attention
  try:
    spec = point.spec(a.dense_layers)
    if spec.selection == "blocks":
      spec = spec.replace(block_rank=a.get("block_rank", "bound"),
                          query_blocks=a.get("query_blocks", False))
    if spec.uses_index:
      spec = spec.replace(index_bits=a.get("index_bits", 4),
                          candidates=a.get("candidates", 0))
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


def decoding(config) -> dict:
  """The lm.generate sampling arguments of a config: {} for greedy (temperature 0)."""
  g = config.generate
  temperature = float(g.get("temperature", 0.0))
  if temperature == 0:
    return {}
  return {"temperature": temperature, "top_p": float(g.get("top_p", 1.0)),
          "seed": int(g.get("seed", 0))}


def keys(config, model_id: str, prompt, point: Optional[GridPoint]) -> str:
  """The results.jsonl key of a prompt's row at `point` (None: its dense row)."""
  base = (f"{model_id}|{config.model.dtype}|{prompt.id}:{prompt.sha}|"
          f"N{config.generate.new_tokens}")
  sampling = decoding(config)
  if sampling:   # greedy keys stay as they were
    base += (f"|T{sampling['temperature']!r}-p{sampling['top_p']!r}"
             f"-s{sampling['seed']}")
  if point is None:
    return f"{base}|dense"
  a = config.attention
  layers = ",".join(map(str, a.dense_layers))
  if not point.exact and point.selection == "indexed":
    spec = point_spec(point, config)
    layers += f"|indexed-b{spec.index_bits}-c{spec.num_candidates}"
  elif not point.exact and point_spec(point, config).uses_index:   # "certified"
    spec = point_spec(point, config)
    layers += f"|certified-index-b{spec.index_bits}-e{point.epsilon!r}"
  elif not point.exact:  # the same string as before block grids for scalar settings
    layers += (f"|{point.selection}-P{point.block_size}-M{point.top_blocks}"
               f"-e{point.epsilon!r}{_block_options(config, point)}")
  return f"{base}|{implementation_label(config)}|dl[{layers}]|{point.budget_key}"


MESH_AXES = ("seq", "heads")


def mesh_axes(config) -> dict[str, int]:
  """config.attention.mesh ("" or e.g. "seq=4,heads=2") as {axis: size}; ConfigError
  for anything else."""
  text = str(config.attention.get("mesh", "") or "").strip()
  if not text:
    return {}
  axes = {}
  for part in text.split(","):
    name, sep, size = part.strip().partition("=")
    if (not sep or name not in MESH_AXES or name in axes or not size.isdigit()
        or int(size) < 1):
      raise ConfigError(f"config.attention.mesh={text!r}: expected comma-separated "
                        f"axis=size with axes from {MESH_AXES} (each once, size >= 1), "
                        "e.g. 'seq=4,heads=2', or '' for one device.")
    axes[name] = int(size)
  return axes


def model_implementation(config, dense: bool = False):
  """What the runner passes as the models' `implementation=`: config.attention.
  implementation, or with config.attention.mesh a `cj.distributed.Placement` over the
  first seq * heads devices (the dense reference then runs over the same mesh)."""
  axes = mesh_axes(config)
  if not axes:
    return "xla" if dense else config.attention.implementation
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  n = int(np.prod(list(axes.values())))
  devices = jax.devices()
  if n > len(devices):
    raise ConfigError(f"config.attention.mesh={config.attention.mesh!r}: {n} devices "
                      f"asked, {len(devices)} present.")
  mesh = Mesh(np.array(devices[:n]).reshape(tuple(axes.values())), tuple(axes))
  return cj.distributed.Placement(mesh, seq_axis="seq" if "seq" in axes else None,
                                  head_axis="heads" if "heads" in axes else None)


def implementation_label(config) -> str:
  """The implementation as rows and keys name it: config.attention.implementation, with
  "@mesh(seq=4,heads=2)" where the run is distributed."""
  axes = mesh_axes(config)
  name = config.attention.implementation
  if not axes:
    return name
  return f"{name}@mesh(" + ",".join(f"{k}={v}" for k, v in axes.items()) + ")"
