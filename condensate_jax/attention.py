"""Dense and condensate attention with one signature (DESIGN.md §1, §3).

Layout: q [B, T, Hq, D], k and v [B, S, Hkv, D], output [B, T, Hq, D] in q's dtype.
Scores, softmax and the weighted sum accumulate in float32.

`condensate_attention` is the one entry point of every selection mode and every
implementation; `IMPLEMENTATIONS` is the complete, static table of implementations
(module:function strings, imported on first use, so the optional Pallas modules load only
when asked for). Exactness contract: `dense_attention` and the masked condensate
implementation share one softmax (`softmax.masked_softmax`); when a query's set covers
every visible key the outputs are bitwise equal. `BITWISE_DENSE` names the
implementations that promise this; the others agree to float rounding.

Non-finite inputs (`finite.py`): a query that reads a NaN / Inf (its q row, the k or v
row of a key it can see, the summary of a block it can see) gets a NaN output and NaN
mass stats; every other query is unaffected (no 0 * NaN leak through masked positions);
nothing raises.
"""

from __future__ import annotations

import functools
import importlib
import types
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from condensate_jax import finite, validation
from condensate_jax.impl import xla_masked
from condensate_jax.selection import index as index_lib
from condensate_jax.selection import summaries as summaries_lib
from condensate_jax.spec import INT32_MAX, CondensateSpec, Sizes, check_spec

# implementation name -> "module:function" with the signature
#   fn(q, k, v, q_positions, kv_lengths, *, spec, causal, sliding_window, scale,
#      return_stats[, summaries])        (validated inputs; summaries: block modes only)
IMPLEMENTATIONS = types.MappingProxyType({
    "xla_masked": "condensate_jax.impl.xla_masked:condensate_masked",
    "xla_gathered": "condensate_jax.impl.xla_gathered:condensate_gathered",
    "pallas": "condensate_jax.impl.pallas_exact:condensate_pallas",
    "xla_blocks": "condensate_jax.impl.xla_blocks:condensate_xla_blocks",
    "pallas_blocks": "condensate_jax.impl.pallas_blocks:condensate_pallas_blocks",
    "xla_indexed": "condensate_jax.impl.xla_indexed:condensate_xla_indexed",
    "pallas_select": "condensate_jax.impl.pallas_select:condensate_pallas_select",
})
# "xla" picks the masked form: the gathered form materialises per-query K/V rows,
# T * budget * D per head, which exceeds K itself whenever T * budget > S, and both
# compute every score anyway for the exact top-k.
ALIASES = types.MappingProxyType({"xla": "xla_masked"})
# spec.selection != "exact": implementation -> block-selection implementation.
BLOCK_IMPLEMENTATIONS = types.MappingProxyType({
    "xla": "xla_blocks", "xla_blocks": "xla_blocks",
    "pallas": "pallas_blocks", "pallas_blocks": "pallas_blocks"})
# spec.selection == "indexed": implementation -> indexed implementation.
INDEXED_IMPLEMENTATIONS = types.MappingProxyType({"xla": "xla_indexed",
                                                  "xla_indexed": "xla_indexed",
                                                  "pallas_select": "pallas_select"})
# Implementations whose output is bitwise dense when the set covers every visible key
# (the experiments' exactness gate is bitwise for these, a float tolerance for others).
BITWISE_DENSE = frozenset({"xla", "xla_masked", "pallas_select"})
# Implementations added by outside code (`register_implementation`), exact specs only.
REGISTERED: dict[str, Callable] = {}
# Implementations that hold [B, Hq, T, S] scores (and, for a top-k, a sort of every row)
# and choose each query's set from its own scores: a call runs them over chunks of
# queries (`query_chunk`), so a long prompt's teacher-forced pass fits in memory. Every
# query's operations are those of the unchunked call, on a slice of the inputs.
CHUNKED = frozenset({"xla_masked", "xla_gathered", "xla_blocks", "xla_indexed",
                     "pallas_select"})
# query_chunk=None: the largest chunk whose scores have at most this many elements
# (B * Hq * chunk * S; float32: 1 GiB per buffer). A call within it runs unchunked. Read
# when a program is traced: programs compiled before a change keep their chunks.
QUERY_CHUNK_ELEMENTS = 2**28


