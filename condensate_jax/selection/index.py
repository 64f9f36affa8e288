"""The key index of selection="indexed": per-key low-bit codes with a stored error term.

Per batch row and KV head, keys are normalised per channel, x = (k - mu) / sigma (mu,
sigma: the channel mean and standard deviation of the keys the index was built from, so
a shared offset and outlier channels cost nothing), and each key is stored as

    codes c_j in [-L, L]^D (L = 2^(bits-1) - 1),  step s_j = max_i |x_ji| / L,
    err_j >= || (k_j - khat_j) / sigma ||_2    with khat_j = mu + sigma * s_j * c_j,

so for every query q (scale folded in, Cauchy-Schwarz)
    |q.k_j - q.khat_j| <= err_j * || q * sigma ||_2.
That gives a lower and an upper bound on every key's score from the index alone
(`index_bounds`), plus a float32 rounding slack (`bounds.bound_slack`) that covers the
computed exact score and the computed estimate; the property tests check
lower <= computed score <= upper on adversarial keys.

Bytes per key and KV head, as the decode kernel reads it (`PackedIndex`, `pack_index`):
bits * D / 8 for the codes plus 4 + 4 (step and error in float32): 40 / 72 / 136 bytes at
D = 128 for 2 / 4 / 8 bits, against 256 bytes of a bf16 key (K and V: 512). This XLA
specification holds the codes unpacked, as int8. Cost grows linearly with S: scanning it reads that
many bytes per key; the candidates then read their keys exactly.

Built once (`build_index`, at prefill: mu and sigma come from the keys given) and
appended per decoded token with the same mu, sigma (`append_index`): any mu, sigma > 0
keep the bounds valid, only their tightness depends on them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from condensate_jax import validation
from condensate_jax.selection.bounds import bound_slack
from condensate_jax.softmax import HIGHEST
from condensate_jax.spec import INDEX_BITS
from pallas_kernels.index_scan.reference import levels, unpack as unpack_codes

# err is rounded up by this relative margin: it covers the float32 rounding of khat and
# of the division by sigma in its own computation
_ERR_MARGIN = 2.0**-16


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["codes", "step", "err", "mu", "sigma"],
                   meta_fields=["bits"])
@dataclasses.dataclass(frozen=True)
class KeyIndex:
  """codes int8 [B, S, Hkv, D]; step, err float32 [B, S, Hkv]; mu, sigma float32
  [B, Hkv, D] (sigma > 0); bits static. Positions never written hold codes 0, step 0
  and err 0 (they are never visible)."""
  codes: jax.Array
  step: jax.Array
  err: jax.Array
  mu: jax.Array
  sigma: jax.Array
  bits: int

  @property
  def num_keys(self) -> int:
    return self.codes.shape[1]

  @property
  def bytes_per_key(self) -> int:
    """Bytes per key and KV head in the packed layout (module docstring)."""
    return self.bits * self.codes.shape[-1] // 8 + 8


# sigma is kept where x = (k - mu) / sigma and sigma * x stay finite and normal
_SIGMA_MIN, _SIGMA_MAX = 1e-30, 1e30


def _safe(x):
  return jnp.where(x > 0, x, 1.0)


def _norm(x):
  """L2 norm over the last axis without overflow or underflow of the squares (scaled by
  the largest entry; the entries lost to underflow are below 1e-38 of it, inside the
  error margin)."""
  top = jnp.max(jnp.abs(x), axis=-1)
  return top * jnp.sqrt(jnp.sum((x / _safe(top)[..., None]) ** 2, axis=-1))


def _check_bits(bits):
  if isinstance(bits, bool) or bits not in INDEX_BITS:
    raise ValueError(f"bits={bits!r}: expected one of {INDEX_BITS}.")
  return int(bits)


def build_index(k, bits: int = 4, kv_lengths=None) -> KeyIndex:
  """The index of k [B, S, Hkv, D]; keys at positions >= kv_lengths[b] are left out
  (of mu and sigma too) and get empty entries."""
  validation.check_keys(k)
  bits = _check_bits(bits)
  b, s = k.shape[:2]
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)
  else:
    kv_lengths = validation.check_int_array("kv_lengths", kv_lengths, (b,), 0, s)
  return build(k, kv_lengths, bits)


@functools.partial(jax.jit, static_argnames=("bits",))
def build(k, kv_lengths, bits):
  """`build_index` on validated inputs (traceable)."""
  s = k.shape[1]
  kf = k.astype(jnp.float32)
  valid = (jnp.arange(s) < kv_lengths[:, None])[:, :, None, None]          # [B, S, 1, 1]
  # mu and sigma from the finite keys only: one NaN key must not break every key's entry
  use = valid & jnp.all(jnp.isfinite(kf), axis=-1, keepdims=True)          # [B, S, K, 1]
  n = jnp.maximum(jnp.sum(use, axis=1), 1).astype(jnp.float32)              # [B, K, 1]
  mu = jnp.sum(jnp.where(use, kf, 0.0), axis=1) / n                         # [B, K, D]
  dev = jnp.where(use, kf - mu[:, None], 0.0)
  top = jnp.max(jnp.abs(dev), axis=1)                                       # no overflow:
  sd = top * jnp.sqrt(jnp.sum((dev / _safe(top)[:, None]) ** 2, axis=1) / n)  # scaled
  sigma = jnp.clip(jnp.where(sd > 0, sd, 1.0), _SIGMA_MIN, _SIGMA_MAX)
  codes, step, err = _encode(kf, mu, sigma, bits)
  return KeyIndex(jnp.where(valid, codes, jnp.int8(0)), jnp.where(valid[..., 0], step, 0.0),
                  jnp.where(valid[..., 0], err, 0.0), mu, sigma, bits)


def _encode(kf, mu, sigma, bits):
  """(codes, step, err) of float32 keys [B, S, K, D] under mu, sigma [B, K, D]."""
  lv = levels(bits)
  x = (kf - mu[:, None]) / sigma[:, None]
  top = jnp.max(jnp.abs(x), axis=-1)                                          # [B, S, K]
  step = jnp.where(top > 0, top / lv, 0.0)
  safe = jnp.where(step > 0, step, 1.0)[..., None]
  codes = jnp.clip(jnp.round(x / safe), -lv, lv)
  khat = mu[:, None] + sigma[:, None] * (step[..., None] * codes)
  err = _norm((kf - khat) / sigma[:, None])
  err = err * (1.0 + _ERR_MARGIN) + jnp.float32(_ERR_MARGIN) * top
  return codes.astype(jnp.int8), step, err


def append_index(index: KeyIndex, k_new, positions) -> KeyIndex:
  """Writes k_new [B, T, Hkv, D] at positions [B, T] (-1: skip) with the index's own
  mu and sigma."""
  positions = _check_append(index, KeyIndex, k_new, positions)
  return _append(index, k_new, positions)


def _check_append(index, kind, k_new, positions):
  """Validates an append's inputs (ValueError naming the argument); returns positions."""
  if not isinstance(index, kind):
    raise ValueError(f"index: expected a {kind.__name__}, got {type(index).__name__}.")
  validation.check_keys(k_new, "k_new")
  bhd = ((index.codes.shape[0],) + tuple(index.codes.shape[2:]) if kind is KeyIndex
         else (index.packed.shape[0], index.packed.shape[1], index.mu.shape[-1]))
  if (k_new.shape[0], k_new.shape[2], k_new.shape[3]) != tuple(bhd):
    raise ValueError(f"k_new.shape={tuple(k_new.shape)}: expected [B, T, Hkv, D] with "
                     f"B, Hkv, D = {tuple(bhd)}.")
  return validation.check_int_array("positions", positions, k_new.shape[:2], -1,
                                    index.num_keys - 1)


