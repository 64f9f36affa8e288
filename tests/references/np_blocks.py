"""Independent float64 NumPy reference of block-summary selection ("blocks", "certified").

Plain loops from the definition (condensate_jax/impl/xla_blocks.py docstring), sharing no code
with condensate_jax: block bounds in the elementwise form
U_b = scale * sum_d max(q_d * min_bd, q_d * max_bd) over the keys < kv_length of block b,
the GQA group orders blocks by max over its heads of U_hb - max_b' U_hb' (ties to the
lower block), and
  blocks:    expands the first M blocks holding middle keys (rank="centre": blocks
             ordered by the centre score scale * q.(min + max) / 2 the same way; the
             certificate still sums n_b e^{U_b} over the blocks left out);
  certified: expands until every head's bound delta / (Z_C + delta) <= epsilon.
"""

from __future__ import annotations

import numpy as np

from tests.references.np_reference import visible_keys


def reference(q, k, v, *, anchor, window, block_size, mode, top_blocks=0, epsilon=0.0,
              kv_lengths=None, causal=True, sliding_window=None, rank="bound"):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  p = block_size
  scale = 1.0 / np.sqrt(d)
  kv_lengths = np.full(b, s) if kv_lengths is None else np.asarray(kv_lengths)
  out = np.zeros((b, t, hq, d))
  bound = np.zeros((b, hq, t))
  set_size = np.zeros((b, hq, t), int)
  crossing = np.zeros((b, hq, t))   # certified: how close the stop was to epsilon
  for bi in range(b):
    for ti in range(t):
      pos = kv_lengths[bi] - t + ti
      vis = visible_keys(pos, kv_lengths[bi], causal, sliding_window)
      fixed = set(vis[:anchor]) | set(vis[max(len(vis) - window, 0):] if window else [])
      middle = [j for j in vis if j not in fixed]
      for kh in range(hkv):
        heads = range(kh * g, kh * g + g)
        blocks = sorted({j // p for j in middle})
        u, cen = {}, {}
        for h in heads:
          for blk in blocks:
            keys = k[bi, blk * p:min(blk * p + p, kv_lengths[bi]), kh]
            lo, hi = keys.min(0), keys.max(0)
            u[h, blk] = scale * np.sum(np.maximum(q[bi, ti, h] * lo, q[bi, ti, h] * hi))
            cen[h, blk] = scale * np.sum(q[bi, ti, h] * (lo + hi) / 2)
        rk = cen if rank == "centre" else u
        best = {h: max(rk[h, blk] for blk in blocks) for h in heads}
        order = sorted(blocks, key=lambda blk: (-max(rk[h, blk] - best[h] for h in heads),
                                                blk))
        n_mid = {blk: sum(1 for j in middle if j // p == blk) for blk in blocks}
        sc = {h: scale * k[bi, :, kh] @ q[bi, ti, h] for h in heads}

        def certificate(h, r):
          chosen = sorted(fixed) + [j for j in middle if j // p in order[:r]]
          z = np.sum(np.exp(sc[h][chosen])) if chosen else 0.0
          delta = sum(n_mid[blk] * np.exp(u[h, blk]) for blk in order[r:])
          return (delta / (z + delta) if delta > 0 else 0.0), chosen

        if mode == "blocks":
          r = min(top_blocks, len(order))
        else:
          r = 0
          while r < len(order) and max(certificate(h, r)[0] for h in heads) > epsilon:
            r += 1
        for h in heads:
          eps, chosen = certificate(h, r)
          w = np.exp(sc[h][chosen] - sc[h][chosen].max()) if chosen else np.zeros(0)
          out[bi, ti, h] = (w @ v[bi, chosen, kh]) / w.sum() if chosen else 0.0
          bound[bi, h, ti] = eps
          set_size[bi, h, ti] = len(chosen)
          if mode == "certified" and r > 0:
            crossing[bi, h, ti] = max(certificate(hh, r - 1)[0] for hh in heads) / epsilon
  return out, bound, set_size, crossing