def register_implementation(name: str, fn: Callable) -> None:
  """Adds an outside implementation selectable with `implementation=name` (the contract
  of `impl.xla_masked.condensate_masked`); the built-in names cannot be replaced."""
  if not isinstance(name, str) or name in IMPLEMENTATIONS or name in ALIASES:
    raise ValueError(f"name={name!r}: expected a str that is not a built-in "
                     f"implementation ({sorted(IMPLEMENTATIONS)}, {sorted(ALIASES)}).")
  REGISTERED[name] = fn


def implementation_names() -> list[str]:
  return sorted(set(IMPLEMENTATIONS) | set(ALIASES) | set(REGISTERED))


@functools.cache
def _load(target: str) -> Callable:
  module, _, fn = target.partition(":")
  return getattr(importlib.import_module(module), fn)


def resolve_implementation(implementation, spec: CondensateSpec) -> Callable:
  """The function `implementation=` names for this spec; bad names -> ValueError."""
  return _resolve(implementation, spec)[1]


def _resolve(implementation, spec: CondensateSpec) -> tuple[str, Callable]:
  """(resolved name, function) of `implementation=` for this spec."""
  if not isinstance(implementation, str):
    raise ValueError(f"implementation={implementation!r}: expected a str, one of "
                     f"{implementation_names()}.")
  name = ALIASES.get(implementation, implementation)
  if spec.uses_index:
    if implementation not in INDEXED_IMPLEMENTATIONS:
      raise ValueError(
          f"implementation={implementation!r} with spec.selection={spec.selection!r} "
          f"(bounds={spec.bounds!r}): expected one of {sorted(INDEXED_IMPLEMENTATIONS)} "
          "(the model-level Pallas kernels of the index are not written yet; the timed "
          "decode step is condensate_jax.fast.indexed_decode_step).")
    name = INDEXED_IMPLEMENTATIONS[implementation]
    if name == "pallas_select" and spec.selection != "indexed":
      raise ValueError(f"implementation={implementation!r} with spec.selection="
                       f"{spec.selection!r}: 'pallas_select' implements selection='exact' "
                       "and 'indexed' ('certified' orders every bound: use 'xla').")
  elif spec.selection != "exact":
    # Block-summary selection modes (DESIGN.md §4).
    if implementation not in BLOCK_IMPLEMENTATIONS:
      raise ValueError(
          f"implementation={implementation!r} with spec.selection={spec.selection!r}: "
          f"expected one of {sorted(BLOCK_IMPLEMENTATIONS)} (the masked and gathered XLA "
          "forms implement selection='exact' only).")
    name = BLOCK_IMPLEMENTATIONS[implementation]
  elif name in ("xla_blocks", "pallas_blocks"):
    validation.check_block_spec(spec)      # raises: these need a block-selection spec
  elif spec.top_k_capacity and name != "xla_masked":
    raise ValueError(f"implementation={implementation!r} with spec.top_k_capacity="
                     f"{spec.top_k_capacity}: runtime sizes are implemented by 'xla' / "
                     "'xla_masked' only (use top_k_capacity=0 with the others).")
  elif name == "xla_indexed":
    raise ValueError(f"implementation={implementation!r}: needs a spec that reads the key "
                     f"index (selection='indexed', or 'certified' with bounds='index'), "
                     f"got selection={spec.selection!r}.")
  if name in REGISTERED:
    return name, REGISTERED[name]
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}: expected one of "
                     f"{implementation_names()}.")
  try:
    return name, _load(IMPLEMENTATIONS[name])
  except ImportError as err:   # the Pallas implementations need jax.experimental.pallas
    raise ValueError(f"implementation={implementation!r}: {IMPLEMENTATIONS[name]} did not "
                     f"import ({type(err).__name__}: {err}); 'xla' needs no Pallas.") from err


