"""The parity levels of DESIGN.md §1, as pure functions on host arrays.

Every function takes the dense side first and the condensate side second. Logits are
[..., V] arrays (the leading axes are positions, flattened); token sequences are 1-D.
Everything runs in NumPy on the host (float64 where it matters): these are measurements,
not part of any jitted path.

  bitwise_fraction        fraction of positions whose logit vectors are identical bit for bit
  max_abs_logit_diff      max |dense - condensate| over all positions and vocab entries
  max_ulp_diff            max distance in float32 units in the last place (sign-aware;
                          huge where a logit crosses 0: prefer max_diff_in_scale_ulps)
  max_diff_in_scale_ulps  max |dlogit| / float32 spacing at max |dense logit|
  mean_kl                 mean over positions of KL(softmax(dense) || softmax(condensate))
  top1_agreement          fraction of positions with the same argmax (teacher forcing)
  greedy_match            identical greedy tokens out of N and the first divergence step
  sampled_parity          TV / KL of the temperature + top-p sampling distributions
  attention_summary       captured mass (min/mean), max certified bound, keys read/visible

`logit_parity_on_device` computes `logit_parity` where the logits live (jax arrays, one
jitted pass): a runner at 8K tokens x 49K vocab then moves a few numbers to the host
instead of 1.6 GB per side, and XLA's pass replaces ~15 s of single-threaded NumPy.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _pair(dense, cond, name: str = "logits") -> tuple[np.ndarray, np.ndarray]:
  d = np.asarray(dense)
  c = np.asarray(cond)
  if d.shape != c.shape:
    raise ValueError(
        f"{name}: dense shape {d.shape} and condensate shape {c.shape}: expected equal "
        "shapes.")
  if d.ndim < 1 or d.shape[-1] == 0:
    raise ValueError(f"{name}.shape={d.shape}: expected [..., V] with V >= 1.")
  return d, c


def _float32_pair(dense, cond) -> tuple[np.ndarray, np.ndarray]:
  d, c = _pair(dense, cond)
  for side, x in (("dense", d), ("condensate", c)):
    if x.dtype != np.float32:
      raise ValueError(
          f"{side} logits dtype={x.dtype}: expected float32 (models return float32 "
          "logits; ulp and bitwise comparisons are defined on float32).")
  return d.reshape(-1, d.shape[-1]), c.reshape(-1, c.shape[-1])


def bitwise_fraction(dense, cond) -> float:
  """Fraction of positions whose whole logit vector is bit-for-bit identical."""
  d, c = _float32_pair(dense, cond)
  same = np.all(d.view(np.uint32) == c.view(np.uint32), axis=-1)
  return float(np.mean(same))


def max_abs_logit_diff(dense, cond) -> float:
  """max |dense - condensate|; NaN if either side holds a NaN, inf for mismatched infs."""
  d, c = _float32_pair(dense, cond)
  if np.isnan(d).any() or np.isnan(c).any():
    return float("nan")
  d64, c64 = d.astype(np.float64), c.astype(np.float64)
  same = d64 == c64  # equal infinities give 0, not inf - inf = nan
  with np.errstate(invalid="ignore"):  # inf - inf where `same` already answers
    diff = np.where(same, 0.0, np.abs(d64 - c64))
  return float(np.max(diff))


def _ordered_int(x: np.ndarray) -> np.ndarray:
  """Maps float32 bit patterns to int64 so that consecutive floats differ by 1.

  Non-negative floats keep their bit pattern; a negative float -|x| maps to -bits(|x|),
  so +0.0 and -0.0 both map to 0 and the map is monotone in the float value.
  """
  bits = x.view(np.uint32).astype(np.int64)
  magnitude = bits & 0x7FFFFFFF
  return np.where(bits & 0x80000000, -magnitude, magnitude)


def max_ulp_diff(dense, cond) -> int:
  """Max distance in float32 ulps (sign-aware; +0 and -0 are 0 apart).

  Distances across zero count every representable float in between. NaN compares by
  its bit pattern, so any NaN difference shows as a huge distance; check
  `max_abs_logit_diff` (NaN) to tell.
  """
  d, c = _float32_pair(dense, cond)
  return int(np.max(np.abs(_ordered_int(d) - _ordered_int(c))))


def _log_softmax64(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  z = x - m
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def mean_kl(dense, cond, *, chunk: int = 256) -> float:
  """Mean over positions of KL(p_dense || p_condensate), from logits, in float64.

  Positions are processed `chunk` at a time to bound host memory (V is large).
  """
  d, c = _pair(dense, cond)
  d = d.reshape(-1, d.shape[-1])
  c = c.reshape(-1, c.shape[-1])
  if d.shape[0] == 0:
    raise ValueError("logits have no positions: expected at least one.")
  total = 0.0
  for start in range(0, d.shape[0], chunk):
    lp = _log_softmax64(d[start:start + chunk])
    lq = _log_softmax64(c[start:start + chunk])
    p = np.exp(lp)
    # 0 * log(0 / q) = 0: positions of zero dense probability contribute nothing.
    terms = np.where(p > 0, p * (lp - lq), 0.0)
    total += float(np.sum(terms))
  return max(total / d.shape[0], 0.0)


def top1_agreement(dense, cond) -> float:
  """Fraction of positions whose argmax token agrees (teacher forcing)."""
  d, c = _pair(dense, cond)
  return float(np.mean(np.argmax(d, axis=-1) == np.argmax(c, axis=-1)))


def greedy_match(dense_tokens, cond_tokens) -> dict[str, Any]:
  """Compares two greedy continuations of equal length N.

  Returns {"n": N, "prefix": tokens before the first divergence, "equal": positions
  with identical tokens, "first_divergence": step index (0-based) or None,
  "exact": all N identical}.
  """
  d = np.asarray(dense_tokens).reshape(-1)
  c = np.asarray(cond_tokens).reshape(-1)
  if d.shape != c.shape:
    raise ValueError(
        f"greedy tokens: dense length {d.shape[0]} and condensate length {c.shape[0]}: "
        "expected equal lengths.")
  same = d == c
  diverged = np.flatnonzero(~same)
  first: Optional[int] = int(diverged[0]) if diverged.size else None
  return {
      "n": int(d.shape[0]),
      "prefix": int(d.shape[0]) if first is None else first,
      "equal": int(np.sum(same)),
      "first_divergence": first,
      "exact": first is None,
  }


def attention_summary(stats) -> dict[str, float]:
  """Summaries of an AttentionStats (fields of any equal shape, e.g. [L, B, Hq, T]).

  captured_mass_min/mean: true softmax probability of the set, worst and average over
  every (layer, head, query). dropped_mass_max/mean: true dropped mass, computed
  directly (accurate when tiny, unlike 1 - captured).
  certified_eps_max: worst certified bound on the dropped mass. keys_read_frac: keys
  attended / keys visible, summed over everything. keys_scored_frac: keys whose score
  the selection computed / keys visible.
  """
  fields = ("captured_mass", "dropped_mass", "dropped_mass_bound", "set_size", "visible",
            "keys_scored")
  arrays = {}
  for name in fields:
    if not hasattr(stats, name):
      raise ValueError(
          f"stats={type(stats).__name__}: expected an AttentionStats with field {name!r}.")
    arrays[name] = np.asarray(getattr(stats, name))
  visible = float(np.sum(arrays["visible"], dtype=np.float64))
  if visible <= 0:
    raise ValueError("stats.visible sums to 0: expected at least one visible key.")
  captured = arrays["captured_mass"].astype(np.float64)
  return {
      "captured_mass_min": float(np.min(captured)),
      "captured_mass_mean": float(np.mean(captured)),
      "dropped_mass_max": float(np.max(arrays["dropped_mass"])),
      "dropped_mass_mean": float(np.mean(arrays["dropped_mass"].astype(np.float64))),
      "certified_eps_max": float(np.max(arrays["dropped_mass_bound"])),
      "keys_read_frac": float(np.sum(arrays["set_size"], dtype=np.float64)) / visible,
      "keys_scored_frac": float(np.sum(arrays["keys_scored"], dtype=np.float64)) / visible,
  }


def max_diff_in_scale_ulps(dense, cond) -> float:
  """max |dlogit| in units of the float32 spacing at max |dense logit| (the rounding step
  of the largest logit): 0 when bitwise equal, a few when two summation orders differ,
  large when the output moved. Unlike `max_ulp_diff` it does not explode where a logit
  crosses zero (where float32 spacing is tiny). NaN where either side is not finite."""
  d, c = _float32_pair(dense, cond)
  diff = max_abs_logit_diff(d, c)
  scale = float(np.max(np.abs(d))) if d.size else 0.0
  if not (np.isfinite(diff) and np.isfinite(scale)):
    return math.nan
  return diff / float(np.spacing(np.float32(max(scale, np.finfo(np.float32).tiny))))


def sampling_probs(logits, temperature: float, top_p: float = 1.0) -> np.ndarray:
  """The distribution `generate(temperature=, top_p=)` draws from, in float64:
  softmax(logits / temperature) on the top-p nucleus (the smallest set of highest logits
  whose mass reaches top_p, at least one, ties with its last logit kept), renormalised."""
  x = np.asarray(logits, np.float64) / float(temperature)
  lp = _log_softmax64(x)
  if top_p < 1.0:
    desc = -np.sort(-x, axis=-1)
    probs = np.exp(_log_softmax64(desc))
    before = np.cumsum(probs, axis=-1) - probs
    kept = np.maximum(np.sum(before < top_p, axis=-1, keepdims=True), 1)
    threshold = np.take_along_axis(desc, kept - 1, axis=-1)
    lp = np.where(x >= threshold, lp, -np.inf)
  p = np.exp(lp)
  return p / p.sum(axis=-1, keepdims=True)


def sampled_parity(dense, cond, temperature: float, top_p: float = 1.0,
                   *, chunk: int = 256) -> dict[str, float]:
  """Distances between the sampling distributions of two teacher-forced logits [.., V]
  (the positions where tokens were drawn): sample_tv_mean / sample_tv_max = total
  variation of the temperature + top-p distributions (any coupling of the two samplers
  disagrees at a step with probability >= its TV); sample_kl_mean = KL(dense || cond) of
  softmax(logits / temperature) (no nucleus, so finite)."""
  d, c = _pair(dense, cond)
  d = d.reshape(-1, d.shape[-1])
  c = c.reshape(-1, c.shape[-1])
  if d.shape[0] == 0:
    raise ValueError("logits have no positions: expected at least one.")
  tv = []
  for start in range(0, d.shape[0], chunk):
    p = sampling_probs(d[start:start + chunk], temperature, top_p)
    q = sampling_probs(c[start:start + chunk], temperature, top_p)
    tv.append(0.5 * np.abs(p - q).sum(axis=-1))
  tv = np.concatenate(tv)
  return {"sample_tv_mean": float(tv.mean()), "sample_tv_max": float(tv.max()),
          "sample_kl_mean": mean_kl(d / float(temperature), c / float(temperature),
                                    chunk=chunk)}


def logit_parity(dense, cond) -> dict[str, Any]:
  """Levels 1-3 of DESIGN.md §1 for one pair of teacher-forced logits."""
  return {
      "bitwise_frac": bitwise_fraction(dense, cond),
      "max_abs_logit_diff": max_abs_logit_diff(dense, cond),
      "max_ulp_diff": max_ulp_diff(dense, cond),
      "max_diff_scale_ulps": max_diff_in_scale_ulps(dense, cond),
      "mean_kl": mean_kl(dense, cond),
      "top1_agreement": top1_agreement(dense, cond),
  }


# ------------------------------------------------------------------ on the device

def row_parity(d, c):
  """Per-position parity numbers of float32 logits [..., V] (jax, traceable): bitwise,
  max ulp, max |d - c|, KL, top-1 equal, max |d|; `summarize_rows` reduces them."""
  bd = jax.lax.bitcast_convert_type(d, jnp.uint32)
  bc = jax.lax.bitcast_convert_type(c, jnp.uint32)
  bitwise = jnp.all(bd == bc, axis=-1)
  # ulps, sign-aware, in uint32 (the int64 distance of `max_ulp_diff` fits: <= 2**32 - 2)
  md, mc = bd & jnp.uint32(0x7FFFFFFF), bc & jnp.uint32(0x7FFFFFFF)
  same_sign = (bd >> 31) == (bc >> 31)
  ulp = jnp.max(jnp.where(same_sign, jnp.maximum(md, mc) - jnp.minimum(md, mc), md + mc),
                axis=-1)
  nan = jnp.any(jnp.isnan(d), -1) | jnp.any(jnp.isnan(c), -1)
  diff = jnp.where(d == c, 0.0, jnp.abs(d - c))
  max_abs = jnp.where(nan, jnp.nan, jnp.max(diff, axis=-1))
  top1 = jnp.argmax(d, axis=-1) == jnp.argmax(c, axis=-1)
  return bitwise, ulp, max_abs, _row_kl(d, c), top1, jnp.max(jnp.abs(d), axis=-1)


def _row_kl(d, c):
  """KL(softmax(d) || softmax(c)) per row, in float32 but without its cancellation:
  with w = exp(d - max d), E the w-weighted mean and delta = c - d - mu centred by its
  computed mean mu (KL ignores a shift of c), KL = log E[exp(delta)] - E[delta]
  = log1p(E[expm1(delta)]) - E[delta], both terms accurate to float32 rounding of
  E|delta| (the spread of c - d, not its size: a shifted copy reads ~0), where the direct
  sum p (log p - log q) loses ~1e-6 absolute to its two log-normalisers. Positions whose
  dense weight underflows (w = 0) still count in E[exp(delta)] (as exp(d - max d + delta):
  condensate may make a dead token likely). Rows whose logits are not all finite, or where
  a term would exceed e^CAP (the sum could overflow float32), use the direct formula
  (0 * log 0 = 0, like `mean_kl`)."""
  cap = 60.0     # V * e^60 stays finite in float32 for any vocabulary below 2^30
  m = jnp.max(d, axis=-1, keepdims=True)
  w = jnp.exp(d - m)
  live = w > 0
  total = jnp.sum(w, axis=-1, keepdims=True)
  mean = lambda x: jnp.sum(jnp.where(live, w * x, 0.0), axis=-1, keepdims=True) / total
  raw = c - d
  delta = raw - mean(raw)
  log_term = jnp.where(live, delta, d - m + delta)   # log of a dead position's exp term
  term = jnp.where(live, w * jnp.expm1(jnp.minimum(delta, cap)),
                   jnp.exp(jnp.minimum(log_term, cap)))
  kl = (jnp.log1p(jnp.sum(term, axis=-1, keepdims=True) / total) - mean(delta))[..., 0]
  lp = jax.nn.log_softmax(d, axis=-1)
  lq = jax.nn.log_softmax(c, axis=-1)
  p = jnp.exp(lp)
  direct = jnp.sum(jnp.where(p > 0, p * (lp - lq), 0.0), axis=-1)
  plain = (~jnp.all(jnp.isfinite(d), -1) | ~jnp.all(jnp.isfinite(c), -1)
           | jnp.any(log_term > cap, -1))
  return jnp.where(plain, direct, jnp.maximum(kl, 0.0))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _parity_rows(d, c, chunk: int):
  return jax.lax.map(lambda xy: row_parity(*xy), (d, c), batch_size=chunk)


def logit_parity_on_device(dense, cond, *, chunk: int = 256) -> dict[str, Any]:
  """`logit_parity` of two float32 logits [..., V] computed where they live (jax
  arrays; NumPy arrays are moved to the default device), `chunk` positions at a time.

  Equal to `logit_parity` for bitwise_frac, max_ulp_diff and top1_agreement; max_abs_
  logit_diff is its float32 rounding; mean_kl agrees to float32 accuracy (relative
  ~1e-6, absolute ~1e-12 for near-identical logits; tested against the float64 host
  version). Also "dense_max_abs_logit" (what the exactness gate's tolerance scales with).
  """
  for side, x in (("dense", dense), ("condensate", cond)):
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    if dtype != np.float32:
      raise ValueError(f"{side} logits dtype={dtype}: expected float32 (what models "
                       "return; the ulp and bitwise comparisons are defined on it).")
  d, c = jnp.asarray(dense), jnp.asarray(cond)
  if d.shape != c.shape:
    raise ValueError(f"logits: dense shape {d.shape} and condensate shape {c.shape}: "
                     "expected equal shapes.")
  if d.ndim < 1 or d.shape[-1] == 0 or d.size == 0:
    raise ValueError(f"logits.shape={d.shape}: expected [..., V] with V >= 1 and at "
                     "least one position.")
  if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk={chunk!r}: expected an int >= 1.")
  d, c = d.reshape(-1, d.shape[-1]), c.reshape(-1, c.shape[-1])
  return summarize_rows(_parity_rows(d, c, min(int(chunk), d.shape[0])))


def summarize_rows(rows) -> dict[str, Any]:
  """The `logit_parity` dict from `row_parity`'s per-position arrays (on the device;
  reduced there, a few numbers moved to the host), plus "dense_max_abs_logit"."""
  bitwise, ulp, max_abs, kl, top1, scale = rows
  n = bitwise.shape[0]
  host = jax.device_get({"bitwise": jnp.sum(bitwise), "ulp": jnp.max(ulp),
                         "max_abs": jnp.max(max_abs), "kl": jnp.sum(kl),
                         "top1": jnp.sum(top1), "scale": jnp.max(scale)})
  diff, scale = float(host["max_abs"]), float(host["scale"])
  scaled = (diff / float(np.spacing(np.float32(max(scale, np.finfo(np.float32).tiny))))
            if np.isfinite(diff) and np.isfinite(scale) else math.nan)
  return {
      "bitwise_frac": int(host["bitwise"]) / n,
      "max_abs_logit_diff": diff,
      "max_ulp_diff": int(host["ulp"]),
      "max_diff_scale_ulps": scaled,
      "mean_kl": max(float(host["kl"]) / n, 0.0),
      "top1_agreement": int(host["top1"]) / n,
      "dense_max_abs_logit": scale,
  }
