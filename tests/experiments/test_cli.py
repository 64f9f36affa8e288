"""The command line itself (two subprocess runs; everything else is tested in process)."""

import os
import subprocess
import sys

from experiments import cli


def _run(*args, env=None):
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cli.REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


def test_unknown_config_lists_the_available_ones():
  proc = _run("--config=no_such_experiment.py")
  assert proc.returncode == 2
  assert "unknown config 'no_such_experiment.py'" in proc.stderr
  assert "smoke.py" in proc.stderr and "smollm2_parity.py" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_hub_config_offline_fails_with_the_offline_options(tmp_path):
  proc = _run("--config=gpt2_parity.py", f"--workdir={tmp_path}",
              env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "smollm2_parity.py" in proc.stderr
  assert "--config.model.path=" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "results.jsonl").exists()


def test_bad_override_is_one_line():
  proc = _run("--config=smoke.py", "--config.attention.no_such_key=3")
  assert proc.returncode == 2
  assert "no_such_key" in proc.stderr and "Traceback" not in proc.stderr
