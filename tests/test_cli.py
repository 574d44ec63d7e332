"""The command line: the quickstart job, results.json schema, resume after kill, bad input; the
README's Python block."""

import ast
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, load_config, process_env, shift_plan, side_by_side
from jaxbd import config as config_lib
from jaxbd import experiments
from jaxbd.errors import JaxbdError
from jaxbd.train.checkpoint import METADATA_FILE, Checkpointer

QUICK = ["--config=configs/quickstart.py", "--config.train.epochs=2", "--config.log.progress=false"]


def start_jaxbd(*args, workdir=None, stdout=subprocess.PIPE) -> subprocess.Popen:
  """Starts `python -m jaxbd.main ARGS [--workdir=WORKDIR]` on one CPU device (stderr piped)."""
  cmd = [sys.executable, "-m", "jaxbd.main", *args]
  if workdir is not None:
    cmd.append(f"--workdir={workdir}")
  return subprocess.Popen(cmd, cwd=REPO, env=process_env(), stdout=stdout, stderr=subprocess.PIPE,
                          text=True)


def jaxbd(*args, workdir=None, check_rc=None) -> subprocess.CompletedProcess:
  """Runs the CLI (see `start_jaxbd`) to its end; asserts its exit status if `check_rc`."""
  proc = start_jaxbd(*args, workdir=workdir)
  out, err = proc.communicate(timeout=600)
  if check_rc is not None:
    assert proc.returncode == check_rc, err[-3000:]
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def readme_python_block() -> str:
  """The code of the README's "From Python" section (its indented block)."""
  text = (REPO / "README.md").read_text()
  section = text.split("### From Python", 1)[1].split("\n### ", 1)[0]
  return "\n".join(line[4:] for line in section.splitlines() if line.startswith("    "))


def test_the_readmes_python_block_trains_a_backdoor_and_d3_removes_it(tmp_path):
  code = readme_python_block().replace("/tmp/jaxbd/library", str(tmp_path / "library"))
  assert "common.prepare" in code and "/tmp/jaxbd" not in code
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=process_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
  backdoored, repaired = (ast.literal_eval(printed[k]) for k in ("backdoored", "D3"))
  assert backdoored["acc"] > 0.95 and backdoored["asr"] > 0.95  # README: 0.981 / 0.991
  assert repaired["asr"] < 0.05 and repaired["acc"] > 0.5  # README: 0.656 / 0.000
  assert (tmp_path / "library" / "metrics.jsonl").exists()


@pytest.mark.parametrize("module", ["jaxbd.main", "jaxbd.sweep", "jaxbd.select"])
def test_help_lists_the_flags_without_a_config(module):
  proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=process_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--workdir" in proc.stdout and "--config" in proc.stdout, proc.stdout + proc.stderr
  assert "error" not in proc.stderr


