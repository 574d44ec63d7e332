"""Held-out selection of a defense's hyper-parameters (`python -m jaxbd.select`): Pick your
Poison's rule, held-out images outside the training subset or from the trusted set, and the
command line."""

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import data as data_lib
from jaxbd.data.dataset import balanced_indices
from jaxbd.errors import ConfigError
from jaxbd.experiments import selection

from conftest import REPO, process_env, side_by_side, tiny_digits_config


@pytest.mark.parametrize("rows, chosen", [
    # lowest ASR among the settings within 3 points of the suspect's ACC 0.50
    ([{"acc": 0.49, "asr": 0.40}, {"acc": 0.46, "asr": 0.01}, {"acc": 0.475, "asr": 0.20}], 2),
    # equal ASR: the higher ACC
    ([{"acc": 0.48, "asr": 1.0}, {"acc": 0.49, "asr": 1.0}], 1),
    # the bound is inclusive
    ([{"acc": 0.47, "asr": 0.5}, {"acc": 0.50, "asr": 0.9}], 0),
    # nothing keeps ACC: no choice
    ([{"acc": 0.40, "asr": 0.0}], None),
])
def test_choose_takes_the_lowest_asr_among_settings_that_keep_accuracy(rows, chosen):
  assert selection.choose(0.50, rows, 0.03) == chosen


def test_a_loss_of_exactly_the_allowed_points_is_kept_despite_float_rounding():
  """On 2,000 held-out images 999 -> 939 correct is exactly 3 points, yet 0.4995 - 0.03 is
  0.46950000000000003 > 0.4695 in floating point."""
  assert 999 / 2000 - 0.03 > 939 / 2000
  assert selection.choose(999 / 2000, [{"acc": 939 / 2000, "asr": 0.0}], 0.03) == 0
  assert selection.choose(999 / 2000, [{"acc": 938 / 2000, "asr": 0.0}], 0.03) is None


def test_the_table_shows_swept_values_in_full():
  """Learning rates 1e-4, 5e-5 and 1e-5 stay readable (4 decimals would show 0.0001, 0.0001,
  0.0000); the metrics keep 4 decimals."""
  doc = {"suspect": {"acc": 0.6, "asr": 1.0, "ra": 0.0}, "max_acc_drop": 0.03, "chosen": 1,
         "settings": [{"cell": {"defense.pt.lr": lr}, "acc": 0.59, "asr": asr, "ra": 0.1}
                      for lr, asr in ((1e-4, 0.9), (5e-5, 0.5), (1e-5, 0.95))]}
  lines = selection.table(doc).splitlines()
  assert lines[3] == "| 0 | 0.0001 | 0.5900 | 0.9000 | 0.1000 | yes |  |"
  assert lines[4] == "| 1 | 5e-05 | 0.5900 | 0.5000 | 0.1000 | yes | <- |"
  assert lines[5].startswith("| 2 | 1e-05 |")


def test_heldout_images_are_balanced_training_images_outside_the_subset():
  c = config_lib.defaults()
  c.data.train_limit = 1000
  full = selection.load_full(c.data)
  np.testing.assert_array_equal(full.y_train, data_lib.load(config_lib.defaults().data).y_train)
  held = selection.heldout_split(full, 1000, 300)
  assert not set(held.indices) & set(balanced_indices(full.y_train, 1000))
  np.testing.assert_array_equal(held.images, full.x_train[held.indices])
  np.testing.assert_array_equal(held.labels, full.y_train[held.indices])
  assert np.bincount(held.labels).min() >= 29  # 300 images over 10 classes
  with pytest.raises(ConfigError, match=r"--heldout 500 must be in \[1, 437\]"):
    selection.heldout_split(full, 1000, 500)
  with pytest.raises(ConfigError, match="train_limit 5000 takes all 1437 training images"):
    selection.heldout_split(full, 5000, 100)
  c.data.train_limit = 0
  with pytest.raises(ConfigError, match="needs data.train_limit > 0.*--heldout_from=trusted"):
    selection.load_full(c.data)


def test_trusted_heldout_scores_settings_on_trusted_images_the_defense_does_not_train_on(
    tmp_path):
  """--heldout_from=trusted (the default) on the whole training split: the held-out images (a
  third unless --heldout says otherwise) are part of the trusted set the run draws (never a
  poisoned row), the defense gets the rest, and a size that leaves either part empty is refused
  before any file."""
  from jaxbd import defenses, experiments, poison, sweep  # pylint: disable=g-import-not-at-top
  c = tiny_digits_config(**{"defense.clean_fraction": 0.2})
  assert c.data.train_limit == 0
  cells = sweep.parse_grid("defense.ft.lr=0.01,0.2;defense.ft.epochs=2", c)
  with pytest.raises(ConfigError, match=r"--heldout 287 must be in \[1, 286\] with "
                     "--heldout_from=trusted"):
    selection.select(c, str(tmp_path / "bad"), "ft", cells, heldout=287, heldout_from="trusted")
  assert not (tmp_path / "bad").exists()
  doc = selection.select(c, str(tmp_path / "run"), "ft", cells)
  held = np.array(doc["heldout"]["indices"])
  assert doc["heldout"]["from"] == "trusted" and len(set(held)) == 96  # round(287 / 3)
  assert doc["trusted_size"] == 287 - 96
  ds = data_lib.load(c.data)
  plan = poison.load_plan(str(tmp_path / "run" / "poison_plan.npz"))
  drawn = defenses.trusted_split(ds.x_train, ds.y_train, plan.kind, 0.2, c.seed)
  assert set(held) <= set(drawn.indices) and not set(held) & set(plan.indices)
  low, high = doc["settings"]
  assert (low["acc"], low["asr"]) != (high["acc"], high["asr"])
  assert doc["chosen"] == selection.choose(doc["suspect"]["acc"], doc["settings"], 0.03)
  # The suspect's held-out metrics are its metrics on those trusted images.
  run = experiments.common.build(c, str(tmp_path / "run"), ds, [])
  variables = experiments.common.load_phase(run, "backdoored", c.train.epochs)
  assert run.evaluate(variables, ds.x_train[held], ds.y_train[held]) == doc["suspect"]