def dense_attention(q, k, v, *, causal: bool = True, q_positions=None, kv_lengths=None,
                    sliding_window: Optional[int] = None,
                    scale: Optional[float] = None,
                    query_chunk: Optional[int] = None) -> jax.Array:
  """Softmax attention over every visible key.

  Args:
    q: [B, T, Hq, D] queries. k, v: [B, S, Hkv, D]; Hq a multiple of Hkv.
    causal: queries see keys at positions <= their own.
    q_positions: [B, T] int positions of the queries in [0, S); default: the last T
      positions before each row's kv_length.
    kv_lengths: [B] valid keys per row (a padded cache); default S.
    sliding_window: the model's own local-attention limit w: keys j > pos - w.
    scale: score scale; default 1/sqrt(D).
    query_chunk: queries per chunk (int >= 1); None: the largest chunk within
      `QUERY_CHUNK_ELEMENTS` scores (a call within it is one chunk). Chunking changes no
      query's operations: the dense [B, Hq, T, S] scores are held a chunk at a time.
  Returns:
    [B, T, Hq, D] in q's dtype. Queries with no visible key get 0.
  """
  kv_lengths, q_positions, scale = validation.prepare(
      q, k, v, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  chunk = query_chunk_size(query_chunk, q, k)
  window = validation.static_window(sliding_window, k.shape[1])
  bad = finite.reads_nonfinite(q, k, v, q_positions, kv_lengths, causal=bool(causal),
                               sliding_window=window)
  k, v = finite.sanitize(k), finite.sanitize(v)
  out = over_query_chunks(
      lambda qc, pc: xla_masked.dense(qc, k, v, pc, kv_lengths, causal=bool(causal),
                                      sliding_window=window, scale=scale),
      finite.sanitize(q), q_positions, chunk, return_stats=False)
  return finite.poison(out, bad)


def query_chunk_size(query_chunk, q, k) -> int:
  """Queries per chunk of a call (module constants `CHUNKED`, `QUERY_CHUNK_ELEMENTS`):
  `query_chunk` checked, or the budget's; never more than T."""
  b, t, hq, _ = q.shape
  if query_chunk is None:
    chunk = max(1, QUERY_CHUNK_ELEMENTS // max(1, b * hq * k.shape[1]))
  elif (isinstance(query_chunk, bool) or not isinstance(query_chunk, (int, np.integer))
        or not 1 <= query_chunk <= INT32_MAX):
    raise ValueError(f"query_chunk={query_chunk!r}: expected None (the "
                     f"QUERY_CHUNK_ELEMENTS budget) or an int in [1, {INT32_MAX}].")
  else:
    chunk = int(query_chunk)
  return max(1, min(chunk, t))


def over_query_chunks(call: Callable, q, q_positions, chunk: int, *, return_stats: bool):
  """call(q [B, c, Hq, D], q_positions [B, c]) -> out [B, c, Hq, D] (or (out, stats
  [B, Hq, c] each)) over the queries `chunk` at a time: a `lax.map` over the whole
  chunks, then one call for the rest, joined along T. The rest is never a single query
  (a one-query call is a decode step to the block modes): it joins the last chunk."""
  b, t = q.shape[:2]
  n, rest = divmod(t, chunk)
  if rest == 1 and chunk > 1:
    n, rest = n - 1, chunk + 1
  if n == 0 or (n == 1 and rest == 0):
    return call(q, q_positions)
  m = n * chunk
  qs = q[:, :m].reshape(b, n, chunk, *q.shape[2:]).swapaxes(0, 1)
  ps = q_positions[:, :m].reshape(b, n, chunk).swapaxes(0, 1)
  # not checkpointed: jax.checkpoint changed XLA's fusion of the chunk (dense and a
  # covering spec then differed in bits). A backward pass keeps every chunk's residuals:
  # chunking saves memory in forward passes (inference, parity), not in training.
  mapped = jax.lax.map(lambda a: call(*a), (qs, ps))
  outs = [(mapped[0] if return_stats else mapped).swapaxes(0, 1).reshape(
      b, m, *q.shape[2:])]
  # stats fields [n, B, Hq, chunk] -> [B, Hq, n * chunk]
  fields = ([jnp.moveaxis(f, 0, 2).reshape(*f.shape[1:3], m) for f in mapped[1]]
            if return_stats else [])
  if rest:
    tail = call(q[:, m:], q_positions[:, m:])
    outs.append(tail[0] if return_stats else tail)
    fields = [jnp.concatenate([f, g], axis=-1) for f, g in
              zip(fields, tail[1] if return_stats else [])]
  out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
  return (out, type(mapped[1])(*fields)) if return_stats else out


def condensate_attention(q, k, v, spec: CondensateSpec, *, causal: bool = True,
                         q_positions=None, kv_lengths=None,
                         sliding_window: Optional[int] = None,
                         scale: Optional[float] = None, implementation: str = "xla",
                         return_stats: bool = False, summaries=None, index=None,
                         sizes=None, query_chunk: Optional[int] = None):
  """Attention restricted to each query's condensate set (DESIGN.md §1).

  Same arguments as `dense_attention`, plus:
    spec: a `CondensateSpec` (static under jit).
    implementation: "xla" (= "xla_masked" for selection="exact", "xla_blocks" for the
      block modes, "xla_indexed" for the index modes), "xla_masked", "xla_gathered",
      "pallas" (= "pallas_blocks" for the block modes), "xla_blocks", "pallas_blocks",
      "pallas_select" ("exact", "indexed": "xla" with the top-k selections on the Pallas
      kernel, bitwise "xla"'s), or a name added with `register_implementation`.
    return_stats: also return an `AttentionStats` of [B, Hq, T] arrays.
    summaries: block modes only: precomputed `BlockSummaries` of k at spec.block_size
      (what a KV cache keeps); None builds them from k inside the call.
    index: specs with bounds="index" only ("indexed", "certified" by default): a
      precomputed `KeyIndex` of k at spec.index_bits
      (what a KV cache keeps); None builds it from k inside the call.
    sizes: specs with top_k_capacity only: the runtime `spec.Sizes` (anchor, window,
      top_k; int32 scalars, traced under jit) of `spec`, then its `program_spec`
      (anchor = window = top_k = 0); None takes them from spec itself. A program spec
      plus sizes is what a model's compiled program receives (`LanguageModel`), so one
      program serves every size.
    query_chunk: as in `dense_attention`; implementations in `CHUNKED` only (the Pallas
      kernels hold no [T, S] scores and run whole), and not for query_blocks specs.
  """
  check_spec(spec)
  name, fn = _resolve(implementation, spec)
  spec, kwargs = _split_sizes(spec, sizes)
  return_stats = validation.check_bool("return_stats", return_stats)
  kv_lengths, q_positions, scale = validation.prepare(
      q, k, v, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  summary_arrays = None
  if summaries is not None:
    if not spec.uses_blocks:
      raise ValueError(f"summaries: given with spec.selection={spec.selection!r} "
                       f"(bounds={spec.bounds!r}); block summaries serve the modes that "
                       "read them: 'bounded', 'blocks', 'certified' with bounds='blocks'.")
    summaries_lib.check_summaries(summaries, k, spec)
    summary_arrays = (summaries.kmin, summaries.kmax, summaries.block_size)
    kwargs["summaries"] = summaries_lib.BlockSummaries(
        *finite.sanitize_summaries(summaries.kmin, summaries.kmax), summaries.block_size)
  extra_bad = None
  if index is not None:
    if not spec.uses_index:
      raise ValueError(f"index: given with spec.selection={spec.selection!r} "
                       f"(bounds={spec.bounds!r}); a key index serves selection='indexed' "
                       "and 'certified' with bounds='index'.")
    index_lib.check_index(index, k, spec)
    extra_bad, kwargs["index"] = finite.sanitize_index(index)
  window = validation.static_window(sliding_window, k.shape[1])
  bad = finite.reads_nonfinite(q, k, v, q_positions, kv_lengths, causal=bool(causal),
                               sliding_window=window, summaries=summary_arrays,
                               bad_keys=extra_bad)
  k, v = finite.sanitize(k), finite.sanitize(v)
  chunk = query_chunk_size(query_chunk, q, k)
  if name not in CHUNKED or spec.query_blocks:
    # query_blocks lists are built per block of the call's rows at positions q_positions
    # [:, 0] + row: a chunk would move that origin (and split blocks); they run whole
    chunk = q.shape[1]
  elif chunk < q.shape[1]:    # build the structure once, not once per chunk
    if spec.uses_index and "index" not in kwargs:
      kwargs["index"] = index_lib.build(k, kv_lengths, spec.index_bits)
    if spec.uses_blocks and "summaries" not in kwargs:
      kwargs["summaries"] = summaries_lib.build(k, kv_lengths, spec.block_size)
  result = over_query_chunks(
      lambda qc, pc: fn(qc, k, v, pc, kv_lengths, spec=spec, causal=bool(causal),
                        sliding_window=window, scale=scale, return_stats=return_stats,
                        **kwargs),
      finite.sanitize(q), q_positions, chunk, return_stats=return_stats)
  return finite.poison_result(result, bad, return_stats)


def _split_sizes(spec: CondensateSpec, sizes):
  """(program spec, {"sizes": int32 Sizes}) for a spec with top_k_capacity, else (spec,
  {}); sizes given with another spec, or beside a spec that still holds sizes, raise."""
  if not spec.top_k_capacity:
    if sizes is not None:
      raise ValueError(f"sizes={sizes!r}: given with spec.top_k_capacity=0; runtime sizes "
                       "serve specs with top_k_capacity > 0 (their program_spec).")
    return spec, {}
  if sizes is None:
    return spec.program_spec, {"sizes": spec.sizes}
  if spec != spec.program_spec:
    raise ValueError(f"sizes given with spec.anchor={spec.anchor}, window={spec.window}, "
                     f"top_k={spec.top_k}: expected spec.program_spec (those three 0) "
                     "beside its runtime sizes, or no sizes.")
  try:
    raw = tuple(sizes)
    arrays = [x if isinstance(x, jax.Array) else np.asarray(x) for x in raw]
    ok = len(raw) == 3 and all(
        a.shape == () and jnp.issubdtype(a.dtype, jnp.integer) for a in arrays)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"sizes={sizes!r}: expected spec.Sizes(anchor, window, top_k): three "
                     "int scalars (not bools or floats).")
  # concrete sizes are checked; traced ones are the caller's (LanguageModel passes a
  # validated spec's): a top_k beyond the capacity would under-count the dropped keys
  if all(validation.is_concrete(a) for a in arrays):
    host = [int(a) for a in arrays]
    if (min(host) < 0 or max(host) > INT32_MAX or host[2] > spec.top_k_capacity):
      raise ValueError(f"sizes={tuple(host)!r}: expected anchor, window in [0, {INT32_MAX}] "
                       f"and top_k in [0, {spec.top_k_capacity}] (spec.top_k_capacity).")
  return spec, {"sizes": Sizes(*(jnp.asarray(a, jnp.int32) for a in arrays))}


def condensate_mask(q, k, spec: CondensateSpec, *, causal: bool = True, q_positions=None,
                    kv_lengths=None, sliding_window: Optional[int] = None,
                    scale: Optional[float] = None) -> jax.Array:
  """The condensate set as a [B, Hq, T, S] bool mask (selection="exact"), for analysis
  and plots. Same arguments and validation as `condensate_attention`."""
  check_spec(spec)
  if spec.selection != "exact":
    raise ValueError(f"spec.selection={spec.selection!r}: condensate_mask supports "
                     "selection='exact' only.")
  kv_lengths, q_positions, scale = validation.prepare(
      q, k, k, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  return xla_masked.mask(q, k, q_positions, kv_lengths, spec=spec, causal=bool(causal),
                         sliding_window=validation.static_window(sliding_window,
                                                                 k.shape[1]),
                         scale=scale)


def attend(q, k, v, attention: Optional[CondensateSpec], **kwargs) -> jax.Array:
  """What a model layer calls: dense when `attention` is None, else condensate."""
  if attention is None:
    for name in ("implementation", "return_stats", "summaries"):
      kwargs.pop(name, None)
    return dense_attention(q, k, v, **kwargs)
  return condensate_attention(q, k, v, attention, **kwargs)