@jax.jit
def _append(index, k_new, positions):
  codes, step, err = _encode(k_new.astype(jnp.float32), index.mu, index.sigma, index.bits)
  rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
  at = jnp.where(positions >= 0, positions, index.num_keys)                 # out: dropped
  put = lambda old, new: old.at[rows, at].set(new, mode="drop")
  return KeyIndex(put(index.codes, codes), put(index.step, step), put(index.err, err),
                  index.mu, index.sigma, index.bits)


def index_bounds(q, index: KeyIndex, scale: float):
  """(estimate, slack) [B, K, G, T, S] float32 for q [B, T, Hq, D]: every key's computed
  score scale * q.k_j lies in [estimate - slack, estimate + slack]."""
  b, t, hq, d = q.shape
  hkv = index.codes.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
  qs = qg * index.sigma[:, None, :, None, :]                                 # q * sigma
  q_mu = jnp.einsum("btkgd,bkd->bkgt", qg, index.mu, precision=HIGHEST)
  q_code = jnp.einsum("btkgd,bskd->bkgts", qs, index.codes.astype(jnp.float32),
                      precision=HIGHEST)
  step = index.step.transpose(0, 2, 1)[:, :, None, None, :]                 # [B, K, 1, 1, S]
  err = index.err.transpose(0, 2, 1)[:, :, None, None, :]
  est = jnp.float32(scale) * (q_mu[..., None] + step * q_code)
  a_err, a_step, a_one = (x.transpose(0, 2, 3, 1)[..., None] for x in
                          slack_coefficients(qg, index.mu, index.sigma, index.bits, scale))
  return est, a_err * err + a_step * step + a_one


