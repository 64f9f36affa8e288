"""Platform parameterisation and tolerances shared by the kernel tests
(tests/pallas_kernels) and the end-to-end Pallas tests.

On CPU the kernels run in Pallas interpret mode (Triton kernels: generic interpret; Mosaic
kernels: TPU interpret mode); on a GPU the Triton kernels are compiled; on a TPU the
Mosaic kernels are compiled. The same test files run everywhere. Import the names
(`from tests.conftest import KERNELS, assert_close`).
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PLATFORM = jax.default_backend()
if PLATFORM == "gpu":
  KERNELS = (("triton", False),)
elif PLATFORM == "tpu":
  KERNELS = (("mosaic_tpu", False),)
else:
  KERNELS = (("triton", True), ("mosaic_tpu", True))

# Per-dtype tolerance (atol = rtol) against a float32 Precision.HIGHEST reference.
TOLERANCE = {"float32": 2e-6, "bfloat16": 1e-2, "float16": 5e-4}


def kernels(*implementations):
  """The (implementation, interpret) pairs of KERNELS that an op has (e.g. "triton")."""
  return tuple(kv for kv in KERNELS if kv[0] in implementations)


def assert_close(actual, expected, dtype, what):
  """|actual - expected| <= tol (1 + |expected|) with tol = TOLERANCE[dtype]; infinities
  must match exactly; NaN in actual fails."""
  tol = TOLERANCE[jnp.dtype(dtype).name]
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  assert a.shape == e.shape, (what, a.shape, e.shape)
  same_inf = np.isinf(e) & (a == e)
  with np.errstate(invalid="ignore"):
    err = np.where(same_inf, 0.0, np.abs(a - e))
  err = np.where(np.isnan(err), np.inf, err)
  bound = tol + tol * np.where(np.isinf(e), 0.0, np.abs(e))
  assert not np.any(np.isnan(a)), f"{what}: NaN in output"
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert np.all(err <= bound), (
      f"{what}: max |err| {err.max():.3g} exceeds {tol} (+rel) at {worst}: "
      f"{a[worst]} vs {e[worst]}")


@pytest.fixture
def smoke_config():
  """The smoke config (configs/smoke.py), unlocked, so tests may adjust it."""
  from experiments import cli
  return cli.load_config("smoke.py")


@pytest.fixture
def on_cpu_unless_tpu():
  """TPU interpret mode runs on the CPU device (also on a GPU host); a TPU compiles."""
  if PLATFORM == "tpu":
    yield
  else:
    with jax.default_device(jax.devices("cpu")[0]):
      yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops JAX's compiled executables after each test module. Every XLA:CPU executable
  holds a few memory maps of JIT code (about 3), kept as long as JAX caches it; the whole
  suite compiles enough programs to pass the kernel's vm.max_map_count (65530), where
  LLVM's JIT then segfaults inside a compile (seen twice, at ~40% of the suite, in the
  first compile of whichever test came next). Module by module the count stays bounded."""
  yield
  try:
    with open("/proc/self/maps") as f:
      maps = sum(1 for _ in f)
  except OSError:         # not Linux: clear every time
    maps = None
  if maps is None or maps > 20000:   # well below the limit; clearing costs recompiles
    jax.clear_caches()
    gc.collect()
