"""`CondensateSpec`: which keys each query attends to (DESIGN.md §1).

The spec is a frozen, hashable dataclass so it can be a static argument of `jax.jit`.
Every field is validated at construction; bad values raise `ValueError` naming the field,
its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import numpy as np

SELECTIONS = ("exact", "bounded", "blocks", "certified", "indexed")
BLOCK_SELECTIONS = ("bounded", "blocks", "certified")   # can select from block summaries
BOUNDS = ("index", "blocks")
# the structure each selection mode ranks and bounds keys with (None: it scores every key);
# "certified" takes either (spec.bounds), the key index by default
_NATURAL_BOUNDS = {"exact": None, "bounded": "blocks", "blocks": "blocks",
                   "certified": "index", "indexed": "index"}
BLOCK_RANKS = ("bound", "centre")
INDEX_BITS = (2, 4, 8)


INT32_MAX = 2**31 - 1   # positions, counts and sizes are int32 inside the kernels


def _check_int(name: str, value, *, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or not (
      minimum <= value <= INT32_MAX):
    raise ValueError(
        f"CondensateSpec.{name}={value!r}: expected an int in [{minimum}, {INT32_MAX}].")


@dataclasses.dataclass(frozen=True)
class CondensateSpec:
  """The condensate set C_i = anchor ∪ window_i ∪ top-k_i of every query i.

  Attributes:
    anchor: number of first visible keys always attended (attention sinks).
    window: number of last visible keys always attended (includes the query itself).
    top_k: number of highest-scoring "middle" keys attended, per query head. Ties break
      toward the lower position.
    selection: how the top-k part is found. "exact" scores every visible key (the paper's
      set). "bounded", "blocks" and "certified" use block summaries (DESIGN.md §4).
      "indexed" ranks the middle keys by a per-key low-bit index (`selection.index`),
      scores the best `candidates` of them exactly and keeps the top_k of those; its
      certificate bounds every key it did not score from the index's error term.
    block_size: keys per block for the block-summary selection modes.
    top_blocks: blocks attended (besides anchor and window) in "blocks" mode.
    epsilon: certified dropped-mass target in "certified" mode.
    bounds: what "certified" mode bounds the keys it does not score with: "index" (the
      default: the per-key index of "indexed", `index_bits`; the set grows by single keys
      in bound order, DESIGN.md / `impl.xla_indexed`) or "blocks" (block summaries of
      `block_size` keys, grown by blocks). The other modes have one structure each
      ("indexed": "index"; "bounded", "blocks": "blocks"; "exact": None) and the field is
      set to it; giving another value raises.
    block_rank: how "blocks" mode ranks blocks: "bound" (the upper bound U_b, as
      specified) or "centre" (the score of the block's centre key (min + max) / 2, which
      a box straddling two clusters does not inflate); the certificate comes from the
      bounds of the blocks left out either way.
    query_blocks: "blocks" mode only. False: every query selects its own blocks. True: a
      multi-query call (a prefill chunk, queries at consecutive positions) selects per
      block of `block_size` query rows with the lists of the timed block-sparse prefill
      (`selection.prefill_lists`: the block's centre query ranked against key-block
      boxes, top `top_blocks`, plus anchor and window), so a model's parity is measured
      with the sets the prefill kernel computes. Single-query (decode) calls are
      unchanged. Each query's certificate still comes from its own bounds.
    dense_layers: layer indices a model keeps dense (the paper's "pillar" layers).
    index_bits: "indexed" mode: bits per key entry of the index (2, 4 or 8).
    candidates: "indexed" mode: middle keys scored exactly per query head (those with the
      highest index estimate); 0 (default) = 4 * top_k, at least 64.
    top_k_capacity: selection="exact" only. 0 (default): anchor, window and top_k are
      constants of the compiled program. C > 0: they are runtime values of it and C is
      its static top-k width (top_k <= C): specs equal but for anchor / window / top_k
      share one compiled program (`program_spec`), so a parity grid compiles once. The
      exact top-k is taken at width min(C, S) and cut at top_k: the same set as the
      static spec, hence bit for bit the same outputs and stats, for the cost of a
      width-C top-k (implementations "xla" / "xla_masked").
  """

  anchor: int = 1
  window: int = 64
  top_k: int = 32
  selection: str = "exact"
  block_size: int = 64
  top_blocks: int = 8
  epsilon: float = 2.0**-24
  dense_layers: tuple[int, ...] = ()
  block_rank: str = "bound"
  query_blocks: bool = False
  index_bits: int = 4
  candidates: int = 0
  bounds: Optional[str] = None
  top_k_capacity: int = 0

  def __post_init__(self):
    _check_int("anchor", self.anchor, minimum=0)
    _check_int("window", self.window, minimum=0)
    _check_int("top_k", self.top_k, minimum=0)
    if self.selection not in SELECTIONS:
      raise ValueError(
          f"CondensateSpec.selection={self.selection!r}: expected one of {SELECTIONS}.")
    _check_int("block_size", self.block_size, minimum=1)
    _check_int("top_blocks", self.top_blocks, minimum=0)
    if (isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float))
        or not math.isfinite(self.epsilon) or not 0.0 < self.epsilon < 1.0):
      raise ValueError(
          f"CondensateSpec.epsilon={self.epsilon!r}: expected a float in (0, 1).")
    if self.block_rank not in BLOCK_RANKS:
      raise ValueError(
          f"CondensateSpec.block_rank={self.block_rank!r}: expected one of {BLOCK_RANKS}.")
    if self.block_rank != "bound" and self.selection != "blocks":
      raise ValueError(
          f"CondensateSpec.block_rank={self.block_rank!r} with selection="
          f"{self.selection!r}: only selection='blocks' ranks by anything but the bound "
          "(the other modes' guarantees rest on bound order).")
    if not isinstance(self.query_blocks, bool):
      raise ValueError(
          f"CondensateSpec.query_blocks={self.query_blocks!r}: expected True or False.")
    if self.query_blocks and self.selection != "blocks":
      raise ValueError(
          f"CondensateSpec.query_blocks=True with selection={self.selection!r}: only "
          "selection='blocks' has per-query-block lists.")
    if isinstance(self.index_bits, bool) or self.index_bits not in INDEX_BITS:
      raise ValueError(
          f"CondensateSpec.index_bits={self.index_bits!r}: expected one of {INDEX_BITS}.")
    _check_int("candidates", self.candidates, minimum=0)
    natural = _NATURAL_BOUNDS[self.selection]
    if self.bounds is None:
      object.__setattr__(self, "bounds", natural)
    elif self.selection == "certified":
      if self.bounds not in BOUNDS:
        raise ValueError(f"CondensateSpec.bounds={self.bounds!r}: expected one of "
                         f"{BOUNDS} (or None: 'index') with selection='certified'.")
    elif self.bounds != natural:
      raise ValueError(
          f"CondensateSpec.bounds={self.bounds!r} with selection={self.selection!r}: "
          "expected " + ("None" if natural is None else f"None or {natural!r}") +
          " (only selection='certified' chooses its bounds).")
    try:
      layers = tuple(self.dense_layers)
    except TypeError:
      raise ValueError(
          f"CondensateSpec.dense_layers={self.dense_layers!r}: expected a tuple of "
          "non-negative ints.") from None
    for layer in layers:
      if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(
            f"CondensateSpec.dense_layers={self.dense_layers!r}: expected a tuple of "
            "non-negative ints.")
    object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))
    _check_int("top_k_capacity", self.top_k_capacity, minimum=0)
    if self.top_k_capacity and self.selection != "exact":
      raise ValueError(
          f"CondensateSpec.top_k_capacity={self.top_k_capacity} with selection="
          f"{self.selection!r}: runtime sizes serve selection='exact' only (expected 0).")
    if self.top_k_capacity and self.top_k > self.top_k_capacity:
      raise ValueError(
          f"CondensateSpec.top_k={self.top_k} with top_k_capacity={self.top_k_capacity}: "
          "expected top_k <= top_k_capacity (the compiled program's top-k width).")
    object.__setattr__(self, "epsilon", float(self.epsilon))

  @property
  def budget(self) -> int:
    """Upper bound on |C_i| in "exact" mode: anchor + window + top_k."""
    return self.anchor + self.window + self.top_k

  @property
  def uses_index(self) -> bool:
    """True when the selection reads the per-key index ("indexed"; "certified" with
    bounds="index")."""
    return self.bounds == "index"

  @property
  def uses_blocks(self) -> bool:
    """True when the selection reads block summaries ("bounded", "blocks"; "certified"
    with bounds="blocks")."""
    return self.bounds == "blocks"

  @property
  def num_candidates(self) -> int:
    """Middle keys "indexed" mode scores exactly per query head (`candidates`, or its
    default 4 * top_k, at least 64); never fewer than top_k."""
    return max(self.candidates or max(4 * self.top_k, 64), self.top_k)

  def covers(self, n_visible: int) -> bool:
    """True when a query with `n_visible` visible keys attends all of them."""
    return n_visible <= self.budget

  def for_layer(self, layer: int) -> Optional["CondensateSpec"]:
    """The spec a model uses in `layer`: None (dense) for a pillar layer."""
    return None if layer in self.dense_layers else self

  @property
  def program_spec(self) -> "CondensateSpec":
    """The spec a compiled program is keyed by: with top_k_capacity, anchor / window /
    top_k zeroed (they travel as `sizes`); else the spec itself."""
    if not self.top_k_capacity:
      return self
    return dataclasses.replace(self, anchor=0, window=0, top_k=0)

  @property
  def sizes(self) -> Optional["Sizes"]:
    """(anchor, window, top_k) as int32 scalars where top_k_capacity > 0 (the runtime
    values of `program_spec`'s program), else None."""
    if not self.top_k_capacity:
      return None
    return Sizes(*(np.int32(v) for v in (self.anchor, self.window, self.top_k)))

  def replace(self, **changes) -> "CondensateSpec":
    """A copy with `changes`; a new selection without `bounds` takes its own default."""
    if "selection" in changes and "bounds" not in changes:
      changes["bounds"] = None
    return dataclasses.replace(self, **changes)


class Sizes(NamedTuple):
  """The runtime anchor / window / top_k of a program compiled for a spec with
  top_k_capacity (int32 scalars or tracers); reads like a spec where only these three
  are read (`geometry.static_masks`, `selection.exact.select`)."""
  anchor: object
  window: object
  top_k: object


def check_spec(spec, name: str = "spec") -> CondensateSpec:
  if not isinstance(spec, CondensateSpec):
    raise ValueError(
        f"{name}={spec!r} (type {type(spec).__name__}): expected a "
        "condensate_jax.CondensateSpec.")
  return spec