def slack_coefficients(qg, mu, sigma, bits: int, scale: float):
  """(a_err, a_step, a_one), each [B, T, K, G], for grouped queries qg [B, T, K, G, D]:
  key j's slack is a_err * err_j + a_step * step_j + a_one. It is err_j * ||q sigma||_2
  (the code's error) plus the float32 rounding of the exact score and of the estimate,
  relative to sum_i |q_i| |k_i| <= |q|.|mu| + s_j L ||q sigma||_1 + err_j ||q sigma||_2
  (`bounds.bound_slack`), all times scale."""
  qg = qg.astype(jnp.float32)
  qs = qg * sigma[:, None, :, None, :]
  sc, rel = jnp.float32(scale), jnp.float32(bound_slack(qg.shape[-1]))
  l1, l2 = jnp.sum(jnp.abs(qs), axis=-1), _norm(qs)
  q_abs_mu = jnp.einsum("btkgd,bkd->btkg", jnp.abs(qg), jnp.abs(mu), precision=HIGHEST)
  return sc * l2 * (1 + rel), sc * rel * levels(bits) * l1, sc * rel * q_abs_mu


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["packed", "step", "err", "mu", "sigma"],
                   meta_fields=["bits"])
@dataclasses.dataclass(frozen=True)
class PackedIndex:
  """The key index in the layout the decode kernels read: per (batch row, K/V head) the
  keys' codes packed 8 / bits to a byte, `packed` uint8 [B, Hkv, S, D * bits / 8]; step,
  err float32 [B, Hkv, S]; mu, sigma float32 [B, Hkv, D]. Byte i of a key holds the
  codes of channels i + n * D' (D' = D * bits / 8) at bits n * bits .. (n + 1) * bits - 1,
  each stored as c + L (unsigned). Bytes per key and K/V head: bits * D / 8 + 8."""
  packed: jax.Array
  step: jax.Array
  err: jax.Array
  mu: jax.Array
  sigma: jax.Array
  bits: int

  @property
  def num_keys(self) -> int:
    return self.packed.shape[2]

  @property
  def bytes_per_key(self) -> int:
    return self.packed.shape[-1] + 8


def pack_index(index: KeyIndex) -> PackedIndex:
  """The PackedIndex of `index` (same codes, step, err, mu, sigma)."""
  if not isinstance(index, KeyIndex):
    raise ValueError(f"index: expected a KeyIndex, got {type(index).__name__}.")
  d = index.codes.shape[-1]
  per = 8 // index.bits
  if d % per:
    raise ValueError(f"head dim {d}: packing {index.bits}-bit codes needs D divisible "
                     f"by {per}.")
  return _pack(index)


def _pack_codes(codes, bits: int):
  """int8 codes [B, S, K, D] -> packed uint8 [B, K, S, D * bits / 8] (`PackedIndex`)."""
  per = 8 // bits
  u = (codes.astype(jnp.int32) + levels(bits)).transpose(0, 2, 1, 3)         # [B, K, S, D]
  dp = u.shape[-1] // per
  return sum(u[..., n * dp:(n + 1) * dp] << (n * bits) for n in range(per)).astype(jnp.uint8)


@jax.jit
def _pack(index):
  t = lambda x: x.transpose(0, 2, 1)
  return PackedIndex(_pack_codes(index.codes, index.bits), t(index.step), t(index.err),
                     index.mu, index.sigma, index.bits)


def append_packed(index: PackedIndex, k_new, positions) -> PackedIndex:
  """`append_index` in the packed layout: k_new [B, T, Hkv, D] encoded with the index's
  own mu and sigma and written at positions [B, T] (-1: skip); equal to packing the
  appended `KeyIndex` (tested). What a decode cache that feeds the timed step keeps."""
  positions = _check_append(index, PackedIndex, k_new, positions)
  return _append_packed(index, k_new, positions)


@jax.jit
def _append_packed(index, k_new, positions):
  codes, step, err = _encode(k_new.astype(jnp.float32), index.mu, index.sigma, index.bits)
  b, t = positions.shape
  hkv = index.packed.shape[1]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, hkv, t))
  heads = jnp.broadcast_to(jnp.arange(hkv)[None, :, None], (b, hkv, t))
  at = jnp.broadcast_to(jnp.where(positions >= 0, positions, index.num_keys)[:, None],
                        (b, hkv, t))                                         # out: dropped
  put = lambda old, new: old.at[rows, heads, at].set(new, mode="drop")
  tr = lambda x: x.transpose(0, 2, 1)                                       # [B, K, T]
  return PackedIndex(put(index.packed, _pack_codes(codes, index.bits)), put(index.step, tr(step)),
                     put(index.err, tr(err)), index.mu, index.sigma, index.bits)


def check_index(index, k, spec):
  """`index` must be a KeyIndex of these keys' shape at spec.index_bits."""
  if not isinstance(index, KeyIndex):
    raise ValueError(f"index: expected a KeyIndex or None, got {type(index).__name__}.")
  if index.bits != spec.index_bits:
    raise ValueError(f"index.bits={index.bits}: expected spec.index_bits={spec.index_bits}.")
  if tuple(index.codes.shape) != tuple(k.shape):
    raise ValueError(f"index.codes.shape={tuple(index.codes.shape)}: expected k's shape "
                     f"{tuple(k.shape)} (the index of these keys).")
