"""Reports: tables parsed back hold the stored metrics, figures are PNGs, bad input exits 2."""

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxbd import experiments, metrics, sweep
from jaxbd.errors import ConfigError, DataError
from jaxbd.experiments import report

from conftest import REPO, process_env, tiny_digits_config


def tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
  """Every markdown table of a text as (header, rows of cell strings)."""
  out, lines = [], markdown.splitlines()
  for i, line in enumerate(lines):
    if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
      split = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]
      rows = []
      for row in lines[i + 2:]:
        if not row.startswith("|"):
          break
        rows.append(split(row))
      out.append((split(line), rows))
  return out


def table_with(markdown: str, *columns: str) -> list[dict[str, str]]:
  """The rows, as {column: cell}, of the one table whose header has all `columns`."""
  found = [(h, rows) for h, rows in tables(markdown) if set(columns) <= set(h)]
  assert len(found) == 1, [h for h, _ in tables(markdown)]
  header, rows = found[0]
  return [dict(zip(header, row)) for row in rows]


def assert_png(path) -> None:
  with Image.open(path) as image:
    assert image.format == "PNG" and min(image.size) > 100
    image.verify()


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxbd.report", *args], cwd=REPO, env=process_env(),
                        capture_output=True, text=True, timeout=300)


# A run with a BadPatches-style rate sweep: its report draws runs/<name>/asr_vs_rate.png.
SWEPT = {"config": {"experiment": "badpatches"}, "attack": {"name": "badpatches"}, "defenses": {},
         "metrics": {"backdoored": {"acc": 0.9, "asr": 0.95, "ra": 0.05}},
         "sweep": [{"attack": "badnets", "rate": r, "acc": 0.9, "asr": a, "ra": 1 - a}
                   for r, a in ((0.01, 0.5), (0.1, 0.9))]}


def results_dir(path, doc: dict) -> str:
  """A run directory `path` holding `doc` as its results.json."""
  path.mkdir(parents=True)
  (path / "results.json").write_text(json.dumps(doc))
  return str(path)


def listing(folder) -> dict[str, bytes | None]:
  """Every folder (None) and file (its bytes) under `folder`, hidden ones too, by relative path."""
  found = {}
  for directory, folders, files in os.walk(folder):
    for name in folders + files:
      path = os.path.join(directory, name)
      found[os.path.relpath(path, folder)] = None if name in folders else open(path, "rb").read()
  return found


def earlier_report(path) -> dict[str, bytes | None]:
  """An --out folder `path` holding an earlier report (report.md "OLD" and a figure); returns its
  `listing`."""
  (path / "runs" / "old").mkdir(parents=True)
  (path / "report.md").write_text("OLD\n")
  (path / "runs" / "old" / "roc.png").write_bytes(b"old figure")
  return listing(path)


@pytest.mark.slow
def test_report_of_sweep_store_and_runs(digits_sweep, tmp_path):
  """A 2 rates x 2 seeds sweep store plus a run with fine-tuning: every table parsed back holds
  the stored metrics, the rate curve is the mean and sample std over seeds, figures are PNGs."""
  config = tiny_digits_config(**{"defense.names": "ft", "defense.ft.epochs": 1,
                                 "defense.ft.eval_every": 0, "defense.ft.checkpoint_every": 0})
  doc = experiments.run(config, str(tmp_path / "ft_run"))
  out = tmp_path / "report"
  path = report.write_report([str(tmp_path / "ft_run"), f"{digits_sweep.workdir}/cells"],
                             digits_sweep.store, str(out))
  text = open(path).read()

  # The run with a defense: its models and defense rows.
  ft_section = text.split("## run1_ft_run")[1].split("\n## ")[0]
  rows = {r["model"]: r for r in table_with(ft_section, "model", "ACC", "ASR", "RA", "DER")}
  assert set(rows) == {"backdoored", "defense ft"}
  for name, m in [*doc["metrics"].items(), ("defense ft", doc["defenses"]["ft"])]:
    for key in ("acc", "asr", "ra"):
      assert float(rows[name][key.upper()]) == pytest.approx(m[key], abs=5e-5)
  assert float(rows["defense ft"]["DER"]) == pytest.approx(doc["defenses"]["ft"]["der"], abs=5e-5)
  defense_rows = table_with(text, "attack", "no defense", "ft")
  assert defense_rows[0]["ft"] == report.cell(doc["defenses"]["ft"], der=True)
  assert_png(out / "tradeoff.png")

  # The store: one row per cell, and the rate curve over seeds.
  with sqlite3.connect(digits_sweep.store) as db:
    stored = [(json.loads(c), json.loads(m)["backdoored"]) for c, m in
              db.execute("SELECT cell, metrics FROM runs WHERE status = 'done'")]
  assert len(stored) == 4
  cells = table_with(text, "poison.rate", "seed", "backdoored.asr")
  assert len(cells) == 4
  for cell, m in stored:
    row, = [r for r in cells if float(r["poison.rate"]) == cell["poison.rate"]
            and int(r["seed"]) == cell["seed"]]
    for key in ("acc", "asr", "ra"):
      assert float(row[f"backdoored.{key}"]) == pytest.approx(m[key], abs=5e-5)
  curve = table_with(text, "poison rate", "seeds", "ASR std")
  assert [float(r["poison rate"]) for r in curve] == [0.05, 0.2]
  for row in curve:
    asr = np.array([m["asr"] for c, m in stored if c["poison.rate"] == float(row["poison rate"])])
    assert row["attack"] == "badnets" and int(row["seeds"]) == len(asr) == 2
    assert float(row["ASR"]) == pytest.approx(asr.mean(), abs=5e-5)
    assert float(row["ASR std"]) == pytest.approx(asr.std(ddof=1), abs=5e-5)
  assert_png(out / "asr_vs_rate.png")
  assert text.count("\n## run") == 5  # the ft run and the 4 cells' results.json


