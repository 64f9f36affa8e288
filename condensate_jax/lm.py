"""`LanguageModel`: a model family instance + tokenizer behind one small API (DESIGN.md §3).

  lm.logits(tokens [B,T], attention=None | CondensateSpec) -> [B,T,V] float32
  lm.logits(..., return_stats=True) -> (logits, AttentionStats of [L,B,Hq,T] arrays)
  lm.hidden(tokens, ...) -> final hidden states [B,T,D]; lm.head(h) -> their logits;
  lm.hidden_parity(h_dense, h_cond) -> metrics.logit_parity's dict, chunked on device
  lm.generate(tokens [B,T], max_new_tokens, attention=None, *, prompt_lengths=None,
              eos_id=None, temperature=0.0, top_p=1.0, seed=0) -> [B,N] int32
  lm.init_cache(batch, max_len) / lm.step(tokens, cache) -> (logits, cache): manual decode
  lm.prefill(tokens, cache, ..., prompt_lengths=None) -> (last-position logits [B,V], cache)
  implementation="fast" (generate, prefill, step): the timed kernels (`models.fast_path`)

A spec with `top_k_capacity` runs one compiled program for every anchor / window /
top_k (they are passed as runtime values; the same outputs as the static spec).

Dense layers report captured_mass=1, dropped_mass=0, dropped_mass_bound=0 and
set_size = visible = keys_scored = number of visible keys.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from condensate_jax import attention as attention_lib
from condensate_jax import generate as gen
from condensate_jax import distributed, metrics, validation
from condensate_jax.models import fast_path, layers
from condensate_jax.models.kv_cache import KVCache
from condensate_jax.spec import CondensateSpec


def _check_attention(attention, implementation, num_layers: int, fast: bool = False,
                     kv_heads: Optional[int] = None):
  """attention: None or a CondensateSpec whose dense_layers exist in the model;
  implementation: a name `condensate_attention` takes for it (checked also when the run
  is dense, so a typo never passes silently), or "fast" where `fast` (generate, step:
  `models.fast_path`). Returns attention."""
  if attention is not None and not isinstance(attention, CondensateSpec):
    raise ValueError(f"attention={attention!r}: expected None (dense) or a "
                     "condensate_jax.CondensateSpec.")
  placed = isinstance(implementation, distributed.Placement)
  if placed:
    distributed.check_placement(implementation, attention, kv_heads)
  elif implementation == fast_path.NAME:
    if not fast:
      raise ValueError("implementation='fast': the timed kernels serve cached decoding "
                       "(lm.generate, lm.step); teacher-forced calls take one of "
                       f"{attention_lib.implementation_names()}.")
    fast_path.check_fast(attention)
  elif attention is None:
    if not isinstance(implementation, str) or (
        implementation not in attention_lib.implementation_names()):
      names = attention_lib.implementation_names() + ([fast_path.NAME] if fast else [])
      raise ValueError(f"implementation={implementation!r}: expected one of {names}.")
    return None
  if attention is None:
    return None
  beyond = [i for i in attention.dense_layers if i >= num_layers]
  if beyond:
    raise ValueError(f"attention.dense_layers={attention.dense_layers!r}: layers {beyond} "
                     f"do not exist; expected indices in [0, {num_layers - 1}] "
                     f"(the model has {num_layers} layers).")
  if implementation != fast_path.NAME and not placed:
    attention_lib.resolve_implementation(implementation, attention)
  return attention


def _program(attention):
  """(the static spec a compiled program is keyed by, its runtime sizes or None): a
  spec with top_k_capacity compiles once for every anchor / window / top_k."""
  if attention is None:
    return None, None
  return attention.program_spec, attention.sizes


def _check_count(name, value, lo, hi=None):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (
      hi is not None and value > hi):
    allowed = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"
    raise ValueError(f"{name}={value!r}: expected {allowed}.")
  return int(value)


def _check_lengths(prompt_lengths, batch: int, width: int):
  """prompt_lengths: None (every row is `width` long) or [batch] ints in [1, width]."""
  if prompt_lengths is None:
    return jnp.full((batch,), width, jnp.int32)
  arr = np.asarray(prompt_lengths)
  if (arr.shape != (batch,) or not np.issubdtype(arr.dtype, np.integer)
      or arr.min() < 1 or arr.max() > width):
    raise ValueError(f"prompt_lengths={np.asarray(prompt_lengths).tolist()!r}: expected "
                     f"{batch} ints (one per row of tokens) in [1, {width}] (the tokens' "
                     "width).")
  return jnp.asarray(arr, jnp.int32)


def _check_float(name, value, lo, hi, allowed: str, open_lo: bool = False) -> float:
  ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.floating,
                                                           np.integer)))
  if ok:
    v = float(value)
    ok = np.isfinite(v) and (v > lo if open_lo else v >= lo) and (hi is None or v <= hi)
  if not ok:
    raise ValueError(f"{name}={value!r}: expected {allowed}.")
  return float(value)


def _row_keys(seed, batch: int):
  """The PRNG key of every row: fold_in(key(seed), b) for an int, key(seed[b]) for one
  int per row (seeds in [0, 2**32))."""
  arr = np.asarray(seed) if not isinstance(seed, bool) else np.asarray(0.5)
  if (not np.issubdtype(arr.dtype, np.integer) or arr.shape not in ((), (batch,))
      or (arr.size and (arr.min() < 0 or arr.max() >= 2**32))):
    raise ValueError(f"seed={seed!r}: expected an int in [0, 2**32) or {batch} such ints "
                     "(one per row).")
  if arr.ndim == 0:
    base = jax.random.key(np.uint32(arr))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))
  return jax.vmap(jax.random.key)(jnp.asarray(arr.astype(np.uint32)))


class LanguageModel:
  """A causal LM held functionally: (graphdef, state) split once from an NNX model."""

  def __init__(self, model: nnx.Module, config, tokenizer, *, dtype="float32",
               name: Optional[str] = None):
    self.config = config
    self.tokenizer = tokenizer
    self.dtype = layers.check_dtype(dtype)
    self.name = name
    self.graphdef, self.state = nnx.split(model)

  # ----------------------------------------------------------------- properties
  @property
  def max_length(self) -> int:
    """The context length (positions beyond it are refused)."""
    return self.config.max_length

  @property
  def num_layers(self) -> int:
    return self.config.num_layers

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  def __repr__(self):
    return (f"LanguageModel({self.name or type(self.config).__name__}, "
            f"layers={self.num_layers}, dtype={self.dtype.name})")

  # ----------------------------------------------------------------- tokenizer
  def _need_tokenizer(self, what: str):
    if self.tokenizer is None:
      raise ValueError(f"{what}: {self.name or 'this model'} was loaded without a "
                       "tokenizer (its directory has no tokenizer.json and no vocab.json "
                       "+ merges.txt); pass token ids to logits / generate / step, or "
                       "add the tokenizer files.")

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with the tokenizer's own special tokens (e.g. a BOS)."""
    self._need_tokenizer("encode")
    if not isinstance(text, str):
      raise ValueError(f"text of type {type(text).__name__}: expected a str.")
    return list(self.tokenizer.encode(text).ids)

  def decode(self, ids) -> str:
    self._need_tokenizer("decode")
    arr = np.asarray(ids)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0
                     or arr.max() >= self.vocab_size):
      raise ValueError(f"ids: expected integer token ids in [0, {self.vocab_size - 1}], got "
                       f"dtype {arr.dtype} with values in [{arr.min()}, {arr.max()}].")
    return self.tokenizer.decode([int(i) for i in arr.reshape(-1)],
                                 skip_special_tokens=False)

  # ----------------------------------------------------------------- compute
  def _tokens(self, tokens, extra: int = 0, name: str = "tokens"):
    if hasattr(tokens, "dtype"):
      arr = tokens
    else:
      try:
        arr = np.asarray(tokens)
      except (ValueError, TypeError):   # ragged rows
        lengths = [len(row) if hasattr(row, "__len__") else None for row in tokens]
        raise ValueError(f"{name}: rows of lengths {lengths[:8]}"
                         f"{'...' if len(lengths) > 8 else ''}: expected a rectangular "
                         "[B, T] batch of ids (pad the rows to one length, or run them "
                         "one at a time).") from None
      if arr.dtype == object:
        raise ValueError(f"{name}: expected a rectangular [B, T] batch of integer ids, "
                         f"got {type(tokens).__name__} of mixed rows.")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
      raise ValueError(f"{name}.shape={tuple(arr.shape)}: expected [B, T] with B, T >= 1.")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
      raise ValueError(f"{name}.dtype={arr.dtype}: expected an integer dtype.")
    if arr.shape[1] + extra > self.max_length:
      raise ValueError(f"{name} length {arr.shape[1]} (+ {extra} new) exceeds the "
                       f"model's max_length={self.max_length}.")
    host = np.asarray(arr)
    if host.min() < 0 or host.max() >= self.vocab_size:
      raise ValueError(f"{name} has ids in [{host.min()}, {host.max()}]: expected ids in "
                       f"[0, {self.vocab_size - 1}].")
    return jnp.asarray(host, jnp.int32)

  def logits(self, tokens, attention: Optional[CondensateSpec] = None,
             implementation: str = "xla", return_stats: bool = False):
    """Teacher-forced logits [B,T,V] float32; optionally the stacked AttentionStats."""
    tokens = self._tokens(tokens)
    program, sizes = _program(_check_attention(attention, implementation, self.num_layers,
                                               kv_heads=self.config.num_kv_heads))
    return gen.forward(self.graphdef, self.state, tokens, sizes, attention=program,
                       implementation=implementation,
                       return_stats=validation.check_bool("return_stats", return_stats))

  def hidden(self, tokens, attention: Optional[CondensateSpec] = None,
             implementation: str = "xla", return_stats: bool = False):
    """The final hidden states [B,T,D] (model dtype) of a teacher-forced pass, before the
    head: `lm.head(h)` gives `lm.logits`' numbers for any rows of it, so a measurement
    at a large vocabulary holds [T, D] instead of [T, V] (`hidden_parity`)."""
    tokens = self._tokens(tokens)
    program, sizes = _program(_check_attention(attention, implementation, self.num_layers,
                                               kv_heads=self.config.num_kv_heads))
    return gen.forward(self.graphdef, self.state, tokens, sizes, attention=program,
                       implementation=implementation,
                       return_stats=validation.check_bool("return_stats", return_stats),
                       head=False)

  def _check_hidden(self, name, h):
    width = self.config.width
    if (not hasattr(h, "shape") or h.ndim < 1 or h.shape[-1] != width
        or h.dtype != self.dtype):
      raise ValueError(f"{name}: expected final hidden states [..., {width}] of dtype "
                       f"{self.dtype.name} (lm.hidden), got "
                       f"{getattr(h, 'shape', type(h).__name__)} "
                       f"{getattr(h, 'dtype', '')}.")
    return h

  def head(self, hidden):
    """Logits [..., V] float32 of final hidden states [..., D] (`hidden`)."""
    return gen.head(self.graphdef, self.state, self._check_hidden("hidden", hidden))

  def hidden_parity(self, dense, cond, *, chunk: int = 256) -> dict:
    """`metrics.logit_parity` of the logits of two final hidden states [..., D] (dense
    side first), computed `chunk` positions at a time on their device: only [chunk, V]
    logits per side exist at once. `metrics.logit_parity_on_device` of the two `head`
    outputs, to float32 rounding of the KL (XLA fuses the head into it here)."""
    dense, cond = self._check_hidden("dense", dense), self._check_hidden("cond", cond)
    if dense.shape != cond.shape or dense.size == 0:
      raise ValueError(f"hidden states of shapes {dense.shape} and {cond.shape}: expected "
                       "equal, non-empty shapes.")
    chunk = _check_count("chunk", chunk, 1)
    d, c = dense.reshape(-1, dense.shape[-1]), cond.reshape(-1, cond.shape[-1])
    return metrics.summarize_rows(gen.hidden_parity_rows(
        self.graphdef, self.state, d, c, chunk=min(chunk, d.shape[0])))

  def generate(self, tokens, max_new_tokens: int, attention: Optional[CondensateSpec] = None,
               implementation: str = "xla", *, prompt_lengths=None,
               eos_id: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0,
               seed=0):
    """Decoding with a KV cache: the new tokens only, [B, max_new_tokens] int32.

    tokens [B, T]: one prompt per row. Ragged batches: right-pad the rows to T and give
    `prompt_lengths` [B] (each in [1, T]); row b continues from tokens[b, :prompt_lengths[b]]
    exactly as it would alone (padding is never attended; see `models.kv_cache`).
    `eos_id`: a row stops at its first eos_id, which it emits, and the rest of the row is
    eos_id (None: exactly max_new_tokens per row). The loop ends once every row stopped.
    `temperature` 0 (default): greedy. > 0: sampling from softmax(logits / temperature)
    restricted to the top-`top_p` nucleus, reproducible by `seed`: an int (row b draws
    from fold_in(key(seed), b)) or one int per row (row b draws from key(seed[b]), the
    same draws whatever batch the row sits in). The same seed gives dense and condensate
    runs the same noise, so their tokens differ only where their distributions do.
    """
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
    tokens = self._tokens(tokens, extra=max_new_tokens)
    b, t = tokens.shape
    lengths = _check_lengths(prompt_lengths, b, t)
    if eos_id is not None:
      eos_id = _check_count("eos_id", eos_id, 0, self.vocab_size - 1)
    temperature = _check_float("temperature", temperature, 0.0, None, "a float >= 0")
    top_p = _check_float("top_p", top_p, 0.0, 1.0, "a float in (0, 1]", open_lo=True)
    keys = _row_keys(seed, b)
    program, sizes = _program(_check_attention(attention, implementation, self.num_layers,
                                               fast=True, kv_heads=self.config.num_kv_heads))
    return gen.decode(self.graphdef, self.state, tokens, lengths, keys,
                      jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p), sizes,
                      max_new_tokens=max_new_tokens, attention=program,
                      implementation=implementation, cfg=self.config, dtype=self.dtype,
                      sample=temperature > 0, eos_id=eos_id,
                      fast_prefill=fast_path.prefill_kernels_apply(program, lengths, t))

  def init_cache(self, batch: int, max_len: int):
    batch = _check_count("batch", batch, 1)
    max_len = _check_count("max_len", max_len, 1, self.max_length)
    return gen.init_cache(self.config, batch, max_len, self.dtype)

  def _check_cache(self, cache, shape):
    """cache: a KVCache of this model for a batch of `shape[0]` rows with room for
    shape[1] more tokens (checked where its lengths are concrete)."""
    if not isinstance(cache, KVCache):
      raise ValueError(f"cache: expected a KVCache (lm.init_cache), got "
                       f"{type(cache).__name__}.")
    if len(cache.k) != self.num_layers:
      raise ValueError(f"cache has {len(cache.k)} layers: expected {self.num_layers} "
                       "(a cache of this model, lm.init_cache).")
    b, t = shape
    rows, capacity = cache.k[0].shape[0], cache.k[0].shape[1]
    if rows != b:
      raise ValueError(f"tokens.shape={tuple(shape)}: the cache holds {rows} rows; "
                       f"expected tokens with {rows} rows (or lm.init_cache({b}, ...)).")
    if validation.is_concrete(cache.lengths):
      longest = int(np.max(np.asarray(cache.lengths)))
      if longest + t > capacity:
        raise ValueError(f"tokens.shape={tuple(shape)}: a cache row holds {longest} of "
                         f"{capacity} positions, no room for {t} more (a larger "
                         "lm.init_cache max_len).")

  def prefill(self, tokens, cache, attention: Optional[CondensateSpec] = None,
              implementation: str = "xla", *, prompt_lengths=None):
    """Feeds prompts [B,T] (right-padded; `prompt_lengths` as in `generate`) through
    `cache`: (logits [B, V] float32 at each row's last real position, updated cache). The
    LM head runs on those positions only. implementation="fast" on an empty cache runs
    the fast prefill kernels (`models.fast_path`)."""
    tokens = self._tokens(tokens)
    self._check_cache(cache, tokens.shape)
    lengths = _check_lengths(prompt_lengths, *tokens.shape)
    program, sizes = _program(_check_attention(attention, implementation, self.num_layers,
                                               fast=True, kv_heads=self.config.num_kv_heads))
    if implementation == fast_path.NAME:
      fast_path.check_cache_length(program, cache.k[0].shape[1])
    if fast_path.prefill_kernels_apply(program, lengths, tokens.shape[1]):
      implementation = self._fast_prefill(implementation, cache)
    return gen.prefill(self.graphdef, self.state, tokens, cache, lengths, sizes,
                       attention=program, implementation=implementation)

  @staticmethod
  def _fast_prefill(implementation, cache):
    """"fast" on a cache known to be empty -> the fast path's prefill name."""
    if (implementation == fast_path.NAME and validation.is_concrete(cache.lengths)
        and not np.any(np.asarray(cache.lengths))):
      return fast_path.PREFILL
    return implementation

  def step(self, tokens, cache, attention: Optional[CondensateSpec] = None,
           implementation: str = "xla"):
    """Feeds tokens [B,T] through `cache`: (logits [B,T,V] float32, updated cache).

    cache.lengths + T must fit the cache (refused where the lengths are concrete).
    With a block-selection spec the returned cache carries the layers' block summaries
    (built on the first call, appended on later ones; see `KVCache`).
    """
    tokens = self._tokens(tokens)
    self._check_cache(cache, tokens.shape)
    program, sizes = _program(_check_attention(attention, implementation, self.num_layers,
                                               fast=True, kv_heads=self.config.num_kv_heads))
    if implementation == fast_path.NAME:
      fast_path.check_cache_length(program, cache.k[0].shape[1])
    implementation = self._fast_prefill(implementation, cache)
    return gen.step(self.graphdef, self.state, tokens, cache, sizes, attention=program,
                    implementation=implementation)