def test_quickstart_writes_results_in_the_design_schema(tmp_path):
  workdir = tmp_path / "run"
  proc = jaxbd(*QUICK, "--config.defense.names=ft", "--config.defense.ft.epochs=2",
               "--config.defense.clean_fraction=0.1", workdir=workdir, check_rc=0)
  assert "| backdoored |" in proc.stdout and "| clean |" in proc.stdout
  assert "| defense ft |" in proc.stdout
  doc = json.loads((workdir / "results.json").read_text())
  for key in ("config", "dataset", "model", "attack", "metrics", "defenses", "routing", "timing",
              "versions"):
    assert key in doc
  assert doc["dataset"] == "digits" and doc["model"] == "cnn"
  assert doc["attack"]["name"] == "badnets" and doc["attack"]["poison_rate"] == 0.1
  assert doc["attack"]["num_poisoned"] == int(0.1 * 1437)
  for phase in ("clean", "backdoored"):
    m = doc["metrics"][phase]
    assert all(0.0 <= m[k] <= 1.0 for k in ("acc", "asr", "ra"))
  plan = np.load(workdir / "poison_plan.npz")
  assert len(plan["indices"]) == doc["attack"]["num_poisoned"]
  ft = doc["defenses"]["ft"]
  assert ft["trusted_size"] == round(0.1 * 1437) and 0.0 <= ft["der"] <= 1.0
  trusted = np.load(workdir / "trusted_indices.npy")
  assert len(trusted) == ft["trusted_size"] and not set(trusted) & set(plan["indices"])
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {l["phase"] for l in lines} == {"clean", "backdoored", "ft"}
  assert not [p for p in os.listdir(workdir) if p.startswith(".tmp")]
  # The rerun restores every phase and the defense: the same metrics, and the training times
  # their checkpoints carry (less the final save), not the rerun's.
  jaxbd(*QUICK, "--config.defense.names=ft", "--config.defense.ft.epochs=2",
        "--config.defense.clean_fraction=0.1", workdir=workdir, check_rc=0)
  again = json.loads((workdir / "results.json").read_text())
  assert again["metrics"] == doc["metrics"]
  assert {k: v for k, v in again["defenses"]["ft"].items() if "seconds" not in k} == {
      k: v for k, v in ft.items() if "seconds" not in k}
  assert 0.5 * ft["train_seconds"] < again["defenses"]["ft"]["train_seconds"] <= ft[
      "train_seconds"]
  assert again["timing"]["backdoored"]["resumed_from_epoch"] == doc["config"]["train"]["epochs"]
  # The defense's checkpoints name the model it tuned (a rerun refuses them for another).
  from jaxbd.experiments import common  # pylint: disable=g-import-not-at-top
  from jaxbd.train import Checkpointer, checkpoint  # pylint: disable=g-import-not-at-top
  suspect = common.restore_phase(str(workdir), "backdoored", doc["config"]["train"]["epochs"])
  info = Checkpointer(str(workdir / "checkpoints" / "ft")).info(2)
  assert info["origin"] == checkpoint.fingerprint(suspect)


def final_state(workdir, phase, epoch):
  from jaxbd.train import Checkpointer
  return Checkpointer(os.path.join(workdir, "checkpoints", phase)).restore(epoch)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  """SIGKILL mid-run, rerun the same command: final parameters equal an uninterrupted run's."""
  args = ["--config=configs/quickstart.py", "--config.train.epochs=20",
          "--config.train.checkpoint_every=1", "--config.standard.train_clean=false",
          "--config.log.progress=false"]
  full, killed = tmp_path / "full", tmp_path / "killed"
  # The uninterrupted run goes side by side with the one that is killed.
  full_proc, proc = (start_jaxbd(*args, workdir=workdir, stdout=subprocess.DEVNULL)
                     for workdir in (full, killed))
  ckpts = killed / "checkpoints" / "backdoored"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(p.isdigit() and int(p) >= 3 for p in os.listdir(ckpts)):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "results.json").exists()
  _, err = full_proc.communicate(timeout=600)
  assert full_proc.returncode == 0, err[-3000:]

  jaxbd(*args, workdir=killed, check_rc=0)
  doc = json.loads((killed / "results.json").read_text())
  assert doc["timing"]["backdoored"]["resumed_from_epoch"] >= 3
  import jax
  uninterrupted = final_state(full, "backdoored", 20)
  resumed = final_state(killed, "backdoored", 20)
  assert jax.tree.structure(uninterrupted) == jax.tree.structure(resumed)
  for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)  # params, BN statistics, optimizer: bit for bit on CPU
  ref = json.loads((full / "results.json").read_text())
  assert doc["metrics"] == ref["metrics"]


def test_ctrl_c_is_one_line_and_status_130(tmp_path):
  """SIGINT mid-training: the interrupted line and status 130, with no crash while the process
  ends (the rerun resumes as after a kill: test_killed_run_resumes_to_the_same_parameters)."""
  args = ["--config=configs/quickstart.py", "--config.log.progress=false",
          "--config.train.epochs=400", "--config.train.checkpoint_every=1",
          "--config.standard.train_clean=false"]
  # SIGINT as a terminal delivers it, also where the suite itself runs with SIGINT ignored (a
  # background job): an ignored signal stays ignored in a child, a handled one is the default.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    proc = start_jaxbd(*args, workdir=tmp_path / "w", stdout=subprocess.DEVNULL)
  finally:
    signal.signal(signal.SIGINT, previous)
  ckpts = tmp_path / "w" / "checkpoints" / "backdoored"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (
      ckpts.is_dir() and any(p.isdigit() for p in os.listdir(ckpts))):
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be interrupted"
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert err.strip().splitlines()[-1] == ("jaxbd: interrupted; rerun the same command to resume "
                                          "from the last checkpoint"), err[-2000:]
  assert "Traceback" not in err and "Fatal Python error" not in err