def test_report_draws_routing_heatmaps_and_roc_curves(tmp_path):
  """Routing statistics (BadPatches) and detection scores in results files become tables and
  figures whose numbers are the documents'."""
  rng = np.random.default_rng(0)
  selected = lambda: rng.random((20, 4, 2)) < 0.5
  covered = np.zeros((20, 4), bool)
  covered[:, 3] = True
  stats = metrics.routing_statistics(selected(), selected(), covered)
  base = {"config": {"experiment": "badpatches"}, "dataset": "digits", "model": "pmoe_patch",
          "attack": {"name": "badpatches"}, "defenses": {}}
  routed = dict(base, metrics={"backdoored": {"acc": 0.9, "asr": 0.8, "ra": 0.1}},
                routing={"grid": [2, 2], "models": {"backdoored": {"moe_0": stats}}})
  suspicion = {"cti": [0.1, 0.3, 0.2, 0.9], "nc": [1.0, 0.2, 2.5, 3.0]}
  positive = np.array([False, False, True, True])
  members = [{"index": j, "attack": "badnets" if p else "none", "acc": 0.9, "asr": 0.5,
              **{n: {"suspicion": s[j]} for n, s in suspicion.items()}}
             for j, p in enumerate(positive)]
  detected = dict(base, config={"experiment": "detection"}, metrics={"members": members},
                  detection={n: {"auc": metrics.roc_auc(s, positive), "suspicion": s}
                             for n, s in suspicion.items()})
  for name, doc in (("routed", routed), ("detected", detected)):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "results.json").write_text(json.dumps(doc))
  path = report.write_report([str(tmp_path)], None, str(tmp_path / "report"))
  text = open(path).read()
  row, = table_with(text, "layer", "trigger patches routed")
  assert float(row["trigger patches routed"]) == pytest.approx(stats["trigger_routed"], abs=5e-5)
  aucs = {r["detector"]: float(r["ROC AUC"]) for r in table_with(text, "detector", "ROC AUC")}
  assert aucs == pytest.approx({"cti": 0.75, "nc": 1.0})
  assert_png(tmp_path / "report" / "runs" / "run1_detected" / "roc.png")
  assert_png(tmp_path / "report" / "runs" / "run2_routed" / "routing_backdoored_moe_0.png")
  assert "runs/run1_detected/roc.png" in text


