"""cj.distributed on 8 virtual CPU devices (issue #17): cases_8_devices.py in a fresh
process (the device count is fixed when jax starts)."""

import os
import pathlib
import subprocess
import sys

CASES = pathlib.Path(__file__).with_name("cases_8_devices.py")
REPO = pathlib.Path(__file__).resolve().parents[3]


def test_distributed_cases_on_8_cpu_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}" + os.environ.get(
                 "PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p",
                        "no:cacheprovider", str(CASES)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
  assert " passed" in res.stdout and "failed" not in res.stdout, res.stdout[-2000:]
