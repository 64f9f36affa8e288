"""Condensate attention over a device mesh (issue #17): K/V sharded along the sequence
and/or the KV heads, the exact global top-k, partial softmaxes merged by log-sum-exp.

  cj.distributed.condensate_attention(q, k, v, spec, *, mesh, seq_axis=None,
      head_axis=None, causal=True, q_positions=None, kv_lengths=None,
      sliding_window=None, scale=None, return_stats=False)
  cj.distributed.dense_attention(q, k, v, *, mesh, seq_axis=None, head_axis=None, ...)

The same arguments, outputs and statistics as `cj.condensate_attention` /
`cj.dense_attention`, plus the mesh. Layout (`jax.shard_map`):
  k, v [B, S, Hkv, D]   S split over `seq_axis` (S_local = S / n_seq; shard i holds the
                        keys i * S_local .. (i + 1) * S_local - 1), Hkv over `head_axis`;
  q [B, T, Hq, D]       Hq over `head_axis` (contiguous blocks: query head h reads KV head
                        h // G, so the blocks line up), replicated over `seq_axis`;
  q_positions, kv_lengths  replicated (global positions).
Outputs come back as q's head layout (out [B, T, Hq, D] and stats [B, Hq, T] split over
`head_axis`, replicated over `seq_axis`).

selection="exact" across shards: each shard takes its local top-k' (k' = min(top_k,
S_local)) of its middle keys; the global top-k lies in the union of those (a shard can
hold at most top_k of it, and they are its best); the candidates' scores are gathered in
shard order and the global top-k taken over them with `lax.top_k`, whose stable order puts
equal scores in gather order: shard by shard, then by local position, i.e. by global
position -- the tie rule of the single-device call (DESIGN.md §1). Each shard then
attends its own part of the set; (max, sum, weighted values) merge with one pmax and two
psums. Statistics merge the same way (masses from a shared max, counts by psum; the
certificate from the global k-th score and the global count of dropped middle keys).
Equal to the single-device call to float32 rounding (the summation order differs); the
set, set sizes and counts exactly (tested on 8 CPU devices, ties across shard borders).

Communication per call (seq_axis of n devices; per head shard): the candidates' scores and
validity, n * k' * T * Hq * 5 bytes gathered (decode, T = 1, top_k 1024, 32 heads, 8
devices: 1.3 MB), and the merge: pmax of [B, Hq, T] and psum of [B, Hq, T] + [B, T, Hq, D]
float32 (decode, Hq = 32, D = 128: 16 KB), and a psum of the bad keys each query's K/V
head reads, [B, Hkv, T] int32 (the non-finite check counted per shard: counted over the
whole sequence outside the shards, XLA gathered a [B, S, Hkv] int32 array to every
device, 32 MB per call at 1M keys and 8 KV heads). head_axis alone needs none. These
are the compiled program's collectives exactly (`experiments.bench.mesh_bench`'s
`compiled_collectives` on the HLO; tested on 8 CPU devices for dense and "exact").

selection="indexed" across shards (`impl.xla_indexed.select`'s set): the key index
(`index=`, a `KeyIndex` of k sharded like it, mu and sigma per KV head; None: built from
the sharded k, its mu and sigma reduced across shards) gives every shard its keys'
estimates; the global top num_candidates by estimate and then the global exact top_k of
those candidates are each taken as above (per-shard top-k', gathered in shard order, one
`lax.top_k`); the certificate's delta (unselected candidates by their exact score, other
middle keys by the index's upper bound) merges by one pmax and one psum. The same set and
counts as one device with the same index; the certificate to rounding. Per decode call it
gathers twice (estimates of n * min(C, S_local) candidates, then their exact scores).

selection="blocks" across shards (`impl.xla_blocks`'s set): each shard summarises its
own blocks (S / n_seq a multiple of spec.block_size), every GQA group takes the global
top_blocks blocks by `order.group_score` (bounds relative to each head's best block over
all shards, ties to the lower block) among those holding middle keys, and the certificate
sums n_b e^{U_b} over the other blocks of every shard. The summaries are built from the
shard's keys in every call (a cache's summaries are not taken). Sets, set sizes and keys
scored as one device's; outputs and the certificate to rounding. (`distributed.sets`
and `distributed.block_sets` hold the sets, `sets` the merged statistics.)

selection="bounded" and "certified" with bounds="blocks" across shards
(`impl.xla_blocks`'s sets, `block_sets.block_loop_set`): the blocks' bounds and middle
counts of every shard are gathered (per block and head: a few numbers), so each shard knows the
single-device block order; the number of blocks the single-device loop expands is found
by bisection over the order (log2 of the block count probes; "bounded": each a global
top-k of the expanded keys as for "exact"; "certified": each the merged mass of the set
so far against the order's tail), then the set is the global top_k of those blocks'
middle keys ("bounded") or all of them ("certified"), and the certificate the order's
tail after them (plus, "bounded", the expanded-but-dropped keys' (n - top_k) e^{tau}).
Sets, set sizes and keys scored as one device's; outputs and the certificate to
rounding (a "certified" eps within rounding of spec.epsilon can stop at a different
block). keys_scored reports what the single-device loop scores; the mesh call itself
scores every key of every shard (this is the specification, not a fast path). Per call it
gathers the block bounds and middle counts (n_blocks * T * (Hq + 1) * 4 bytes) and,
"bounded", bit_length(n_blocks) + 1 top-k candidate lists (1M keys, 64-key blocks,
top_k 1024, 32 heads, 8 devices: ~16 gathers of ~1.3 MB per decode step).

selection="certified" on the key index (its default bounds) across shards
(`impl.xla_indexed.select_certified`'s set, `sets.certified_index_set`): the set is
anchor + window + the first n middle keys in the global order of their index upper
bound; the n-th key is found by a bitwise search over (order key of the bound, reversed
global position), 63 probes, each a merged count and two merged log-sum-exps of the set
so far against the rest's bounds. Sets, set sizes and keys scored as one device's; the
certificate to rounding (the sums merge per shard where one device takes cumulative sums:
an eps within rounding of the target can stop at another key).

selection="blocks" with query_blocks=True and T > 1 (`impl.xla_blocks.query_block_prefill`'s
set, `block_sets.query_blocks_set`): each block of block_size query rows ranks every shard's
key-block boxes with its centre query (`selection.prefill_lists`' ranking), the global
top_blocks blocks holding middle keys of its rows (ties to the lower block); each query's
certificate from its own block bounds, merged over shards. Sets, set sizes and keys
scored as one device's; per call it gathers each shard's top_blocks candidate blocks
(B * Hq * nq * top_blocks scores and flags per shard) and merges a [B, Hq, T]
log-sum-exp and the keys-scored counts.

Limits: selection "exact", "indexed", "blocks" (query_blocks too), "bounded", "certified";
queries are replicated over seq_axis (each shard scores T x S_local:
prefill at long T is memory-bound by that); no top_k_capacity (static sizes).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from condensate_jax import finite, geometry, softmax, validation
from condensate_jax.distributed import block_sets, sets
from condensate_jax.impl import xla_blocks
from condensate_jax.selection import index as index_lib
from condensate_jax.softmax import HIGHEST, NEG_INF, AttentionStats
from condensate_jax.spec import CondensateSpec, check_spec


class Placement(NamedTuple):
  """Where a model's attention runs: `implementation=cj.distributed.Placement(mesh,
  seq_axis=..., head_axis=...)` in `lm.logits / hidden / generate / step / prefill`
  sends every layer's attention through this module, the KV cache sharded the same way
  (hashable: a static argument of the compiled programs)."""
  mesh: Mesh
  seq_axis: Optional[str] = None
  head_axis: Optional[str] = None

  @property
  def seq_devices(self) -> int:
    return self.mesh.shape[self.seq_axis] if self.seq_axis is not None else 1

  def kv_sharding(self):
    """The NamedSharding of a [B, S, Hkv, D] cache buffer."""
    return NamedSharding(self.mesh, P(None, self.seq_axis, self.head_axis, None))

  def shard_index(self, structure):
    """A cache's KeyIndex laid out as the cache (codes, step, err along the sequence and
    KV heads; mu, sigma along the heads); anything else unchanged."""
    if not isinstance(structure, index_lib.KeyIndex):
      return structure
    put = lambda x, *spec: jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, P(*spec)))
    seq, head = self.seq_axis, self.head_axis
    return index_lib.KeyIndex(put(structure.codes, None, seq, head, None),
                              put(structure.step, None, seq, head),
                              put(structure.err, None, seq, head),
                              put(structure.mu, None, head, None),
                              put(structure.sigma, None, head, None), structure.bits)


def check_placement(placement, attention=None, num_kv_heads=None):
  """ValueError unless `placement` is a Placement whose axes fit `mesh` (and the model's
  KV heads) and `attention` (None or a spec) is one the mesh call implements."""
  if not isinstance(placement, Placement):
    raise ValueError(f"implementation={placement!r}: expected a str or a "
                     "cj.distributed.Placement.")
  if not isinstance(placement.mesh, Mesh):
    raise ValueError(f"Placement.mesh={placement.mesh!r}: expected a jax.sharding.Mesh.")
  names = tuple(placement.mesh.axis_names)
  for arg in ("seq_axis", "head_axis"):
    axis = getattr(placement, arg)
    if axis is not None and axis not in names:
      raise ValueError(f"Placement.{arg}={axis!r}: not an axis of the mesh; expected None "
                       f"or one of {names}.")
  if placement.seq_axis is not None and placement.seq_axis == placement.head_axis:
    raise ValueError(f"Placement seq_axis = head_axis = {placement.seq_axis!r}: expected "
                     "two different mesh axes.")
  n_head = placement.mesh.shape[placement.head_axis] if placement.head_axis else 1
  if num_kv_heads is not None and num_kv_heads % n_head:
    raise ValueError(f"Placement.head_axis={placement.head_axis!r} of {n_head} devices: the "
                     f"model has {num_kv_heads} KV heads; expected a multiple of {n_head}.")
  if attention is not None:
    _check_selection(attention, "attention")
  return placement


def _check_mesh(mesh, seq_axis, head_axis, k, q):
  """(n_seq, n_head) of a mesh and its axes for these shapes; ValueError otherwise."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh={mesh!r}: expected a jax.sharding.Mesh.")
  names = tuple(mesh.axis_names)
  for arg, axis in (("seq_axis", seq_axis), ("head_axis", head_axis)):
    if axis is not None and axis not in names:
      raise ValueError(f"{arg}={axis!r}: not an axis of the mesh; expected None or one of "
                       f"{names}.")
  if seq_axis is not None and seq_axis == head_axis:
    raise ValueError(f"seq_axis={seq_axis!r}, head_axis={head_axis!r}: expected two "
                     "different mesh axes (or None for one of them).")
  n_seq = mesh.shape[seq_axis] if seq_axis is not None else 1
  n_head = mesh.shape[head_axis] if head_axis is not None else 1
  s_len, hkv = k.shape[1], k.shape[2]
  if s_len % n_seq:
    raise ValueError(f"k.shape[1]={s_len}: the sequence is split over seq_axis="
                     f"{seq_axis!r} of {n_seq} devices; expected a multiple of {n_seq} "
                     "(pad the cache).")
  if hkv % n_head:
    raise ValueError(f"k.shape[2]={hkv} KV heads: split over head_axis={head_axis!r} of "
                     f"{n_head} devices; expected a multiple of {n_head}.")
  return n_seq, n_head


def condensate_attention(q, k, v, spec: CondensateSpec, *, mesh, seq_axis=None,
                         head_axis=None, causal: bool = True, q_positions=None,
                         kv_lengths=None, sliding_window: Optional[int] = None,
                         scale: Optional[float] = None, return_stats: bool = False,
                         index=None):
  """`cj.condensate_attention` over `mesh` (module docstring); selection="indexed" takes
  the `selection.index.KeyIndex` of k as `index=` (None: built from k)."""
  check_spec(spec)
  _check_selection(spec, "spec")
  if index is not None and not spec.uses_index:
    raise ValueError(f"index: given with spec.selection={spec.selection!r} (bounds="
                     f"{spec.bounds!r}); a key index serves selection='indexed' and "
                     "'certified' with bounds='index'.")
  if index is not None:
    index_lib.check_index(index, k, spec)
  return _call(q, k, v, spec, mesh=mesh, seq_axis=seq_axis, head_axis=head_axis,
               causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
               sliding_window=sliding_window, scale=scale, return_stats=return_stats,
               index=index)


SELECTIONS = ("exact", "indexed", "blocks", "bounded", "certified")


def _check_selection(spec, name):
  if spec.selection not in SELECTIONS or spec.top_k_capacity:
    raise ValueError(f"{name}.selection={spec.selection!r}, top_k_capacity="
                     f"{spec.top_k_capacity}: the distributed call implements selection "
                     f"in {SELECTIONS} with static sizes (a spec without top_k_capacity).")


def dense_attention(q, k, v, *, mesh, seq_axis=None, head_axis=None, causal: bool = True,
                    q_positions=None, kv_lengths=None, sliding_window: Optional[int] = None,
                    scale: Optional[float] = None):
  """`cj.dense_attention` over `mesh`: every visible key (the same merge)."""
  return _call(q, k, v, None, mesh=mesh, seq_axis=seq_axis, head_axis=head_axis,
               causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
               sliding_window=sliding_window, scale=scale, return_stats=False)


def _call(q, k, v, spec, *, mesh, seq_axis, head_axis, causal, q_positions, kv_lengths,
          sliding_window, scale, return_stats, index=None):
  return_stats = validation.check_bool("return_stats", return_stats)
  kv_lengths, q_positions, scale = validation.prepare(
      q, k, v, causal=causal, q_positions=q_positions, kv_lengths=kv_lengths,
      sliding_window=sliding_window, scale=scale)
  n_seq, _ = _check_mesh(mesh, seq_axis, head_axis, k, q)
  if spec is not None and spec.query_blocks and q.shape[1] > 1:
    xla_blocks.check_query_blocks(causal, sliding_window)
  if spec is not None and spec.uses_blocks and (k.shape[1] // n_seq) % spec.block_size:
    raise ValueError(f"k.shape[1]={k.shape[1]} over {n_seq} sequence shards: "
                     f"{k.shape[1] // n_seq} keys per shard, not whole blocks of "
                     f"spec.block_size={spec.block_size}; expected S a multiple of "
                     f"{n_seq * spec.block_size}.")
  window = validation.static_window(sliding_window, k.shape[1])
  bad_keys = None
  if index is not None:    # a broken entry poisons its readers, as on one device
    bad_keys, index = finite.sanitize_index(index)
  if spec is not None and spec.uses_index and index is None:
    # from the sanitized keys, as the single-device call; partitioned by XLA
    index = index_lib.build(finite.sanitize(k), kv_lengths, spec.index_bits)
  out, bad = _sharded(finite.sanitize(q), k, v, q_positions, kv_lengths, index, bad_keys,
                      spec=spec, mesh=mesh, seq_axis=seq_axis, head_axis=head_axis,
                      n_seq=n_seq, causal=bool(causal), sliding_window=window, scale=scale,
                      return_stats=return_stats)
  bad = bad | ~jnp.all(jnp.isfinite(q), axis=-1)
  return finite.poison_result(out, bad, return_stats)


@functools.partial(jax.jit, static_argnames=("spec", "mesh", "seq_axis", "head_axis",
                                             "n_seq", "causal", "sliding_window", "scale",
                                             "return_stats"))
def _sharded(q, k, v, q_positions, kv_lengths, index, bad_keys, *, spec, mesh, seq_axis,
             head_axis, n_seq, causal, sliding_window, scale, return_stats):
  """(out, bad [B, T, Hq]: the queries that read a non-finite key or value row or a
  broken index entry) of the shards; k, v as given (sanitized per shard)."""
  s_len = k.shape[1]
  local = functools.partial(_local, spec=spec, seq_axis=seq_axis, n_seq=n_seq,
                            s_len=s_len, causal=causal, sliding_window=sliding_window,
                            scale=scale, return_stats=return_stats)
  qs, kvs = P(None, None, head_axis, None), P(None, seq_axis, head_axis, None)
  per_key = P(None, seq_axis, head_axis)
  out_spec = (qs, AttentionStats(*[P(None, head_axis, None)] * 6)) if return_stats else qs
  ixs = None if index is None else index_lib.KeyIndex(
      kvs, per_key, per_key, P(None, head_axis, None), P(None, head_axis, None), index.bits)
  bks = None if bad_keys is None else per_key
  return jax.shard_map(local, mesh=mesh, in_specs=(qs, kvs, kvs, P(), P(), ixs, bks),
                       out_specs=(out_spec, P(None, None, head_axis)),
                       check_vma=False)(q, k, v, q_positions, kv_lengths, index, bad_keys)


def _local(q, k, v, q_positions, kv_lengths, index, bad_keys, *, spec, seq_axis, n_seq,
           s_len, causal, sliding_window, scale, return_stats):
  """One shard: its keys' part of every query's set, attended and merged; and which
  queries read a bad key of any shard (counted per shard, summed: [B, K, T] int32, where
  a count over the whole sequence outside the shards made XLA gather a [B, S, Hkv]
  array to every device)."""
  s_loc = k.shape[1]
  offset = 0 if seq_axis is None else jax.lax.axis_index(seq_axis) * s_loc
  lo, hi = geometry.visible_range(q_positions, kv_lengths, causal=causal,
                                  sliding_window=sliding_window)
  bad = finite.nonfinite_rows(k, v)
  if bad_keys is not None:
    bad = bad | bad_keys
  bad = finite.per_query_head(
      sets.psum(finite.count_in_range(bad, lo - offset, hi - offset), seq_axis), q.shape[2])
  k, v = finite.sanitize(k), finite.sanitize(v)
  return _attend(q, k, v, q_positions, kv_lengths, index, lo, hi, offset, spec=spec,
                 seq_axis=seq_axis, n_seq=n_seq, s_len=s_len, scale=scale,
                 return_stats=return_stats), bad


def _attend(q, k, v, q_positions, kv_lengths, index, lo, hi, offset, *, spec, seq_axis,
            n_seq, s_len, scale, return_stats):
  """One shard's sets, attended and merged (k, v finite)."""
  s_loc = k.shape[1]
  scores = softmax.scores(q, k, scale)                                  # [B,K,G,T,S_l]
  if spec is None:
    masks = geometry.static_masks(lo - offset, hi - offset, s_loc,
                                  CondensateSpec(anchor=0, window=0, top_k=0))
    in_set = jnp.broadcast_to(masks.visible, scores.shape)
    topk = None
  elif spec.selection == "indexed":
    masks = geometry.static_masks(lo - offset, hi - offset, s_loc, spec)
    in_set, topk = sets.indexed_set(scores, q, index, masks, spec, scale, seq_axis,
                                    n_seq, s_len)
  elif spec.selection == "blocks" and spec.query_blocks and q.shape[1] > 1:
    masks = geometry.static_masks(lo - offset, hi - offset, s_loc, spec)
    in_set, topk = block_sets.query_blocks_set(scores, q, k, q_positions, kv_lengths, lo,
                                               hi, offset, masks, spec, scale, seq_axis, n_seq)
  elif spec.selection == "blocks":
    masks = geometry.static_masks(lo - offset, hi - offset, s_loc, spec)
    in_set, topk = block_sets.blocks_set(scores, q, k, kv_lengths, lo, hi, offset, masks,
                                         spec, scale, seq_axis, n_seq)
  elif spec.selection == "certified" and spec.uses_index:
    masks = geometry.static_masks(lo - offset, hi - offset, s_loc, spec)
    in_set, topk = sets.certified_index_set(scores, q, index, masks, spec, scale, seq_axis,
                                            offset)
  elif spec.selection in ("bounded", "certified"):
    masks = geometry.static_masks(lo - offset, hi - offset, s_loc, spec)
    in_set, topk = block_sets.block_loop_set(scores, q, k, kv_lengths, lo, hi, offset,
                                             masks, spec, scale, seq_axis, n_seq, s_len)
  else:
    masks = geometry.static_masks(lo - offset, hi - offset, s_loc, spec)
    in_set, topk = sets.exact_set(scores, masks, spec, seq_axis, n_seq, s_len)
  # the set's softmax, merged: one shared max, then sums of exp(s - m) and of their values
  s = jnp.where(in_set, scores, NEG_INF)
  m = sets.pmax(jnp.max(s, axis=-1), seq_axis)                          # [B,K,G,T]
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.where(in_set, jnp.exp(s - m[..., None]), 0.0)
  l = sets.psum(jnp.sum(p, axis=-1), seq_axis)
  o = sets.psum(jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(jnp.float32),
                           precision=HIGHEST), seq_axis)
  o = o / jnp.where(l > 0, l, 1.0)[..., None]
  b, hkv, g, t, d = o.shape
  out = o.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d).astype(q.dtype)
  if not return_stats:
    return out
  return out, sets.stats(scores, masks, in_set, topk, m, l, seq_axis)


def model_attend(placement: Placement, q, k, v, spec, *, q_positions, kv_lengths,
                 sliding_window, scale, return_stats, index=None):
  """A model layer's attention over the placement's mesh: k, v padded (with invisible
  keys, past every row's kv_length) to a multiple of the sequence shards (of whole blocks
  per shard under the block modes; the cache's key index of selection="indexed" and
  "certified" on the index with them). Returns out, or
  (out, stats) with return_stats (a dense layer's stats: everything captured)."""
  whole = placement.seq_devices * (spec.block_size if spec is not None
                                   and spec.uses_blocks else 1)
  pad = -k.shape[1] % whole
  if pad:
    widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
    k, v = jnp.pad(k, widths), jnp.pad(v, widths)
    if index is not None:   # empty entries, like the never-written positions of a cache
      index = index_lib.KeyIndex(jnp.pad(index.codes, widths), jnp.pad(index.step, widths[:3]),
                                 jnp.pad(index.err, widths[:3]), index.mu, index.sigma,
                                 index.bits)
  kw = dict(mesh=placement.mesh, seq_axis=placement.seq_axis,
            head_axis=placement.head_axis, q_positions=q_positions, kv_lengths=kv_lengths,
            sliding_window=sliding_window, scale=scale)
  if spec is None:
    return dense_attention(q, k, v, **kw)
  if not spec.uses_index:
    index = None
  return condensate_attention(q, k, v, spec, return_stats=return_stats, index=index, **kw)
