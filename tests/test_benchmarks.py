"""The benchmark scripts run end to end on CPU at small sizes and print their figures."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def script_env(**extra):
  """The environment of a script run: one CPU device, the repository importable."""
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)


def script(name, *args, timeout=600):
  proc = subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, env=script_env(),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_bench_train_reports_step_and_epoch_throughput(tmp_path):
  out = script("bench_train.py", "--model=cnn", "--width=4", "--num_train=128", "--steps=2",
               "--batch_sizes=32", f"--out={tmp_path / 'b.json'}")
  assert "| 32 |" in out
  row = json.loads((tmp_path / "b.json").read_text())["results"][0]
  assert row["step_images_per_second"] > 0 and row["epoch_images_per_second"] > 0
  assert row["step_tflops_per_second"] > 0  # XLA's cost analysis gave the step's FLOPs


@pytest.mark.slow
def test_compare_pytorch_prints_ratios(tmp_path):
  pytest.importorskip("torch")
  out = script("compare_pytorch.py", "--num_train=128", "--batch_sizes=32", "--steps=2",
               "--width=4", "--workers=1", "--variants=eager,bf16", "--dtypes=float32",
               "--moe_models=pmoe", "--moe_widen=1", f"--out={tmp_path / 'c.json'}")
  assert "ratio train step, jaxbd best / PyTorch eager fp32:" in out
  assert "ratio full epoch, jaxbd best / PyTorch eager DataLoader:" in out
  doc = json.loads((tmp_path / "c.json").read_text())
  row = doc["rows"][0]
  assert set(row["torch_step"]) == {"eager", "bf16"} and set(row["jax"]) == {"float32"}
  assert row["torch_epoch"]["eager"] > 0
  assert "MoE train step (jaxbd)" in out
  moe = {r["dtype"]: r for r in doc["moe"]}
  assert set(moe) == {"float32"} and moe["float32"]["model"] == "pmoe"
  assert moe["float32"]["step_images_per_second"] > 0 and moe["float32"]["params"] > 0
  assert moe["float32"]["step_tflops_per_second"] > 0  # FLOPs from XLA's cost analysis


def checks(cwd, *args):
  """Runs scripts/accelerator_checks.sh at CPU size (QUICK=1) from folder `cwd`."""
  env = script_env(QUICK="1", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
  return subprocess.run(["bash", str(REPO / "scripts" / "accelerator_checks.sh"), *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_accelerator_checks_run_a_stage_and_report_a_failed_one(tmp_path):
  out = tmp_path / "out"
  data = tmp_path / "data.npz"
  data.write_bytes(b"not used by the bench stage")
  # Relative paths are taken from the caller's folder, although the stages run from the repo.
  proc = checks(tmp_path, "out", "data.npz", "bench", "d3:badnets", "pyp:sig")
  # bench succeeds; d3 and pyp fail on the unreadable data file, are reported, and count in the
  # status.
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "bench: done in" in proc.stdout
  assert json.loads((out / "train_bf16.json").read_text())["dtype"] == "bfloat16"
  for stage, name, config in (("d3:badnets", "d3_badnets", "d3.py:attack=badnets"),
                               ("pyp:sig", "pyp_sig", "pick_your_poison.py:attack=sig")):
    assert f"{stage}: FAILED (exit status" in proc.stdout
    log = (out / f"{name}.log").read_text()
    assert f"--config=configs/{config}," in log.splitlines()[0]  # the stage's own config
    assert "data.npz: not a readable .npz file" in log
    assert not (out / f"{name}.json").exists()


def test_accelerator_checks_refuse_bad_arguments(tmp_path):
  missing = checks(tmp_path, "out", "absent.npz")
  assert missing.returncode == 2 and "absent.npz does not exist" in missing.stderr
  (tmp_path / "data.npz").write_bytes(b"")
  unknown = checks(tmp_path, "out", "data.npz", "train")
  assert unknown.returncode == 2 and "unknown stage train" in unknown.stderr