def select_cli(workdir, *args):
  cmd = [sys.executable, "-m", "jaxbd.select", "--config=configs/quickstart.py",
         "--config.train.epochs=3", "--config.model.cnn.width=8", "--config.log.progress=false",
         "--config.data.train_limit=1000", "--config.defense.clean_fraction=0.1",
         "--heldout_from=outside", "--heldout=400", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=process_env(),
                        timeout=600)


@pytest.mark.slow
def test_select_scores_every_setting_on_heldout_images_and_applies_the_rule(tmp_path):
  proc = select_cli(tmp_path / "run", "--defense=ft",
                    "--grid=defense.ft.lr=0.01,0.2;defense.ft.epochs=2")
  assert proc.returncode in (0, 1), proc.stderr[-3000:]
  doc = json.loads((tmp_path / "run" / "selection.json").read_text())
  assert [r["cell"] for r in doc["settings"]] == [
      {"defense.ft.lr": 0.01, "defense.ft.epochs": 2},
      {"defense.ft.lr": 0.2, "defense.ft.epochs": 2}]
  assert doc["heldout"]["size"] == 400 and doc["trusted_size"] == 100
  assert doc["suspect"]["asr"] > 0.5  # the backdoor the settings are scored against
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  last = [r for r in records if "acc" in r][-1]  # evaluated while it trained: held-out too
  assert {k: last[k] for k in ("acc", "asr", "ra")} == doc["suspect"]
  assert doc["chosen"] == selection.choose(doc["suspect"]["acc"], doc["settings"], 0.03)
  assert proc.returncode == (1 if doc["chosen"] is None else 0)
  assert "| setting | defense.ft.lr | defense.ft.epochs |" in proc.stdout
  # the two settings really differ: lr 0.2 moves the model further than lr 0.01
  low, high = doc["settings"]
  assert (low["acc"], low["asr"]) != (high["acc"], high["asr"])
  # Another selection on the same suspect (standard.victim_from) trains nothing and scores the
  # same settings the same.
  again = select_cli(tmp_path / "again", "--defense=ft", f"--config.standard.victim_from="
                     f"{tmp_path / 'run'}", "--grid=defense.ft.lr=0.01,0.2;defense.ft.epochs=2")
  assert again.returncode == proc.returncode, again.stderr[-3000:]
  redone = json.loads((tmp_path / "again" / "selection.json").read_text())
  assert {k: redone[k] for k in ("suspect", "settings", "chosen")} == {
      k: doc[k] for k in ("suspect", "settings", "chosen")}
  assert not (tmp_path / "again" / "checkpoints" / "backdoored").exists()


BAD_SELECTIONS = [
    (["--defense=ft", "--grid=poison.rate=0.1"],
     "--grid may only set defense.ft.* fields, got 'poison.rate'"),
    (["--defense=nc", "--grid=defense.ft.lr=0.1"], "--defense must be one of"),
    (["--defense=ft", "--grid=defense.ft.lr=-1"], "defense.ft.lr"),
    (["--defense=ft"], "--defense and --grid are required"),
    (["--defense=d3", "--grid=defense.d3.layers=head,conv9"],
     "defense.d3.layers: module 'conv9' has no kernel"),
]


@pytest.fixture(scope="module")
def bad_selection_runs(tmp_path_factory):
  """[(finished process, its workdir)] of each BAD_SELECTIONS command, run side by side."""
  root = tmp_path_factory.mktemp("bad_selections")
  workdirs = [root / f"run{i}" for i in range(len(BAD_SELECTIONS))]
  procs = side_by_side([functools.partial(select_cli, workdir, *args)
                        for workdir, (args, _) in zip(workdirs, BAD_SELECTIONS)])
  return list(zip(procs, workdirs))


@pytest.mark.parametrize("case", range(len(BAD_SELECTIONS)), ids=[m for _, m in BAD_SELECTIONS])
def test_bad_selections_are_one_line_before_any_file(bad_selection_runs, case):
  proc, workdir = bad_selection_runs[case]
  message = BAD_SELECTIONS[case][1]
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("jaxbd: error:") and message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not workdir.exists()
