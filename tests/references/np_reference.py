"""An independent float64 NumPy implementation of condensate attention (DESIGN.md §1).

Written as plain loops over (batch, head, query) straight from the definition, sharing no
code with condensate_jax, so the library is checked against the math and not against itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class RefResult:
  out: np.ndarray            # [B, T, Hq, D] float64
  in_set: np.ndarray         # [B, Hq, T, S] bool
  visible: np.ndarray        # [B, Hq, T, S] bool
  captured: np.ndarray       # [B, Hq, T]
  ambiguous: np.ndarray      # [B, Hq, T] bool: top-k boundary within `tie_tol` of a tie


def visible_keys(pos, kv_len, causal, sliding_window):
  hi = min(pos, kv_len - 1) if causal else kv_len - 1
  lo = 0
  if sliding_window is not None:
    lo = max(0, pos - sliding_window + 1)
    if not causal:
      hi = min(hi, pos + sliding_window - 1)
  return list(range(lo, hi + 1))


def condensate_set(scores_row, vis, anchor, window, top_k):
  """Returns (set of positions, ambiguity gap) for one query head."""
  anchor_set = vis[:anchor]
  window_set = vis[max(len(vis) - window, 0):] if window else []
  fixed = set(anchor_set) | set(window_set)
  middle = [j for j in vis if j not in fixed]
  ranked = sorted(middle, key=lambda j: (-scores_row[j], j))  # ties -> lower position
  chosen = ranked[:top_k]
  gap = np.inf
  if 0 < top_k < len(ranked):
    gap = scores_row[ranked[top_k - 1]] - scores_row[ranked[top_k]]
  return fixed | set(chosen), gap


def condensate_reference(q, k, v, *, anchor, window, top_k, causal=True, q_positions=None,
                         kv_lengths=None, sliding_window=None, scale=None,
                         tie_tol=1e-4) -> RefResult:
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  kv_lengths = np.full(b, s) if kv_lengths is None else np.asarray(kv_lengths)
  if q_positions is None:
    q_positions = kv_lengths[:, None] - t + np.arange(t)[None, :]
  q_positions = np.asarray(q_positions)
  out = np.zeros((b, t, hq, d))
  in_set = np.zeros((b, hq, t, s), bool)
  visible = np.zeros((b, hq, t, s), bool)
  captured = np.ones((b, hq, t))
  ambiguous = np.zeros((b, hq, t), bool)
  for bi in range(b):
    for h in range(hq):
      kh = h // group
      for ti in range(t):
        vis = visible_keys(int(q_positions[bi, ti]), int(kv_lengths[bi]), causal,
                           sliding_window)
        if not vis:
          continue
        scores = np.full(s, -np.inf)
        scores[vis] = k[bi, vis, kh, :] @ q[bi, ti, h, :] * scale
        chosen, gap = condensate_set(scores, vis, anchor, window, top_k)
        ambiguous[bi, h, ti] = gap < tie_tol * max(1.0, abs(scores[vis]).max())
        idx = np.array(sorted(chosen), dtype=np.int64)
        in_set[bi, h, ti, idx] = True
        visible[bi, h, ti, vis] = True
        if not len(idx):       # an empty set (anchor = window = top_k = 0): output 0
          captured[bi, h, ti] = 0.0
          continue
        m = scores[vis].max()
        w_all = np.exp(scores[vis] - m)
        w = np.exp(scores[idx] - m)
        captured[bi, h, ti] = w.sum() / w_all.sum()
        out[bi, ti, h] = (w[:, None] * v[bi, idx, kh, :]).sum(0) / w.sum()
  return RefResult(out, in_set, visible, captured, ambiguous)
