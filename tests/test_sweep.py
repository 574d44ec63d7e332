"""Sweeps: grid parsing, one store row per cell, and a killed sweep resumes without reruns."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import sweep
from jaxbd.errors import CheckpointError, ConfigError, DataError

from conftest import REPO, process_env, shift_plan, tiny_digits_config


def test_parse_grid_types_and_product():
  cells = sweep.parse_grid("poison.rate=0.01,0.1; seed=0,1,2; data.flip=false",
                           config_lib.defaults())
  assert len(cells) == 6
  assert cells[0] == {"poison.rate": 0.01, "seed": 0, "data.flip": False}
  assert {type(c["seed"]) for c in cells} == {int}
  with pytest.raises(ConfigError, match="unknown config key 'poison.rtae'"):
    sweep.parse_grid("poison.rtae=0.1", config_lib.defaults())
  with pytest.raises(ConfigError, match="'x' of 'seed' is not an integer"):
    sweep.parse_grid("seed=x", config_lib.defaults())
  with pytest.raises(ConfigError, match="must look like field=v1,v2"):
    sweep.parse_grid("seed", config_lib.defaults())
  with pytest.raises(ConfigError, match="'seed' appears twice in --grid"):
    sweep.parse_grid("seed=0,1;seed=2", config_lib.defaults())
  with pytest.raises(ConfigError, match="names no config key"):
    sweep.parse_grid(";;", config_lib.defaults())
  with pytest.raises(ConfigError, match="--grid lists seed=0 twice"):
    sweep.parse_grid("seed=0,1,0", config_lib.defaults())
  with pytest.raises(ConfigError, match="'poison' is a section: name a field, e.g. 'poison."):
    sweep.parse_grid("poison=1,2", config_lib.defaults())
  with pytest.raises(ConfigError, match=r"value '\{\[1\]:2\}' of 'train.step_epochs' is not"):
    sweep.parse_grid("train.step_epochs={[1]:2}", config_lib.defaults())  # unhashable key


@pytest.mark.parametrize("cells,message", [
    (5, "get_sweep\\(\\) returned int, not a list of cells"),
    ([5], "get_sweep\\(\\) returned a cell 5 that is not a dict"),
    ([{1: 0.1}], "a cell \\{1: 0.1\\} that is not a dict of config field"),
])
def test_a_malformed_get_sweep_result_is_refused(cells, message):
  with pytest.raises(ConfigError, match=message):
    sweep.file_cells(cells)
  assert sweep.file_cells(({"seed": 1},)) == [{"seed": 1}]


@pytest.mark.parametrize("content", ["garbage", "table"])
def test_a_file_that_is_not_a_sweep_store_is_refused(tmp_path, content):
  path = tmp_path / "results.sqlite"
  if content == "garbage":
    path.write_bytes(b"not a database" * 100)
  else:
    with sqlite3.connect(path) as db:
      db.execute("CREATE TABLE runs (x TEXT)")
  with pytest.raises(DataError, match="is not a sweep store"):
    with sweep.store(str(path)):
      pass
  with pytest.raises(DataError, match="is not a sweep store"):
    sweep.run_sweep(config_lib.defaults(), [{"seed": 1}], str(tmp_path))
  assert os.listdir(tmp_path) == ["results.sqlite"]  # no cells/ folder left behind


def test_config_files_can_declare_their_sweep():
  from jaxbd.config import call_file as call_config_file
  cells = call_config_file(str(REPO / "configs/cifar10.py:cpu"), "get_sweep")
  assert len(cells) == 12 and {c["seed"] for c in cells} == {0, 1, 2}
  base = call_config_file(str(REPO / "configs/cifar10.py:cpu"))
  assert config_lib.apply_cell(base, cells[5])["poison"]["rate"] == cells[5]["poison.rate"]


def test_bad_cell_is_refused_before_anything_runs(tmp_path):
  base = config_lib.defaults()
  with pytest.raises(ConfigError, match=r"sweep cell \{'poison.rate': 1.5\}: .*'poison.rate'"):
    sweep.run_sweep(base, [{"poison.rate": 0.1}, {"poison.rate": 1.5}], str(tmp_path))
  with pytest.raises(ConfigError, match=r"cells \{'seed': 1\} and \{'seed': 1\} give the same"):
    sweep.run_sweep(base, [{"seed": 1}, {"seed": 2}, {"seed": 1}], str(tmp_path))
  with pytest.raises(ConfigError, match=r"cell \{'train.epochs': 1.5\}: 'train.epochs' must be "
                     "an integer, got 1.5$"):
    sweep.run_sweep(base, [{"seed": 1}, {"train.epochs": 1.5}], str(tmp_path))
  with pytest.raises(ConfigError, match="data.source 'cifar' is not one of: digits, npz:PATH"):
    sweep.run_sweep(base, [{"seed": 1}, {"data.source": "cifar"}], str(tmp_path))
  with pytest.raises(ConfigError, match="unknown config key 'nosuch.x' in cell"):
    sweep.run_sweep(base, [{"nosuch.x": 1}], str(tmp_path))
  with pytest.raises(ConfigError, match="'train' is a section: name a field, e.g. 'train."):
    sweep.run_sweep(base, [{"train": 1}], str(tmp_path))
  missing = f"npz:{tmp_path / 'missing.npz'}"
  with pytest.raises(DataError, match=f"^{missing}: file not found$"):
    sweep.run_sweep(base, [{"data.source": "digits"}, {"data.source": missing}], str(tmp_path))
  with pytest.raises(DataError, match=r"folder:.*/none: directory .*/none/train not found"):
    sweep.run_sweep(base, [{"data.source": f"folder:{tmp_path / 'none'}"}], str(tmp_path))
  (tmp_path / "text.npz").write_text("x_train,y_train\n")
  with pytest.raises(DataError, match=r"text.npz: not a readable .npz file"):
    sweep.run_sweep(base, [{"poison.name": "refool", "poison.refool.images":
                            f"npz:{tmp_path / 'text.npz'}"}], str(tmp_path))
  (tmp_path / "trigger.png").write_text("not an image")
  with pytest.raises(DataError, match=r"trigger image '.*trigger.png': cannot decode an image"):
    sweep.run_sweep(base, [{"poison.name": "blended", "seed": 1},
                           {"poison.name": "adaptive_blend",
                            "poison.adaptive_blend.image": str(tmp_path / "trigger.png")}],
                    str(tmp_path))
  assert not (tmp_path / "results.sqlite").exists()


def rows(path):
  with sqlite3.connect(path) as db:
    return db.execute("SELECT config_hash, cell, status, finished_at, "
                      "json_extract(metrics, '$.backdoored.asr') FROM runs").fetchall()


def rows_so_far(path):
  """`rows`, or none while the sweep has not yet made the store or its table (sqlite creates
  the file when it connects, before the schema is written)."""
  try:
    return rows(path) if path.exists() else []
  except sqlite3.OperationalError as e:
    if "no such table" not in str(e):
      raise
    return []


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_cells(tmp_path):
  cmd = [sys.executable, "-m", "jaxbd.sweep", "--config=configs/quickstart.py",
         "--config.train.epochs=3", "--config.standard.train_clean=false",
         "--config.log.progress=false", f"--workdir={tmp_path}",
         "--grid=poison.rate=0.05,0.1;seed=0,1"]
  env = process_env()
  store = tmp_path / "results.sqlite"
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if len(rows_so_far(store)) >= 2:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the sweep finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = {r[0]: r for r in rows(store)}
  assert 2 <= len(before) < 4

  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"{len(before)} already done" in out.stdout
  after = {r[0]: r for r in rows(store)}
  assert len(after) == 4 and all(r[2] == "done" for r in after.values())
  for digest, row in before.items():
    assert after[digest] == row  # finished cells were not run again
  cells = sorted(json.loads(r[1])["poison.rate"] for r in after.values())
  assert cells == [0.05, 0.05, 0.1, 0.1]
  assert all(0.0 <= r[4] <= 1.0 for r in after.values())
  assert len(os.listdir(tmp_path / "cells")) == 4


def metrics_by_cell(path):
  with sqlite3.connect(path) as db:
    return {digest: (json.loads(cell), m and json.loads(m), status) for digest, cell, m, status in
            db.execute("SELECT config_hash, cell, metrics, status FROM runs")}


@pytest.mark.slow
def test_vmapped_seeds_match_looped_cells(digits_sweep, tmp_path):
  """The cells of one poison rate (seeds 0 and 1), trained as one vmapped population, give the
  metrics of the same cells run one by one (each member keeps its own keys, plan and trigger), and
  each still gets its own store row, workdir, results.json and final checkpoint."""
  cells = [c for c in digits_sweep.cells if c["poison.rate"] == 0.2]
  counts = sweep.run_sweep(digits_sweep.base, cells, str(tmp_path), vmap_seeds=True)
  assert counts == {"done": 2, "skipped": 0, "failed": 0}
  looped = metrics_by_cell(digits_sweep.store)
  vmapped = metrics_by_cell(tmp_path / "results.sqlite")
  assert len(vmapped) == 2 and vmapped.keys() <= looped.keys()
  for digest, (cell, m, status) in vmapped.items():
    assert status == "done" and cell == looped[digest][0]
    for key in ("acc", "asr", "ra"):  # 360 test images: 1e-6 is far below one image
      assert m["backdoored"][key] == pytest.approx(looped[digest][1]["backdoored"][key], abs=1e-6)
    doc = json.loads((tmp_path / "cells" / digest / "results.json").read_text())
    assert doc["metrics"] == m and doc["timing"]["backdoored"]["population"] == 2
    assert (tmp_path / "cells" / digest / "checkpoints" / "backdoored" / "2").is_dir()
  assert len(os.listdir(tmp_path / "populations")) == 1
  # A sweep killed before it stored a finished member: rerun, the cell alone resumes from the
  # final checkpoint its population saved (nothing is trained again) and stores the same metrics.
  lost = next(iter(vmapped))
  with sqlite3.connect(tmp_path / "results.sqlite") as db:
    db.execute("DELETE FROM runs WHERE config_hash = ?", (lost,))
  again = sweep.run_sweep(digits_sweep.base, cells, str(tmp_path), vmap_seeds=True)
  assert again == {"done": 1, "skipped": 1, "failed": 0}
  assert metrics_by_cell(tmp_path / "results.sqlite") == vmapped
  doc = json.loads((tmp_path / "cells" / lost / "results.json").read_text())
  assert doc["timing"]["backdoored"]["resumed_from_epoch"] == 2
  # Every cell lost (store rows and workdirs): the population resumes from its own checkpoint,
  # whose states, restored on one device, are evaluated on the cells' mesh.
  with sqlite3.connect(tmp_path / "results.sqlite") as db:
    db.execute("DELETE FROM runs")
  shutil.rmtree(tmp_path / "cells")
  again = sweep.run_sweep(digits_sweep.base, cells, str(tmp_path), vmap_seeds=True)
  assert again == {"done": 2, "skipped": 0, "failed": 0}
  assert metrics_by_cell(tmp_path / "results.sqlite") == vmapped


@pytest.mark.slow
def test_a_diverged_population_runs_its_cells_one_by_one(digits_sweep, tmp_path, monkeypatch,
                                                        capfd):
  """A vmapped population whose loss turns NaN fails no cell for it: its cells run again one by
  one and give the looped sweep's metrics, and a cell that diverges alone fails alone."""
  from jaxbd import experiments
  from jaxbd.errors import DivergedError
  from jaxbd.experiments import standard

  def diverge(*args):
    raise DivergedError("training phase 'backdoored' diverged: its loss is nan")

  monkeypatch.setattr(standard, "run_population", diverge)
  cells = [c for c in digits_sweep.cells if c["poison.rate"] == 0.2]
  run = experiments.run
  monkeypatch.setattr(experiments, "run", lambda config, workdir: diverge() if config.seed == 1
                      else run(config, workdir))
  counts = sweep.run_sweep(digits_sweep.base, cells, str(tmp_path), vmap_seeds=True)
  assert counts == {"done": 1, "skipped": 0, "failed": 1}
  assert "diverged" in capfd.readouterr().err
  looped = metrics_by_cell(digits_sweep.store)
  for digest, (cell, m, status) in metrics_by_cell(tmp_path / "results.sqlite").items():
    assert status == ("failed" if cell["seed"] == 1 else "done")
    if status == "done":
      assert m == looped[digest][1]


