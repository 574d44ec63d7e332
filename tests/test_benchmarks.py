"""The benchmark scripts run end to end on CPU at small sizes and print their figures; bad flags
and settings stop them with one line `jaxbd: error: ...` and exit status 2."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, process_env, side_by_side


def test_flops_count_every_device_of_a_sharded_program():
  """XLA's cost analysis gives one device's share of a program split over the mesh; TFLOP/s and
  MFU need the whole step's FLOPs: a matmul split over the session's 4 devices counts 2 M K N."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from jaxbd import benchmark  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  spec = lambda shape, *axes: jax.ShapeDtypeStruct(
      shape, jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(*axes)))
  x, w = spec((64, 32), "data"), spec((32, 16))
  compiled = jax.jit(jnp.matmul).lower(x, w).compile()
  assert jax.device_count() > 1
  assert benchmark._flops(compiled) == 2 * 64 * 32 * 16  # pylint: disable=protected-access


def test_a_source_not_shaped_like_cifar10_is_refused():
  """The benchmarks build CIFAR-10's models (and PyTorch's loaders): 8x8 grey digits are refused
  with the source's shape, before any model is built."""
  from jaxbd import benchmark, config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxbd.errors import DataError  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError, match="digits: .* 32x32 RGB images .* not 8x8x1 images of 10"):
    benchmark.training_data(config_lib.defaults().data, "digits", 256)
  assert benchmark.training_data(config_lib.defaults().data, "", 16).image_shape == (32, 32, 3)


def script_env(**extra):
  """The environment of a script run: one CPU device, the repository importable."""
  return process_env(PYTHONPATH=str(REPO), **extra)


def run_script(name, *args, timeout=600):
  """Runs `python scripts/NAME ARGS` from the repository; the finished process."""
  return subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, env=script_env(),
                        capture_output=True, text=True, timeout=timeout)


def script(name, *args, timeout=600):
  """The standard output of a successful `run_script`."""
  proc = run_script(name, *args, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


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


def test_bad_flags_are_one_line_errors_and_bench_population_runs(tmp_path):
  (tmp_path / "afile").write_text("")
  (tmp_path / "text.npz").write_text("x_train,y_train\n")
  bad = [  # (script, flag, what its one error line says)
      ("bench_train.py", "--model=foo", "flag --model=foo: value should be one of <cnn|"),
      ("bench_train.py", f"--out={tmp_path / 'afile' / 'x.json'}", "not a file in a writable"),
      ("bench_train.py", "--source=npz:/nonexistent.npz", "npz:/nonexistent.npz: file not found"),
      ("bench_moe.py", "--expert=3", "'mesh.expert' (3) must divide model.pmoe.experts"),
      ("bench_quant.py", "--batch_size=0", "flag --batch_size=0: 0 is not a positive integer"),
      ("bench_sweep_seeds.py", "--seeds=0", "flag --seeds=0: 0 is not a positive integer"),
      # The sweep checks its data before the first cell starts:
      ("bench_sweep_seeds.py", "--overrides=--config.data.source=npz:/nonexistent.npz",
       "error: npz:/nonexistent.npz: file not found"),
      ("bench_sweep_seeds.py", f"--overrides=--config.data.source=npz:{tmp_path / 'text.npz'}",
       f"error: npz:{tmp_path / 'text.npz'}: not a readable .npz file"),
  ]
  if importlib.util.find_spec("torch"):
    bad.append(("compare_pytorch.py", "--variants=eager,foo", "expected one or more of eager,"))
  out = tmp_path / "population.json"
  population, *refused = side_by_side(
      [lambda: run_script("bench_population.py", "--models=2", "--steps=1", "--width=2",
                          "--batch_size=8", f"--out={out}", timeout=120)] +
      [lambda name=name, flag=flag: run_script(name, flag, timeout=120) for name, flag, _ in bad])
  for (name, flag, message), proc in zip(bad, refused):
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (name, flag, proc.stderr[-3000:])
    assert lines[0].startswith("jaxbd: error: ") and message in lines[0], (name, flag, lines)
  assert population.returncode == 0, population.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["models"] == 2 and doc["vmap_images_per_s"] > 0 and doc["loop_images_per_s"] > 0


def checks(cwd, *args, **env):
  """Runs scripts/accelerator_checks.sh at CPU size (QUICK=1) from folder `cwd`, with the
  environment variables `env` added."""
  env = script_env(QUICK="1", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                   **env)
  return subprocess.run(["bash", str(REPO / "scripts" / "accelerator_checks.sh"), *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_accelerator_checks_run_a_stage_and_report_a_failed_one(tmp_path):
  out = tmp_path / "out"
  data = tmp_path / "data.npz"
  data.write_bytes(b"not used by the bench stage")
  # Relative paths are taken from the caller's folder, although the stages run from the repo.
  # Two runs side by side, into one folder: bench and trigger succeed; d3 and pyp fail on the
  # unreadable data file, are reported, and count in the status.
  proc, trigger = side_by_side([
      lambda: checks(tmp_path, "out", "data.npz", "bench", "d3:badnets", "pyp:sig"),
      lambda: checks(tmp_path, "out", "data.npz", "trigger")])
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert trigger.returncode == 0, trigger.stdout + trigger.stderr
  assert "bench: done in" in proc.stdout and "trigger: done in" in trigger.stdout
  # The bench stage: scripts/bench_train.py's table and figures, step and whole epoch.
  bench = json.loads((out / "train_bf16.json").read_text())
  assert bench["dtype"] == "bfloat16" and "| 32 |" in (out / "bench.log").read_text()
  row = bench["results"][0]
  assert row["step_images_per_second"] > 0 and row["epoch_images_per_second"] > 0
  assert row["step_tflops_per_second"] > 0  # XLA's cost analysis gave the step's FLOPs
  refool = json.loads((out / "train_refool.json").read_text())
  assert refool["trigger"] == "refool"
  assert refool["results"][0]["every_row_step_images_per_second"] > 0
  for stage, name, config in (("d3:badnets", "d3_badnets", "d3.py:attack=badnets"),
                               ("pyp:sig", "pyp_sig", "pick_your_poison.py:attack=sig")):
    assert f"{stage}: FAILED (exit status" in proc.stdout
    log = (out / f"{name}.log").read_text()
    assert f"--config=configs/{config}," in log.splitlines()[0]  # the stage's own config
    assert "data.npz: not a readable .npz file" in log
    assert not (out / f"{name}.json").exists()


def test_accelerator_checks_refuse_bad_arguments(tmp_path):
  (tmp_path / "data.npz").write_bytes(b"")
  for args, env, message in (
      (("out", "absent.npz"), {}, "data file absent.npz does not exist"),
      (("out", "data.npz", "train"), {}, "unknown stage train"),
      (("data.npz", "data.npz"), {}, "cannot write to the folder OUT=data.npz"),  # a file
      (("out", "data.npz"), {"LIMIT_S": "abc"}, "LIMIT_S must be a positive integer"),
      (("out b", "data.npz"), {}, "OUT, DATA and WORKDIR must be paths without spaces"),
      (("out", "data.npz", "bench", "d3:nosuch"), {},  # before the bench stage runs
       "configs/d3.py: attack must be one of ('badnets', 'blended', 'wanet', 'sig'), got 'nosuch'"),
  ):
    proc = checks(tmp_path, *args, **env)
    assert proc.returncode == 2 and proc.stderr.startswith(f"jaxbd: error: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line
  assert sorted(os.listdir(tmp_path)) == ["data.npz"]  # nothing was written