def test_a_logged_keyboard_interrupt_is_dropped_and_other_errors_kept(caplog):
  """Ctrl-C during a checkpoint save: orbax logs the KeyboardInterrupt with its traceback
  (`logging.exception`) before the command's own line; only that record is dropped."""
  from absl import logging
  from jaxbd import cli
  cli.quiet_interrupts()
  cli.quiet_interrupts()  # once per process, however often it is called
  assert len(logging.get_absl_logger().filters) == 1
  for error in (KeyboardInterrupt(), ValueError("disk full")):
    try:
      raise error
    except BaseException:  # pylint: disable=broad-exception-caught
      logging.exception("Save Finalize thread failed.")
  assert [r.exc_info[0] for r in caplog.records] == [ValueError]


def assert_one_line_error(proc, message):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("jaxbd: error:")]
  assert len(errors) == 1, proc.stderr
  assert message in errors[0], errors[0]


def bad_npz(path, case):
  """Writes a small .npz dataset at `path` with the defect `case` (corrupt, float, shape,
  labels, empty_side)."""
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
                y_train=rng.integers(0, 3, 40),
                x_test=rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8),
                y_test=rng.integers(0, 3, 10))
  if case == "corrupt":
    path.write_bytes(os.urandom(256))
    return path
  if case == "float":
    arrays["x_train"] = arrays["x_train"].astype(np.float64)
  if case == "shape":
    arrays["x_test"] = arrays["x_test"].reshape(10, 64)
  if case == "labels":
    arrays["y_test"][0] = -1
  if case == "empty_side":
    arrays["x_train"] = arrays["x_train"][:, :0]
  np.savez(path, **arrays)
  return path