@pytest.mark.slow
def test_a_diverged_seed_of_a_population_runs_alone(digits_sweep, tmp_path, monkeypatch, capfd):
  """Seed 1's poisoned rows carry a NaN trigger: the vmapped population finishes seed 0 with the
  looped sweep's metrics, runs seed 1 again alone, where it diverges and fails alone."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jaxbd.experiments import common  # pylint: disable=g-import-not-at-top
  build = common.build

  def broken_build(config, *args, **kwargs):
    r = build(config, *args, **kwargs)
    if config.seed != 1:
      return r
    nan = np.full_like(r.trigger.pattern, np.nan)
    return dataclasses.replace(r, trigger=r.trigger.replace(pattern=nan))

  monkeypatch.setattr(common, "build", broken_build)
  cells = [c for c in digits_sweep.cells if c["poison.rate"] == 0.2]
  counts = sweep.run_sweep(digits_sweep.base, cells, str(tmp_path), vmap_seeds=True)
  assert counts == {"done": 1, "skipped": 0, "failed": 1}
  assert "1 of the 2 cells of population" in capfd.readouterr().err
  looped = metrics_by_cell(digits_sweep.store)
  with sqlite3.connect(tmp_path / "results.sqlite") as db:
    errors = dict(db.execute("SELECT config_hash, error FROM runs WHERE status='failed'"))
  for digest, (cell, m, status) in metrics_by_cell(tmp_path / "results.sqlite").items():
    assert status == ("failed" if cell["seed"] == 1 else "done")
    if status == "done":
      assert m == looped[digest][1]
    else:
      assert "diverged" in errors[digest]


def test_seed_groups_join_only_cells_that_differ_in_seed(tmp_path):
  base = config_lib.defaults()
  cells = sweep.parse_grid("poison.rate=0.05,0.1;seed=0,1,2", base)
  items = [(i, c, config_lib.apply_cell(base, c), str(i)) for i, c in enumerate(cells)]
  groups = sweep.seed_groups(items, str(tmp_path), vmap_seeds=True)
  assert [[c["seed"] for _, c, _, _ in g] for g in groups] == [[0, 1, 2], [0, 1, 2]]
  assert {g[0][1]["poison.rate"] for g in groups} == {0.05, 0.1}
  assert sweep.seed_groups(items, str(tmp_path), vmap_seeds=False) == [[item] for item in items]
  clean = [(0, {}, config_lib.apply_cell(base, {"poison.name": "none", "seed": s}), str(s))
           for s in (0, 1)]
  assert len(sweep.seed_groups(clean, str(tmp_path), vmap_seeds=True)) == 2  # no attack
  # A cell that began a phase alone in an earlier run (checkpoint short of its 10 epochs), or
  # saved every phase's final checkpoint, resumes alone; one that holds final checkpoints of
  # some phases (a killed population saved them) stays in its population.
  from jaxbd import train as train_lib  # pylint: disable=g-import-not-at-top
  for digest, phase, epoch in (("1", "backdoored", 2), ("3", "clean", 10), ("3", "backdoored", 10),
                               ("4", "clean", 10)):
    ckpt = train_lib.Checkpointer(str(tmp_path / "cells" / digest / "checkpoints" / phase))
    ckpt.save(epoch, {"w": np.zeros(2)})
    ckpt.close()
  groups = sweep.seed_groups(items, str(tmp_path), vmap_seeds=True)
  assert [[i for i, *_ in g] for g in groups] == [[0, 2], [1], [3], [4, 5]]
  # A cell that cannot join a population (here: it borrows its victim) stays alone, also where
  # its digest is the key of a population (the seed-0 config of the others).
  borrower = config_lib.apply_cell(base, {"standard.victim_from": "W/cells/x"})
  population = [config_lib.apply_cell(base, {"seed": s}) for s in (1, 2)]
  mixed = [(0, {}, borrower, sweep.config_hash(base))] + [
      (s, {}, c, f"p{s}") for s, c in zip((1, 2), population)]
  assert [[i for i, *_ in g] for g in sweep.seed_groups(mixed, str(tmp_path), True)] == [
      [0], [1, 2]]


def test_a_failed_population_runs_its_cells_one_by_one(tmp_path, monkeypatch, capfd):
  """Any error of a population (here a member's defense checkpoint) fails no cell for it: its
  cells run again one by one, and only the one that fails alone fails."""
  from jaxbd import experiments  # pylint: disable=g-import-not-at-top
  from jaxbd.experiments import standard  # pylint: disable=g-import-not-at-top

  def broken(*args):
    raise CheckpointError("defense checkpoint of seed 1 is corrupt")

  monkeypatch.setattr(standard, "run_population", broken)
  monkeypatch.setattr(experiments, "run", lambda config, workdir: broken() if config.seed == 1
                      else {"metrics": {"backdoored": {"acc": 0.5}}})
  base = tiny_digits_config()
  counts = sweep.run_sweep(base, [{"seed": 0}, {"seed": 1}], str(tmp_path), vmap_seeds=True)
  assert counts == {"done": 1, "skipped": 0, "failed": 1}
  assert "population" in capfd.readouterr().err
  with sqlite3.connect(tmp_path / "results.sqlite") as db:
    rows = dict(db.execute("SELECT json_extract(cell, '$.seed'), status FROM runs"))
  assert rows == {0: "done", 1: "failed"}


def test_a_store_that_cannot_be_written_is_one_error_line(tmp_path, monkeypatch):
  """A lock held past the timeout (or a full disk) while the sweep records a cell: DataError."""
  from jaxbd import experiments  # pylint: disable=g-import-not-at-top
  connect = sqlite3.connect
  monkeypatch.setattr(sweep.sqlite3, "connect", lambda path, timeout: connect(path, timeout=0.1))
  locker = []

  def run(config, workdir):
    locker.append(connect(tmp_path / "results.sqlite"))
    locker[0].execute("BEGIN EXCLUSIVE")
    return {"metrics": {}}

  monkeypatch.setattr(experiments, "run", run)
  try:
    with pytest.raises(DataError, match=r"cannot use the sweep store .*results.sqlite "
                       r"\(database is locked\)"):
      sweep.run_sweep(tiny_digits_config(), [{"seed": 0}], str(tmp_path))
  finally:
    locker[0].close()


def test_cells_that_differ_in_defense_settings_share_their_victim():
  """Each cell after the first of its victim defends that cell's models, runs alone (a vmapped
  population trains), and keeps the digest of its own config."""
  base = tiny_digits_config(**{"defense.names": "ft"})
  cells = sweep.parse_grid("seed=0,1;defense.ft.lr=0.01,0.03", base)
  items = [(i, c, config_lib.apply_cell(base, c), str(i)) for i, c in enumerate(cells)]
  shared = sweep.share_victims(items, "W")
  assert [config.standard.victim_from for _, _, config, _ in shared] == [
      "", sweep.cell_dir("W", "0"), "", sweep.cell_dir("W", "2")]
  assert [item[:2] + item[3:] for item in shared] == [item[:2] + item[3:] for item in items]
  groups = sweep.seed_groups(shared, "W", vmap_seeds=True)
  assert [[i for i, *_ in g] for g in groups] == [[0, 2], [1], [3]]
  other = [(0, {}, config_lib.apply_cell(base, {"experiment": "detection"}), "a"),
           (1, {}, config_lib.apply_cell(base, {"experiment": "detection"}), "b")]
  assert sweep.share_victims(other, "W") == other  # only the standard experiment shares


def test_the_victim_owner_is_a_cell_that_saved_it_else_the_first_that_runs(monkeypatch,
                                                                            tmp_path):
  """A finished cell that borrowed its victim (from a cell no longer in the grid) holds none:
  the first cell that runs trains it. A cell whose workdir holds the saved victim lends it, also
  to the cells before it. A workdir whose run borrowed from elsewhere resumes: `victim_from` is
  not part of the config a rerun must match."""
  from jaxbd.experiments import common, standard  # pylint: disable=g-import-not-at-top
  base = tiny_digits_config(**{"defense.names": "ft"})
  cells = sweep.parse_grid("defense.ft.lr=0.01,0.02,0.03", base)
  items = [(i, c, config_lib.apply_cell(base, c), str(i)) for i, c in enumerate(cells)]
  holder = {}
  monkeypatch.setattr(standard, "victim_saved", lambda config, workdir: workdir in holder)
  sources = lambda shared: [config.standard.victim_from for _, _, config, _ in shared]
  assert sources(sweep.share_victims(items, "W", done={"0"})) == [
      sweep.cell_dir("W", "1"), "", sweep.cell_dir("W", "1")]
  holder[sweep.cell_dir("W", "2")] = True
  assert sources(sweep.share_victims(items, "W")) == [sweep.cell_dir("W", "2")] * 2 + [""]
  config = items[0][2].to_dict()
  (tmp_path / "config.json").write_text(json.dumps(
      {**config, "standard": {**config["standard"], "victim_from": "/elsewhere"}}))
  common._check_workdir(str(tmp_path), config)  # pylint: disable=protected-access
  with pytest.raises(CheckpointError, match=r"different config \(first difference: "
                     r"defense.ft.lr\)"):
    common._check_workdir(str(tmp_path), items[1][2].to_dict())  # pylint: disable=protected-access


def owner_failure_sweep(tmp_path, monkeypatch, count, began, failing, saved):
  """Runs a sweep of `count` FT settings of one victim with `experiments.run` faked: cell `began`
  began to train its own victim in a killed earlier run, the first `failing` runs fail, and
  `victim_saved` says `saved`. Returns (the cells' digests, (cell, victim_from) per run, counts).
  """
  from jaxbd import experiments  # pylint: disable=g-import-not-at-top
  from jaxbd.experiments import standard  # pylint: disable=g-import-not-at-top
  base = tiny_digits_config(**{"defense.names": "ft"})
  cells = [{"defense.ft.lr": 0.01 * (i + 1)} for i in range(count)]
  digests = [sweep.config_hash(config_lib.apply_cell(base, c)) for c in cells]
  (tmp_path / "cells" / digests[began]).mkdir(parents=True)
  (tmp_path / "cells" / digests[began] / "config.json").write_text(
      json.dumps({"standard": {"victim_from": ""}}))
  ran = []

  def run(config, workdir):
    ran.append((os.path.basename(workdir), config.standard.victim_from))
    if len(ran) <= failing:
      raise CheckpointError("broken")
    return {"metrics": {"backdoored": {"acc": 0.5}}}

  monkeypatch.setattr(experiments, "run", run)
  monkeypatch.setattr(standard, "victim_saved", lambda config, workdir: saved)
  return digests, ran, sweep.run_sweep(base, cells, str(tmp_path))


@pytest.mark.parametrize("saved", [False, True])
def test_a_cell_whose_victim_owner_failed_trains_the_victim(tmp_path, monkeypatch, saved):
  """When the cell that trains a shared victim fails before saving it, the next cell of that
  victim trains it (and, failing too, hands it on) and the others borrow from the one that does;
  a failed owner whose models were saved (e.g. a defense failed) still lends them. A cell that
  began to train its own in a killed earlier run of the sweep goes on with it."""
  digests, ran, counts = owner_failure_sweep(tmp_path, monkeypatch, 5, began=4, failing=2,
                                             saved=saved)
  owner = lambda i: sweep.cell_dir(str(tmp_path), digests[i])
  if saved:
    assert ran[:4] == [(digests[0], "")] + [(d, owner(0)) for d in digests[1:4]]
  else:
    assert ran[:4] == [(d, "") for d in digests[:3]] + [(digests[3], owner(2))]
  assert ran[4] == (digests[4], "")
  assert counts == {"done": 3, "skipped": 0, "failed": 2}
  with sqlite3.connect(tmp_path / "results.sqlite") as db:
    rows = dict(db.execute("SELECT config_hash, json_extract(config, '$.standard.victim_from') "
                           "FROM runs").fetchall())
  assert rows == dict(ran)  # each row holds the config its cell ran with


def test_a_cell_that_began_its_own_victim_lends_it_when_the_owner_fails(tmp_path, monkeypatch):
  """Cell 1 began to train its own victim in a killed earlier run; the owner (cell 0) fails
  before saving its victim; cell 2 borrows cell 1's instead of training a third."""
  digests, ran, counts = owner_failure_sweep(tmp_path, monkeypatch, 3, began=1, failing=1,
                                             saved=False)
  assert counts == {"done": 2, "skipped": 0, "failed": 1}
  assert ran == [(digests[0], ""), (digests[1], ""),
                 (digests[2], sweep.cell_dir(str(tmp_path), digests[1]))]


@pytest.mark.slow
def test_a_defense_sweep_trains_each_victim_once(tmp_path):
  """A sweep over a defense's settings trains the victim once: the other cell defends its models,
  with the defended metrics of a run that trains its own victim. A victim run that is not this
  config's (config, poison plan, checkpoints) is refused before the workdir is made."""
  from jaxbd import experiments  # pylint: disable=g-import-not-at-top
  from jaxbd.experiments import standard  # pylint: disable=g-import-not-at-top
  base = tiny_digits_config(**{"defense.names": "ft", "defense.ft.epochs": 1,
                               "defense.ft.eval_every": 0, "defense.ft.checkpoint_every": 0})
  cells = sweep.parse_grid("defense.ft.lr=0.01,0.03", base)
  assert sweep.run_sweep(base, cells, str(tmp_path)) == {"done": 2, "skipped": 0, "failed": 0}
  dirs = [tmp_path / "cells" / sweep.config_hash(config_lib.apply_cell(base, c)) for c in cells]
  docs = [json.loads((d / "results.json").read_text()) for d in dirs]
  assert (dirs[0] / "checkpoints" / "backdoored" / "2").is_dir()
  assert not (dirs[1] / "checkpoints" / "backdoored").exists()
  assert docs[1]["attack"]["victim_from"] == str(dirs[0])
  assert docs[1]["metrics"] == docs[0]["metrics"]
  assert "backdoored" in docs[0]["timing"] and "backdoored" not in docs[1]["timing"]
  assert docs[1]["defenses"]["ft"] != docs[0]["defenses"]["ft"]
  alone = experiments.run(config_lib.apply_cell(base, cells[1]), str(tmp_path / "alone"))
  assert alone["metrics"] == docs[1]["metrics"]
  for key in ("acc", "asr", "ra", "der"):  # 360 test images: 1e-6 is far below one image
    assert alone["defenses"]["ft"][key] == pytest.approx(docs[1]["defenses"]["ft"][key], abs=1e-6)

  victim = tmp_path / "victim"
  shutil.copytree(dirs[0], victim)
  files = lambda: sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
  before = files()
  config = config_lib.apply_cell(base, {"standard.victim_from": str(victim)})
  workdir = tmp_path / "refused"
  other_rate = config_lib.apply_cell(config, {"poison.rate": 0.2})
  with pytest.raises(ConfigError, match="standard.victim_from: the run in .* has another config "
                     r"outside defense and log \(first difference: poison.rate\)"):
    experiments.run(other_rate, str(workdir))
  shift_plan(victim)
  with pytest.raises(CheckpointError, match="holds another poison plan than this run draws "
                     r"\(first difference: indices.*train the victim again"):
    experiments.run(config, str(workdir))
  assert files() == before  # the victim's folder is only read
  shutil.copy(dirs[0] / "poison_plan.npz", victim)
  assert standard.victim_saved(config, str(victim))
  shutil.rmtree(victim / "checkpoints" / "backdoored")
  assert not standard.victim_saved(config, str(victim))
  with pytest.raises(CheckpointError, match="no checkpoint of phase 'backdoored' in"):
    experiments.run(config, str(workdir))
  assert not workdir.exists()


def test_store_rows_and_results_files_are_strict_json(tmp_path):
  """A NaN (a diverged loss, an undefined rate) is stored as null: SQLite's json_extract and other
  strict readers refuse the NaN token, and one such row would break a query over the sweep."""
  from jaxbd.experiments import results  # pylint: disable=g-import-not-at-top
  from jaxbd.train import loop  # pylint: disable=g-import-not-at-top
  doc = {"metrics": {"backdoored": {"acc": np.float32(0.5), "asr": float("nan"),
                                    "per_class": np.array([np.inf, 0.25])}}}
  with sweep.store(str(tmp_path / "s.sqlite")) as connection:
    sweep.record(connection, digest="d", cell={"seed": 0}, config=config_lib.load_file(
        str(REPO / "configs" / "quickstart.py")), workdir="w", doc=doc, error=None, seconds=1.0)
    assert connection.execute(
        "SELECT json_extract(metrics, '$.backdoored.acc'), json_extract(metrics, "
        "'$.backdoored.asr'), json_extract(metrics, '$.backdoored.per_class') FROM runs"
    ).fetchall() == [(0.5, None, "[null,0.25]")]
  results.write_json(str(tmp_path / "r.json"), doc)
  strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
  assert strict((tmp_path / "r.json").read_text())["metrics"]["backdoored"]["asr"] is None
  log = loop.MetricsLog(str(tmp_path))
  log.write(phase="train", epoch=1, loss=np.float32("nan"), acc=0.5)
  assert strict((tmp_path / "metrics.jsonl").read_text()) == {"phase": "train", "epoch": 1,
                                                              "loss": None, "acc": 0.5}
