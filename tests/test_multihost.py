"""Multi-host: 2 processes on localhost (CPU, gloo collectives) train the same model, and the same
vmapped detection population, as 1 process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, process_env
from jaxbd.train import Checkpointer

# One epoch: the 2 processes sum their gradients in another order than 1 process does, and that
# round-off (about 1e-7 of a parameter after one epoch) grows as training goes on, by how much
# depends on the CPU (up to 1e-3 of a BatchNorm statistic after three epochs on some).
ARGS = ["--config=configs/quickstart.py", "--config.train.epochs=1",
        "--config.standard.train_clean=false"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, *extra, devices=1, args=tuple(ARGS)):
  return subprocess.Popen([sys.executable, "-m", "jaxbd.main", *args, f"--workdir={workdir}",
                           *extra], cwd=REPO, env=process_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc):
  """(stdout, stderr) of a launched run that succeeded."""
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out, err


def test_two_processes_equal_one_process(tmp_path):
  """Data parallel over 2 processes x 1 CPU device = 1 process with 1 device (to 1e-5); process
  0 alone prints the progress lines and the table."""
  port = free_port()
  multi = tmp_path / "multi"
  single = tmp_path / "single"
  procs = [launch(multi, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}") for i in range(2)] + [launch(single)]  # side by side
  (out0, err0), (out1, err1), (out_single, _) = (finish(p) for p in procs)
  assert "| backdoored |" in out_single and out_single in out0  # gloo logs to stdout too
  assert "backdoored epoch 1/1:" in err0
  assert "| model |" not in out1 and "epoch" not in err1

  a = Checkpointer(str(multi / "checkpoints" / "backdoored")).restore(1)
  b = Checkpointer(str(single / "checkpoints" / "backdoored")).restore(1)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  m_multi = json.loads((multi / "results.json").read_text())
  m_single = json.loads((single / "results.json").read_text())
  assert m_multi["versions"]["devices"] == "2 x cpu"
  assert m_single["versions"]["devices"] == "1 x cpu"
  assert m_multi["metrics"] == m_single["metrics"]


# 1 clean + 1 backdoored 8-wide CNN on the digits, trained under one vmapped step, scored by NC.
POPULATION = ["--config=configs/detection.py:clean=1,backdoored=1", "--config.data.source=digits",
              "--config.data.train_limit=0", "--config.data.test_limit=0",
              "--config.model.name=cnn", "--config.model.cnn.width=8",
              "--config.model.cnn.stages=2", "--config.poison.badnets.size=2",
              "--config.train.epochs=2", "--config.train.batch_size=64",
              "--config.train.lr=0.05", "--config.train.schedule_unit=epoch",
              "--config.train.checkpoint_every=0",
              "--config.train.eval_every=0", "--config.defense.clean_fraction=0.1",
              "--config.detection.attacks=badnets", "--config.detection.scorers=nc",
              "--config.detection.nc.epochs=1", "--config.detection.vmap=true",
              "--config.log.progress=false"]


def test_a_vmapped_population_split_over_two_processes_equals_one_process(tmp_path):
  """The two members of a vmapped population split over 2 processes x 1 CPU device (each trains
  one; they checkpoint and score them together) = 1 process training both."""
  multi, single = tmp_path / "multi", tmp_path / "single"
  port = free_port()
  procs = [launch(multi, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", args=POPULATION) for i in range(2)]
  outs = [finish(p)[0] for p in [*procs, launch(single, args=POPULATION)]]  # side by side
  assert "| nc |" in outs[0] and "| nc |" not in outs[1]
  doc, expected = (json.loads((w / "results.json").read_text()) for w in (multi, single))
  assert doc["versions"]["devices"] == "2 x cpu"
  assert doc["timing"]["member_splits"] == [[2, 1]]  # each process trains one member
  assert expected["timing"]["member_splits"] == [[1, 1]]
  for got, want in zip(doc["metrics"]["members"], expected["metrics"]["members"], strict=True):
    assert {k: got[k] for k in ("index", "acc", "asr", "ra")} == {
        k: want[k] for k in ("index", "acc", "asr", "ra")}
    # NC's masks follow the models' float32 logits, which the layouts round differently.
    assert got["nc"]["norms"] == pytest.approx(want["nc"]["norms"], rel=1e-5)
  assert doc["detection"]["nc"]["auc"] == expected["detection"]["nc"]["auc"]
  assert sorted(os.listdir(multi / "checkpoints")) == ["population0"]
