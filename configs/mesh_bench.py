"""python -m experiments.run --config=mesh_bench.py --workdir=runs/mesh_bench

Sharded decode latency over 1, 2, 4, ... devices (issues #17, #18): one decode query per
row over S keys split along the sequence (`cj.distributed`), dense and condensate exact
top-k (anchor 16, window 64, top_k 1024), B = 1 and 8, each time beside its max
difference from the one-device call (up to `check_max_keys`) and the bytes its
collectives move per call. Job: experiments/bench/mesh_bench.py.

Sizes: `full` (GPUs, bf16; 32 q / 8 kv heads, d = 128): 128K, 512K, 1M keys on every
device count present; `smoke`: tiny shapes on anything (CPU with
XLA_FLAGS=--xla_force_host_platform_device_count=8: the wiring, not the speed).
Not run on several GPUs yet (issue #18: no multi-GPU machine lent so far).
"""

import ml_collections

from configs import common

K = 1024


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": ("full", "smoke")})
  size = args.get("size", "full")
  config = ml_collections.ConfigDict()
  config.name = f"mesh_bench-{size}"
  config.job = "mesh_bench"
  config.seed = 0
  config.devices = ()                     # () = 1, 2, 4, ... up to the devices present
  config.lengths = (128 * K, 512 * K, 1024 * K) if size == "full" else (1024, 4096)
  config.batches = (1, 8) if size == "full" else (1, 2)
  config.q_heads, config.kv_heads, config.head_dim = (32, 8, 128) if size == "full" else (
      4, 2, 16)
  config.dtype = "bfloat16" if size == "full" else "float32"
  config.attention = ml_collections.ConfigDict()
  config.attention.anchor, config.attention.window = 16, 64
  config.attention.top_k = 1024 if size == "full" else 64
  config.iterations = 20 if size == "full" else 2
  config.repeats = 5 if size == "full" else 1
  config.check_max_keys = 128 * K if size == "full" else 4096
  config.plots = False
  return config