def test_missing_and_corrupt_inputs_are_one_line_and_write_nothing(tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "results.json").write_text('{"metrics": {"backdoored": {"acc": 0.9')
  result = run_cli(f"--inputs={bad}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 2
  line, = result.stderr.strip().splitlines()
  assert line.startswith(f"jaxbd: error: {bad / 'results.json'} is not a readable results.json "
                         "(Expecting")
  assert not (tmp_path / "out").exists()
  (tmp_path / "store.sqlite").write_bytes(b"not a database" * 100)
  with pytest.raises(DataError, match="is not a readable sweep store"):
    report.write_report([], str(tmp_path / "store.sqlite"), str(tmp_path / "out"))
  with pytest.raises(DataError, match="does not exist"):
    report.write_report([str(tmp_path / "absent")], None, str(tmp_path / "out"))
  (bad / "results.json").write_text('{"metrics": {}}')
  with pytest.raises(DataError, match="no 'config' section"):
    report.write_report([str(bad)], None, str(tmp_path / "out"))
  (bad / "results.json").write_text(json.dumps(
      {"config": {}, "attack": {}, "metrics": {"backdoored": {"acc": 0.9, "asr": None}},
       "defenses": {"ft": {"acc": "high"}}}))
  with pytest.raises(DataError, match="defenses.ft.acc is 'high', not a rate"):
    report.write_report([str(bad)], None, str(tmp_path / "out"))
  valid = {"config": {"experiment": "standard"}, "attack": {"name": "badnets"}, "defenses": {},
           "metrics": {"backdoored": {"acc": 0.9, "asr": 0.95}}}
  for change, message in [
      ({"metrics": {"backdoored": {"acc": 2.5}}}, "metrics.backdoored.acc is 2.5, not a rate in"),
      ({"metrics": "oops"}, "its 'metrics' section is a JSON str, not an object"),
      ({"defenses": "oops"}, "its 'defenses' section is a JSON str, not an object"),
      ({"routing": {"models": {"pmoe": {"layer0": 3}}}}, "a structure the report cannot read"),
      ({"detection": {"cti": {"auc": 0.5}}}, r"cannot read \(KeyError: 'members'\)"),
      # a figure that fails after the report folder was made: the folder goes again
      ({"defenses": {"fp": {"acc": 0.5, "stages": {"pruned@0.2": 3}}}},
       r"read \(AttributeError"),
      ({"attack": {"name": "a", "adversarial": {"x": 1}}}, r"read \(KeyError: 'eps'\)"),
      ({"attack": {"name": "a", "training_attack": "wanet"}}, r"read \(TypeError")]:
    (bad / "results.json").write_text(json.dumps({**valid, **change}))
    with pytest.raises(DataError, match=message):
      report.write_report([str(bad)], None, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
  with pytest.raises(DataError, match="an input name is empty"):
    report.write_report([str(bad), ""], None, str(tmp_path / "out"))
  with pytest.raises(DataError, match="is a directory; give the sweep's results.sqlite"):
    report.write_report([], str(tmp_path), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  (bad / "results.json").write_text(json.dumps(
      {"config": {"experiment": "standard"}, "attack": {"name": "none"}, "defenses": {},
       "metrics": {"backdoored": {"acc": 0.9}}}))
  (tmp_path / "file").write_text("")
  result = run_cli(f"--inputs={bad}", f"--out={tmp_path / 'file' / 'out'}")
  assert result.returncode == 2
  line, = result.stderr.strip().splitlines()
  assert line.startswith(f"jaxbd: error: {tmp_path / 'file'}"), line


def test_reference_numbers_sit_under_the_measured_ones_and_a_bad_reference_is_one_line(tmp_path):
  """--reference=configs/d3_paper.json: the defense table gets the paper's row under the measured
  one; a reference that is not one is one line, exit status 2, and no report."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "results.json").write_text(json.dumps(
      {"config": {"experiment": "standard"}, "attack": {"name": "badnets"},
       "metrics": {"backdoored": {"acc": 0.9, "asr": 0.97}},
       "defenses": {"d3": {"acc": 0.89, "asr": 0.02, "der": 0.97}}}))
  result = run_cli(f"--inputs={run}", f"--out={tmp_path / 'out'}",
                   "--reference=configs/d3_paper.json")
  assert result.returncode == 0, result.stderr
  text = (tmp_path / "out" / "report.md").read_text()
  rows = table_with(text, "attack", "no defense", "d3")
  assert [r["attack"] for r in rows] == ["badnets", "badnets (paper)"]
  assert rows[1]["no defense"] == "91.32 / 95.03" and rows[1]["d3"] == "90.77 / 0.74 (96.87)"
  assert "paper: Wei, Liu & Zha (ICCV 2025)" in text
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"source": "x", "table": {"badnets": {"d3": {"acc": 90.77}}}}))
  result = run_cli(f"--inputs={run}", f"--out={tmp_path / 'out2'}", f"--reference={bad}")
  assert result.returncode == 2
  line, = result.stderr.strip().splitlines()
  assert line.startswith(f"jaxbd: error: {bad} is not a reference")
  assert not (tmp_path / "out2").exists()


def test_runs_of_one_attack_stand_together_and_null_rates_are_left_out(tmp_path):
  """The defense table groups the runs of an attack (the paper's row once, after them); a run
  named by several paths is read once; a null ASR (undefined or diverged) is left out of the
  trade-off figure; a store path with URI characters is opened as it is, read-only."""
  result = lambda attack, asr, d3: {
      "config": {"experiment": "standard", "seed": asr is None}, "attack": {"name": attack},
      "metrics": {"backdoored": {"acc": 0.9, "asr": asr}},
      "defenses": {"d3": {"acc": 0.88, "asr": d3, "der": None}}}
  for name, doc in (("a", result("badnets", 0.97, 0.02)), ("b", result("blended", 0.99, 0.01)),
                    ("c", result("badnets", None, None))):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(doc))
  inputs = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"),
            str(tmp_path / "a" / "results.json"), f"{tmp_path}/./a"]
  path = report.write_report(inputs, None, str(tmp_path / "out"),
                             str(REPO / "configs" / "d3_paper.json"))
  text = open(path).read()
  assert [r["attack"] for r in table_with(text, "attack", "no defense", "d3")] == [
      "badnets", "badnets", "badnets (paper)", "blended", "blended (paper)"]
  assert text.count("## run") == 3
  assert_png(tmp_path / "out" / "tradeoff.png")
  odd = tmp_path / "we#ird?%"
  odd.mkdir()
  with sweep.store(str(odd / "results.sqlite")):
    pass
  before = sorted(os.listdir(tmp_path))
  report.write_report([], str(odd / "results.sqlite"), str(tmp_path / "out2"))
  assert sorted(os.listdir(tmp_path)) == sorted(before + ["out2"])  # no stray file


def test_attack_names_say_how_the_backdoor_was_planted():
  """A table row names the trigger, then a training-time attack or label-consistent poisoning."""
  assert report.attack_name({"attack": {"name": "sig"}}) == "sig"
  assert report.attack_name(
      {"attack": {"name": "badnets", "training_attack": {"name": "pcb"}}}) == "badnets (pcb)"
  assert report.attack_name({"attack": {"name": "badnets", "adversarial": {"eps": 8.0}}}) == (
      "badnets (clean-label PGD, eps 8)")
  assert report.attack_name({"attack": {"names": ["badnets", "blended"]}}) == (
      "badnets,blended")


def test_sweep_entries_are_checked_like_the_other_rates(tmp_path, recwarn):
  """A results.json's `sweep` rows need a string attack, a poisoning rate in [0, 1] and rates
  in [0, 1] (or null): anything else is one line, exit status 2, and no report; a sweep of rate 0
  only is drawn without matplotlib's warnings."""
  run = results_dir(tmp_path / "run", dict(SWEPT, sweep=[
      {"attack": "b", "rate": 0.1, "acc": 0.5, "asr": 2.0, "ra": -3}]))
  result = run_cli(f"--inputs={run}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 2
  line, = result.stderr.strip().splitlines()
  assert line == (f"jaxbd: error: {run}/results.json is not a results.json: sweep[0].asr is 2.0, "
                  "not a rate in [0, 1]")
  assert not (tmp_path / "out").exists()
  entry = SWEPT["sweep"][0]
  for rows, message in [
      ([entry, {**entry, "ra": -3}], r"sweep\[1\]\.ra is -3, not a rate in \[0, 1\]"),
      ([{**entry, "acc": "high"}], r"sweep\[0\]\.acc is 'high', not a rate"),
      ([{**entry, "rate": "x"}], r"sweep\[0\]\.rate is 'x', not a poisoning rate in \[0, 1\]"),
      ([{**entry, "rate": 1.5}], r"sweep\[0\]\.rate is 1\.5, not a poisoning rate"),
      ([{**entry, "rate": None}], r"sweep\[0\]\.rate is None, not a poisoning rate"),
      ([{**entry, "rate": True}], r"sweep\[0\]\.rate is True, not a poisoning rate"),
      ([{k: v for k, v in entry.items() if k != "rate"}], r"sweep\[0\]\.rate is None"),
      ([{**entry, "attack": 3}], r"sweep\[0\]\.attack is 3, not a name"),
      ([entry, [0.1, 0.5]], r"sweep\[1\] is a JSON list, not an object"),
      ({"rate": 0.1}, "its 'sweep' section is a JSON dict, not a list")]:
    (tmp_path / "run" / "results.json").write_text(json.dumps(dict(SWEPT, sweep=rows)))
    with pytest.raises(DataError, match=message):
      report.write_report([run], None, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
  zero = [{**entry, "rate": 0, "asr": None}]
  (tmp_path / "run" / "results.json").write_text(json.dumps(dict(SWEPT, sweep=zero)))
  report.write_report([run], None, str(tmp_path / "out"))
  assert_png(tmp_path / "out" / "runs" / "run1_run" / "asr_vs_rate.png")
  assert not [str(w.message) for w in recwarn.list if "positive values" in str(w.message)]


def test_a_failing_report_leaves_an_existing_out_folder_as_it_was(tmp_path):
  """Bad input found before anything is written (a bad sweep rate, a store cell without a poison
  rate, a directory report.md) or while drawing (a figure that cannot be drawn, a file where the
  report needs a folder) is one line, exit status 2, and --out keeps exactly its earlier report;
  a report that succeeds replaces it and leaves no staging folder behind."""
  good = results_dir(tmp_path / "good", SWEPT)
  bad = results_dir(tmp_path / "bad", dict(SWEPT, sweep=[{**SWEPT["sweep"][0], "rate": "x"}]))
  out = tmp_path / "R"
  before = earlier_report(out)
  store = str(tmp_path / "results.sqlite")
  with sweep.store(store) as db:  # a finished cell whose config has no poison.rate
    db.execute("INSERT INTO runs (config_hash, cell, experiment, seed, status, workdir, metrics, "
               "defenses, attack, config, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               ("0" * 16, "{}", "standard", 0, "done", str(tmp_path / "cell"),
                json.dumps({"backdoored": {"acc": 0.9, "asr": 0.8}}), "{}",
                json.dumps({"name": "badnets"}), json.dumps({"experiment": "standard"}), "now"))
  for args, message in [
      ([f"--inputs={good},{bad}"], f"{bad}/results.json is not a results.json: sweep[0].rate is "
                                   "'x', not a poisoning rate in [0, 1]"),
      ([f"--inputs={good}", f"--store={store}"],
       f"{store} has a structure the report cannot read (KeyError: 'poison')")]:
    result = run_cli(*args, f"--out={out}")
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert line == f"jaxbd: error: {message}"
    assert listing(out) == before
  (out / "report.md").unlink()
  (out / "report.md").mkdir()
  before = listing(out)
  result = run_cli(f"--inputs={good}", f"--out={out}")
  assert result.returncode == 2
  line, = result.stderr.strip().splitlines()
  assert line.startswith(f"jaxbd: error: {out}/report.md is a directory, not a file"), line
  assert listing(out) == before
  (out / "report.md").rmdir()
  (out / "report.md").write_text("OLD\n")
  unprunable = dict(SWEPT, defenses={"fp": {"acc": 0.5, "stages": {"pruned@0.2": 3}}})
  results_dir(tmp_path / "unprunable", unprunable)
  before = listing(out)
  with pytest.raises(DataError, match=r"read \(AttributeError"):  # its figure fails, drawn last
    report.write_report([good, str(tmp_path / "unprunable")], None, str(out))
  assert listing(out) == before
  os.rename(out / "runs", tmp_path / "runs")
  (out / "runs").write_text("")  # a file where the figures' folder goes
  before = listing(out)
  with pytest.raises(ConfigError, match=f"{out}/runs is not a directory"):
    report.write_report([good], None, str(out))
  assert listing(out) == before
  (out / "runs").unlink()
  os.rename(tmp_path / "runs", out / "runs")
  report.write_report([good], None, str(out))
  after = listing(out)
  assert set(after) == {"report.md", "runs", "runs/old", "runs/old/roc.png", "runs/run1_good",
                        "runs/run1_good/asr_vs_rate.png"}
  assert b"![asr_vs_rate.png](runs/run1_good/asr_vs_rate.png)" in after["report.md"]
  assert_png(out / "runs" / "run1_good" / "asr_vs_rate.png")
