"""One layer's causal prefill of selection="exact" / "indexed" on the models' fast path
(`models.fast_path.spec_prefill`: the specification in query chunks) with its top-k
selections by XLA's `lax.top_k` ("xla") and by the Pallas kernel ("pallas_select"),
beside dense causal prefill (cuDNN on a GPU), timed in the same run on the same inputs.

  python -m experiments.bench.prefill_select                   # the shapes below
  python -m experiments.bench.prefill_select --shapes=smollm2_8k --repeats=2

Shapes: one SmolLM2-135M layer (9 q / 3 kv heads, d 64) at 2K and 8K prompts, one Gemma 3
270M layer (4 q / 1 kv heads, d 256) at 8K and 32K; specs as model_bench's (anchor 16,
window 64, top_k 1024, 4-bit index, candidates 4 * top_k). bf16, B = 1, keys with a
shared offset and outlier channels (`indexed_step.inputs`), each query half its own key
plus noise.

Before any time is printed: "same_sets" (the selection functions with and without the
kernel on one scores array, the last query chunk's: the same set bit for bit; False exits
with status 1), "bitwise" (the two prefills' outputs equal bit for bit: so on a CPU; on a
GPU XLA may fuse the same code differently in the two programs) and "out_ulps" (their
largest difference, in ulps of the output dtype).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import condensate_jax as cj
from condensate_jax.models import fast_path
from experiments.bench import indexed_step, tables, timing

SHAPES = {
    # name: (T = S, Hq, Hkv, D)
    "smollm2_2k": (2048, 9, 3, 64),
    "smollm2_8k": (8128, 9, 3, 64),
    "gemma3_8k": (8192, 4, 1, 256),
    "gemma3_32k": (32704, 4, 1, 256),
}
SPECS = {
    "exact": cj.CondensateSpec(anchor=16, window=64, top_k=1024),
    "indexed": cj.CondensateSpec(anchor=16, window=64, top_k=1024, selection="indexed",
                                 index_bits=4),
}
IMPLEMENTATIONS = ("xla", "pallas_select")
COLUMNS = ["shape", "spec", "same_sets", "bitwise", "out_ulps", "xla_ms",
           "pallas_select_ms", "speedup", "dense_ms"]


def same_sets(q, k, spec, lengths, scale):
  """The last chunk's sets with lax.top_k and with the kernel, on one scores array."""
  from condensate_jax import geometry, softmax   # pylint: disable=import-outside-toplevel
  from condensate_jax.impl import pallas_select, xla_indexed  # pylint: disable=import-outside-toplevel
  from condensate_jax.selection import exact     # pylint: disable=import-outside-toplevel
  from condensate_jax.selection import index as index_lib  # pylint: disable=import-outside-toplevel
  t_len = q.shape[1]
  c = min(fast_path.PREFILL_CHUNK, t_len)
  qc = q[:, t_len - c:]
  pos = jnp.arange(t_len - c, t_len, dtype=jnp.int32)[None]
  top = pallas_select.top_fn

  @jax.jit
  def sets(qc, k):
    lo, hi = geometry.visible_range(pos, lengths, causal=True, sliding_window=None)
    scores = softmax.scores(qc, k, scale)
    if spec.selection == "exact":
      return [exact.select(scores, lo, hi, spec, top_fn=f).in_set for f in (None, top)]
    index = index_lib.build(k, lengths, spec.index_bits)
    return [xla_indexed.select(scores, qc, index, lo, hi, spec, scale, f).in_set
            for f in (None, top)]

  a, b = sets(qc, k)
  return bool(jnp.array_equal(a, b))


def _int_bits(x):
  """A float array's bits as signed ints of its width, on the host."""
  width = {2: jnp.int16, 4: jnp.int32}[x.dtype.itemsize]
  return np.asarray(jax.lax.bitcast_convert_type(x, width)).astype(np.int64)


def _ulps(a, b):
  """Largest difference of two same-dtype float arrays in ulps (sign-magnitude bits
  mapped to one monotone integer line)."""
  def line(x):
    u = _int_bits(x)
    return np.where(u < 0, -(u & np.int64(2 ** (8 * x.dtype.itemsize - 1) - 1)), u)
  return int(np.max(np.abs(line(a) - line(b))))


def run_shape(name, specs, iterations, repeats):
  t_len, hq, hkv, d = SHAPES[name]
  _, k, v = indexed_step.inputs(t_len, hq, hkv, d)
  # queries: each the key at its position (its group's) plus noise, so that scores peak
  # near the diagonal as well as at the keys' shared offset and outlier channels
  noise = np.random.default_rng(2).standard_normal((1, t_len, hq, d)).astype(np.float32)
  q = jnp.asarray(0.5 * np.repeat(np.asarray(k, np.float32), hq // hkv, axis=2) + noise,
                  jnp.bfloat16)
  lengths = jnp.full((1,), t_len, jnp.int32)
  scale = d ** -0.5
  time = lambda fn, args: timing.time_loop(fn, q, args, iterations, repeats)[0] * 1e3
  dense = jax.jit(lambda q, k, v: fast_path.dense_prefill(q, k, v, scale=scale))
  dense_ms = time(dense, (k, v))
  rows = []
  for spec_name in specs:
    spec = SPECS[spec_name]
    fns = {impl: jax.jit(lambda q, k, v, impl=impl: fast_path.spec_prefill(
        q, k, v, spec, lengths, scale=scale, implementation=impl))
           for impl in IMPLEMENTATIONS}
    outs = [jax.block_until_ready(fns[i](q, k, v)) for i in IMPLEMENTATIONS]
    row = {"shape": name, "spec": spec_name,
           "same_sets": same_sets(q, k, spec, lengths, scale),
           "bitwise": bool(np.array_equal(*map(_int_bits, outs))),
           "out_ulps": _ulps(*outs),
           "dense_ms": dense_ms}
    for impl in IMPLEMENTATIONS:
      row[f"{impl}_ms"] = time(fns[impl], (k, v))
    row["speedup"] = row["xla_ms"] / row["pallas_select_ms"]
    print(row, flush=True)
    rows.append(row)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--specs", default=",".join(SPECS))
  ap.add_argument("--iterations", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args(argv)
  names = tables.names_arg("--shapes", a.shapes, SHAPES)
  specs = tables.names_arg("--specs", a.specs, SPECS)
  tables.check_loops(a.iterations, a.repeats)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows = [r for x in names for r in run_shape(x, specs, a.iterations, a.repeats)]
  print("| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS))
  for r in rows:
    print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                            for c in COLUMNS) + " |")
  return 0 if all(r["same_sets"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
