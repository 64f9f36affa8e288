"""python -m experiments.run --config=fast_bench.py --workdir=runs/fast_bench

Fast path (block selection, DESIGN.md §4): condensate decode (selection="blocks": block
summaries -> top-M blocks per GQA group -> split-K Pallas kernel) and block-sparse causal
prefill against cuDNN and XLA dense on one GPU, in one run, selection included; beside
each: the physical floor (bytes / measured bandwidth, FLOPs / measured matmul rate) and
parity on the same inputs (captured mass, certified eps, max |o - o_cudnn|).

Runtime on one H100/H200: `cases=full` about 10 minutes (mostly compilation and the
1M-key cases); `cases=decode` / `cases=prefill` part each; `cases=quick` about 2 minutes;
`cases=smoke` runs tiny cases anywhere (CPU: interpret mode, timings meaningless);
`cases=parity,timing=false` computes the parity columns of the 128K decode and 8K/32K
prefill rows only (CPU, 24 GB: about 5 minutes; 1M rows need more host memory).
Expected result: see BENCHMARKS.md "## Fast path (block selection)". Job:
experiments/bench/fast_bench.py; a cut-short run's table and per-kernel profiles of one
step: `python -m experiments.bench.profile` (table RESULTS.jsonl | decode ... | prefill ...).

Inputs: topic-structured synthetic q/k/v (experiments/bench/synthetic.py: contiguous key
segments around random topic vectors, each query aimed at 2 segments; parameters in
`data` below, printed with every row); one Gaussian decode row for contrast (flat
attention: block selection is lossy there).
Shapes: decode 32 q / 8 kv heads, prefill 32 heads, d=128, bf16 (DESIGN.md §5).
"""

import ml_collections

from configs import common

K = 1024


def _dec(s, b=1, p=64, m=64, method="rank", inputs="topic", rank="bound", kernel="fused"):
  """A decode row; default the lean step (rank selection, fused kernels: 5 Pallas
  kernels per step)."""
  return dict(op="decode", batch=b, kv_len=s * K, block_size=p, top_blocks=m,
              method=method, inputs=inputs, rank=rank, kernel=kernel)


def _split(s, **kw):
  """The first run's step: superblock top-M in XLA, split-K kernel, XLA merge and eps."""
  return _dec(s, **{"method": "superblock", "kernel": "split", **kw})


def _pre(s, p=64, m=16):
  return dict(op="prefill", batch=1, kv_len=s * K, block_size=p, top_blocks=m)


_DECODE = [_dec(s, b) for b in (1, 8) for s in (8, 32, 128, 512, 1024)]
_VARIANTS = [_split(128, method="top_k"), _split(1024, method="top_k"),
             _dec(128, p=128, m=32), _dec(1024, p=128, m=32), _dec(128, m=16),
             _dec(1024, m=16)]
_GAUSS = [_dec(128, inputs="gaussian")]
_PREFILL = [_pre(s) for s in (8, 32, 128)]
_PREFILL_1M = [_pre(1024)]
_CASES = {
    "full": _DECODE + _VARIANTS + _GAUSS + _PREFILL + _PREFILL_1M,
    "decode": _DECODE + _VARIANTS + _GAUSS,
    "prefill": _PREFILL + _PREFILL_1M,
    # the grid ordered by importance (a run cut short keeps the key rows)
    "ordered": [_dec(128), _dec(1024), _dec(128, p=128, m=32), _dec(1024, p=128, m=32),
                _dec(128, rank="centre"), _dec(1024, p=128, m=32, rank="centre"),
                _PREFILL[2], _dec(128, b=8), _dec(1024, b=8), _dec(8), _dec(32),
                _dec(512), _PREFILL[0], _PREFILL[1], _GAUSS[0], _VARIANTS[4],
                _VARIANTS[5], _split(128), _split(1024), _split(128, p=128, m=32),
                _split(1024, p=128, m=32), _dec(8, b=8), _dec(32, b=8), _dec(512, b=8)],
    # the lean decode step beside the split path of the first run
    "fused": [_dec(128), _dec(1024), _dec(128, p=128, m=32), _dec(1024, p=128, m=32),
              _split(128), _split(1024), _split(128, p=128, m=32),
              _split(1024, p=128, m=32), _dec(128, b=8)],
    # causal prefill at 1M keys (cuDNN alone takes ~1 minute of the run)
    "long": _PREFILL_1M,
    "quick": [_dec(8), _dec(128), _dec(1024), _PREFILL[0]],
    # blocks ranked by the centre score q.c_b instead of the bound (eps still certified)
    "centre": [_dec(128, rank="centre"), _dec(1024, rank="centre"),
               _dec(1024, p=128, m=32, rank="centre"), _dec(128, b=8, rank="centre")],
    # parity-only rows cheap enough for a CPU (with timing=false)
    "parity": [_dec(128), _dec(128, p=128, m=32), _dec(128, m=16), _GAUSS[0],
               _dec(128, rank="centre"), _PREFILL[0], _PREFILL[1]],
    "smoke": [dict(op="decode", batch=2, kv_len=256, block_size=16, top_blocks=2,
                   method="chunked"),
              dict(op="decode", batch=2, kv_len=256, block_size=16, top_blocks=2,
                   method="rank", kernel="fused"),
              dict(op="prefill", batch=1, kv_len=64, block_size=16, top_blocks=1)],
}


def get_config(arg=None):
  args = common.parse_arg(arg, {"cases": tuple(_CASES), "timing": ("true", "false"),
                                "loop": ("fori", "unrolled")})
  name = args.get("cases", "full")
  config = ml_collections.ConfigDict()
  config.name = f"fast_bench_{name}"
  config.job = "fast_bench"
  config.seed = 0
  config.cases = tuple(_CASES[name])
  config.q_heads, config.kv_heads, config.head_dim = 32, 8, 128
  config.prefill_heads = 32
  config.anchor, config.window = 16, 64
  config.data = dict(segment=256, topic_norm=1.0, key_noise=0.1, query_topics=2,
                     query_gain=2.0, query_noise=0.3)
  # experiments.bench.timing.time_loop: median over `repeats` jitted loops of `iterations`
  # chained calls (prefill above 16K keys: `prefill_iterations`); XLA dense prefill only
  # up to prefill_xla_max keys (T x S scores)
  config.iterations, config.prefill_iterations, config.repeats = 20, 5, 5
  # timing=false: parity only (any backend, e.g. CPU): no timing, no floors' ceilings
  config.timing = args.get("timing", "true") == "true"
  # loop=unrolled: decode loops unrolled into straight-line code (as a model's layers:
  # no per-iteration loop bookkeeping; dense timed the same way); prefill stays looped
  config.unroll = args.get("loop", "fori") == "unrolled"
  config.prefill_xla_max = 16 * K
  # prefill at >= prefill_long keys (cuDNN takes ~15 s per 1M call): 1 call per loop,
  # median of long_repeats loops
  config.prefill_long, config.long_repeats = 512 * K, 3
  if name == "smoke":
    config.q_heads, config.kv_heads, config.head_dim, config.prefill_heads = 4, 2, 32, 2
    config.data.segment = 32
    config.iterations, config.prefill_iterations, config.repeats = 2, 1, 2
  return config
