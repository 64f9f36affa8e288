"""The benchmarks' one timing method, and the measured device ceilings.

`time_loop(fn, q, args, iterations, repeats)` times fn(q, *args) as a model's layers run
it: ONE jitted `lax.fori_loop` of `iterations` calls (`chained_loop`), timed on the host
clock from dispatch to `block_until_ready`. The loop carries q and adds 1e-3 * (sum of
every numeric output leaf, integer block lists and ids included) to q's first row, so no
call or part of one can be hoisted out of the loop or dead-code eliminated, and every
method pays the same extra read of its outputs. What a sample is, then: (one loop's wall
time) / iterations = the device time of one call + that carry update (one sum over the
outputs and an add on q[:, :1]) + the loop's share of one dispatch and sync; host
dispatch per call is not in it (the calls run inside one program). The first loop
compiles and warms up (`warmup` loops, untimed); the result is the median over `repeats`
timed loops.

`profile` (experiments.bench.profile) runs the same chained loop, unrolled, under the
profiler: it answers where a step's microseconds go; the wall-clock speed is time_loop's.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def chained_loop(fn, iterations: int, unroll: bool = False):
  """jit(loop)(q, *args): `iterations` calls of fn(q, *args) in one program; each call's
  outputs (every numeric leaf, integer block lists too) feed the next call's q, so no
  call can be hoisted or dead-code eliminated. unroll=True: straight-line code."""

  @jax.jit
  def loop(q, *args):
    def body(_, q):
      res = fn(q, *args)
      dep = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree_util.tree_leaves(res)
                if jnp.issubdtype(x.dtype, jnp.number))
      dep = jnp.where(jnp.isfinite(dep), dep, 0.0)
      return q.at[:, :1].add((1e-3 * dep).astype(q.dtype))
    return jax.lax.fori_loop(0, iterations, body, q, unroll=bool(unroll))

  return loop


def time_loop(fn, q, args, iterations, repeats, unroll=False, warmup=1):
  """(median, samples): seconds per call of fn(q, *args) -> out (or a tuple / pytree),
  each sample one `chained_loop` of `iterations` calls / iterations (see the module
  docstring for what that includes), after `warmup` untimed loops (the first compiles).

  unroll=True unrolls the loop into straight-line code (no per-iteration loop
  bookkeeping, as in a model whose layers are unrolled)."""
  loop = chained_loop(fn, iterations, unroll)
  for _ in range(max(1, warmup)):
    jax.block_until_ready(loop(q, *args))          # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(q, *args))
    times.append((time.perf_counter() - t0) / iterations)
  return statistics.median(times), times


def measure_ceilings(repeats=5):
  """Measured elementwise read+write bandwidth (bytes/s) and bf16 matmul rate (FLOP/s)."""
  n = 1 << 29   # 1 GiB of bf16
  x = jnp.ones((n,), jnp.bfloat16)
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 10, lambda _, y: y * 1.0001 + 1e-3, x))
  jax.block_until_ready(f(x))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    ts.append((time.perf_counter() - t0) / 10)
  bw = 2 * 2 * n / statistics.median(ts)
  m = 8192
  a = jnp.ones((m, m), jnp.bfloat16) * 0.01
  g = jax.jit(lambda a: jax.lax.fori_loop(
      0, 10, lambda _, y: jnp.dot(y, a, preferred_element_type=jnp.float32).astype(
          jnp.bfloat16), a))
  jax.block_until_ready(g(a))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(g(a))
    ts.append((time.perf_counter() - t0) / 10)
  del x, a
  return bw, 2 * m**3 / statistics.median(ts)