# Bad settings as a user gives them, one process each: one per stage that refuses them (the names
# of the overrides, absl's parsing of a value and of a list, a range, the data, the model, the
# multi-host flags, a setting only the model refutes).
BAD_CONFIGS = [
    (["--config.poison.rtae=0.3"], "unknown config key 'poison.rtae'"),
    (["--config.poison.rate=1.5"], "'poison.rate' must be in [0, 1], got 1.5"),
    (["--config.train.epochs=abc"], "--config.train.epochs=abc"),
    (["--config.data.source=npz:/nonexistent/data.npz"], "file not found"),
    (["--config.model.cnn.stages=4"], "8x8 images are too small for 4 stages of 2x2 max-pooling"),
    # list values from the command line: absl keeps what does not parse as a number as a string
    (["--config.data.mean=nan", "--config.data.std=0.3"],
     "'data.mean' must be a list of finite numbers, got ('nan',)"),
    (["--coordinator_address=notahost", "--num_processes=1", "--process_id=0"],
     "--coordinator_address must be HOST:PORT, got 'notahost'"),
    (["--config.defense.names=d3", "--config.defense.d3.layers=conv9"],
     "defense.d3.layers: module 'conv9' has no kernel"),
]
BAD_DATASETS = [("corrupt", "not a readable .npz file")]
# More of each kind, refused by the same code in this process (`test_bad_setting_...`).
BAD_SETTINGS = [
    ({"train.lr": -0.1}, "'train.lr' must be in (0, inf], got -0.1"),
    ({"poison.badnets.size": 9}, "a 9x9 trigger at row -1, col -1 does not fit a 8x8"),
    ({"experiment": "nope"}, "'experiment' must be one of"),
    ({"experiment": "detection", "standard.victim_from": "x"},
     "config key 'standard.victim_from' is for the standard experiment, not 'detection'"),
    ({"standard.victim_from": "/nonexistent"},
     "standard.victim_from: /nonexistent/config.json is not a readable run config"),
    ({"data.source": "imagenet"}, "data.source 'imagenet' is not one of"),
    ({"poison.target": 12}, "poison.target 12 is not a class"),
    ({"train.step_epochs": ("a", "b")}, "'train.step_epochs' must be a list of integers"),
    ({"data.mean": (5.0,), "data.std": (0.3,)}, "'data.mean' must be in [0, 1]"),
    ({"defense.names": "ft", "defense.clean_fraction": 0.95},
     "defense.clean_fraction 0.95 asks for 1365 trusted images; 1294 clean"),
    ({"attack.name": "pcb", "poison.rate": 0.0, "attack.pcb.open_modules": "hed"},
     "attack.pcb.open_modules: no top-level module ['hed']"),
    ({"defense.trusted_from": "all", "poison.label_mode": "clean_label",
      "poison.adversarial.eps": 8.0},
     "defense.trusted_from='all' takes the clean image of every row, but label-consistent"),
    ("float", "x_train must be uint8 images in [0, 255], got dtype float64"),
    ("shape", "x_test must have shape [N, H, W] or [N, H, W, C], got [10, 64]"),
    ("labels", "y_test has labels in [-1,"),
    ("empty_side", "x_train holds 0x8 images"),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
  """{case: (finished process, its workdir)} of the quickstart command with each bad setting of
  BAD_CONFIGS (case: its index) and each bad dataset of BAD_DATASETS (case: its name), every
  one a process of its own as a user starts it, run side by side."""
  root = tmp_path_factory.mktemp("bad_input")
  cases = {i: extra for i, (extra, _) in enumerate(BAD_CONFIGS)}
  cases.update({case: [f"--config.data.source=npz:{bad_npz(root / f'{case}.npz', case)}"]
                for case, _ in BAD_DATASETS})
  workdirs = {case: root / f"w{case}" for case in cases}
  procs = side_by_side([functools.partial(jaxbd, *QUICK, *extra, workdir=workdirs[case])
                        for case, extra in cases.items()])
  return {case: (proc, workdirs[case]) for case, proc in zip(cases, procs)}


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_exits_with_one_line(bad_input_runs, case):
  proc, workdir = bad_input_runs[case]
  assert_one_line_error(proc, BAD_CONFIGS[case][1])
  assert not workdir.exists()


@pytest.mark.parametrize("case,message", BAD_DATASETS)
def test_bad_dataset_exits_with_one_line(bad_input_runs, case, message):
  proc, workdir = bad_input_runs[case]
  assert_one_line_error(proc, message)
  assert not workdir.exists()


@pytest.mark.parametrize("setting,message", BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_bad_setting_is_refused_before_the_workdir_is_made(tmp_path, setting, message):
  """setting: config overrides, or the defect of a dataset file (`bad_npz`)."""
  if isinstance(setting, str):
    setting = {"data.source": f"npz:{bad_npz(tmp_path / 'data.npz', setting)}"}
  config = config_lib.apply_cell(load_config("configs/quickstart.py"), setting)
  with pytest.raises(JaxbdError) as error:
    experiments.run(config, str(tmp_path / "w"))
  assert message in str(error.value) and "\n" not in str(error.value), error.value
  assert not (tmp_path / "w").exists()


def test_missing_config_file_and_workdir(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a folder")
  cases = [
      (functools.partial(jaxbd, "--config=configs/nope.py", workdir=tmp_path / "w"),
       "config file 'configs/nope.py' not found"),
      (functools.partial(jaxbd, "--config=configs/quickstart.py:bogus", workdir=tmp_path / "w"),
       "config argument 'bogus' is unknown"),
      (functools.partial(jaxbd, *QUICK), "--workdir is required"),
      (functools.partial(jaxbd, *QUICK, workdir=afile),
       f"--workdir {afile} is not a writable folder")]
  procs = side_by_side([call for call, _ in cases])
  for proc, (_, message) in zip(procs, cases):
    assert_one_line_error(proc, message)
  assert not (tmp_path / "w").exists()


def _older_config(workdir):
  """config.json as an older jaxbd wrote it, without a key added since."""
  older = json.loads((workdir / "config.json").read_text())
  del older["detection"]["nc"]["score"]
  (workdir / "config.json").write_text(json.dumps(older))


def _flipped_weight_bit(workdir):
  """One bit of one weight changed on disk in a checkpoint that still decodes (the arrays written
  again by orbax, the saved checksum kept)."""
  ckpt = workdir / "checkpoints" / "backdoored" / "2"
  state = Checkpointer(str(ckpt.parent)).restore(2)
  kernel = np.array(state["params"]["conv1"]["kernel"])
  kernel.view(np.uint32).reshape(-1)[7] ^= 1
  state["params"]["conv1"]["kernel"] = kernel
  rewritten = workdir.parent / f"{workdir.name}_rewritten"
  with ocp.StandardCheckpointer() as writer:
    writer.save(rewritten, state)
  shutil.rmtree(ckpt / "default")
  shutil.move(rewritten, ckpt / "default")


def _checkpoint_files(workdir, arrays_only: bool):
  """The files of the last checkpoint: those of the arrays' data folders, or all."""
  for root, _, files in os.walk(workdir / "checkpoints" / "backdoored" / "2"):
    if not arrays_only or os.path.basename(root) == "d":
      yield from (os.path.join(root, f) for f in files)


def _truncated_arrays(workdir):
  for path in _checkpoint_files(workdir, arrays_only=True):
    os.truncate(path, 10)


def _overwritten_checkpoint(workdir):
  for path in _checkpoint_files(workdir, arrays_only=False):
    with open(path, "r+b") as fh:
      fh.write(b"\xff" * min(os.path.getsize(path), 64))


def _metadata_seconds(workdir):
  path = workdir / "checkpoints" / "backdoored" / "2" / METADATA_FILE
  meta = json.loads(path.read_text())
  meta["custom_metadata"]["seconds"] = "abc"
  path.write_text(json.dumps(meta))


# (defect made in a copy of a finished run's workdir, whether results.json goes too, extra flags,
# the one error line's text)
WORKDIR_DEFECTS = [
    (None, False, ["--config.train.lr=0.02"],
     "holds a run with a different config (first difference: train.lr)"),
    (_older_config, False, [], "(first difference: detection.nc.score, a key its config.json "
     "lacks (written by an older jaxbd)); use a new --workdir"),
    (lambda w: os.remove(w / "config.json"), False, [],
     "holds checkpoints but no config.json, so nothing says which config trained them"),
    (shift_plan, False, [], "poison_plan.npz holds another poison plan than this run draws "
     "(first difference: indices; the data or the random numbers changed)"),
    (_flipped_weight_bit, True, [],
     "backdoored/2 is corrupt: its arrays differ from the checksum saved with them"),
    # Array data cut short: every array's read fails, and the reads that orbax abandons report
    # their errors as the process ends; the error stays one line.
    (_truncated_arrays, True, [], "is unreadable or belongs to a different model"),
    (_overwritten_checkpoint, True, [], "backdoored/2 has unreadable metadata ('utf-8' codec"),
    # orbax would log its error and restore the arrays without the checksum saved beside them
    (lambda w: (w / "checkpoints" / "backdoored" / "2" / METADATA_FILE).write_text("garbage"),
     True, [], "backdoored/2 has unreadable metadata (Expecting value"),
    (_metadata_seconds, True, [], "backdoored/2 has unreadable metadata (seconds 'abc' is not a "
     "number)"),
    (lambda w: (w / "config.json").write_text("[1, 2]"), False, [],
     "config.json is unreadable (a JSON list, not an object)"),
]


def test_corrupt_checkpoint_and_changed_config_are_refused(tmp_path):
  """Each defect in a copy of one finished run's workdir, the reruns side by side: one error
  line each, and nothing written."""
  workdir = tmp_path / "w"
  jaxbd(*QUICK, "--config.standard.train_clean=false", workdir=workdir, check_rc=0)
  copies = []
  for i, (defect, drop_results, _, _) in enumerate(WORKDIR_DEFECTS):
    copy = tmp_path / f"case{i}"
    shutil.copytree(workdir, copy)
    if drop_results:
      os.remove(copy / "results.json")
    if defect is not None:
      defect(copy)
    copies.append((copy, sorted(os.listdir(copy))))
  procs = side_by_side([
      functools.partial(jaxbd, *QUICK, "--config.standard.train_clean=false", *extra,
                        workdir=copy) for (copy, _), (_, _, extra, _) in zip(copies,
                                                                             WORKDIR_DEFECTS)])
  for proc, (copy, files), (_, _, _, message) in zip(procs, copies, WORKDIR_DEFECTS):
    assert_one_line_error(proc, message)
    assert sorted(os.listdir(copy)) == files, copy
