"""Multi-host: 2 processes on localhost (CPU, gloo collectives) train the same model as 1
process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO
from jaxbd.train import Checkpointer

ARGS = ["--config=configs/quickstart.py", "--config.train.epochs=3",
        "--config.standard.train_clean=false", "--config.log.progress=false"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, *extra, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "jaxbd.main", *ARGS, f"--workdir={workdir}",
                           *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


def test_two_processes_equal_one_process(tmp_path):
  """Data parallel over 2 processes x 1 CPU device = 1 process with 1 device (to 1e-5)."""
  port = free_port()
  multi = tmp_path / "multi"
  single = tmp_path / "single"
  procs = [launch(multi, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}") for i in range(2)] + [launch(single)]  # side by side
  outs = [finish(p) for p in procs]
  assert "| backdoored |" in outs[0]

  a = Checkpointer(str(multi / "checkpoints" / "backdoored")).restore(3)
  b = Checkpointer(str(single / "checkpoints" / "backdoored")).restore(3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  m_multi = json.loads((multi / "results.json").read_text())
  m_single = json.loads((single / "results.json").read_text())
  assert m_multi["versions"]["devices"] == "2 x cpu"
  assert m_single["versions"]["devices"] == "1 x cpu"
  assert m_multi["metrics"] == m_single["metrics"]
