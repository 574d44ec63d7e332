"""Detection: NC's anomaly index, CTI/NC scores, and the population experiment end to end."""

import json

import jax
import numpy as np
import pytest

from conftest import compiled_while, load_config
from test_defenses import tiny_ctx, tiny_model, tiny_trusted
from jaxbd import defenses, experiments, metrics
from jaxbd.defenses import base, detection
from jaxbd.errors import CheckpointError, ConfigError, DataError, DivergedError
from jaxbd.experiments import detection as detection_experiment


def test_anomaly_index_of_the_smallest_norm():
  norms = np.array([10.0, 11.0, 9.0, 10.5, 9.5, 2.0])
  median = np.median(norms)
  mad = 1.4826 * np.median(np.abs(norms - median))
  assert detection.anomaly_index(norms) == pytest.approx((median - 2.0) / mad)
  assert detection.anomaly_index(np.array([3.0, 3.0, 3.0])) == 0.0


def test_cti_holds_out_a_random_part_of_the_trusted_set_for_its_scores():
  """The images that measure s_t are disjoint from those of the repair and the inversion, rows
  stay paired with their labels and training indices, and the split follows the key."""
  rng = np.random.default_rng(0)
  indices = np.sort(rng.choice(10_000, 40, replace=False))
  images = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
  trusted = defenses.Trusted(images, (indices % 10).astype(np.int32), indices)
  fit, scored = base.holdout(trusted, 0.25, jax.random.key(3))
  assert (len(fit.labels), len(scored.labels)) == (30, 10)
  assert not set(fit.indices) & set(scored.indices)
  assert sorted([*fit.indices, *scored.indices]) == indices.tolist()
  for part in (fit, scored):
    rows = np.searchsorted(indices, part.indices)
    np.testing.assert_array_equal(part.images, images[rows])
    np.testing.assert_array_equal(part.labels, part.indices % 10)
  again = base.holdout(trusted, 0.25, jax.random.key(3))[1]
  other = base.holdout(trusted, 0.25, jax.random.key(4))[1]
  assert again.indices.tolist() == scored.indices.tolist() != other.indices.tolist()
  with pytest.raises(ConfigError,
                     match="a held-out fraction 0.01 of 40 trusted images holds out 0"):
    base.holdout(trusted, 0.01, jax.random.key(0))


def test_cti_batches_leave_out_the_candidate_class_and_repeat_no_row_within_a_pass():
  """For candidate t every batch row has a label other than t; the stream is passes over those
  rows, each a permutation (no row twice before every row has come once), reshuffled per pass."""
  labels = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1], np.int32)
  steps, batch = 7, 4
  batches = detection.class_batches(jax.random.key(0), labels, 3, steps, batch)
  assert batches.shape == (steps, 3, batch) and batches.dtype == np.int32
  for t in range(3):
    pool = np.flatnonzero(labels != t)
    stream = batches[:, t].reshape(-1)
    assert (labels[stream] != t).all()
    passes = [stream[i:i + len(pool)] for i in range(0, len(stream), len(pool))]
    for p in passes[:-1]:
      assert sorted(p.tolist()) == pool.tolist()
    assert len(set(passes[-1].tolist())) == len(passes[-1])
    assert len({tuple(p.tolist()) for p in passes[:-1]}) > 1  # reshuffled
  with pytest.raises(DataError, match="needs trusted images of other classes"):
    detection.class_batches(jax.random.key(0), np.zeros(5, np.int32), 2, 1, 4)


def test_cti_calibrates_by_the_repair_it_is_given():
  """The repair sees only the fit part of the trusted set; with the suspect itself as its
  'repair' every class score s_t = ASR_P - ASR_R is exactly 0."""
  model, variables = tiny_model()
  trusted = tiny_trusted(40)
  seen = []

  def identity(v, fit, key):
    del key
    seen.append(len(fit.labels))
    return v

  cti = detection.cti_config()
  cti.steps, cti.batch_size = 3, 8
  s = detection.calibrated_trigger_inversion(tiny_ctx(model), variables, trusted, cti, identity,
                                             jax.random.key(1))
  assert seen == [20] and (s["fit_size"], s["scored_size"]) == (20, 20)
  assert s["class_scores"] == [0.0] * 5 and s["suspicion"] == 0.0


@pytest.mark.slow
def test_neural_cleanse_compiles_its_epoch_once(caplog):
  """Every epoch after the first reuses the first's program: the starting state has the types
  the epoch returns (a weakly typed start would compile a second one)."""
  model, variables = tiny_model()
  config = detection.nc_config()
  config.epochs, config.early_stop = 3, False
  compiled = compiled_while(caplog, detection.neural_cleanse, tiny_ctx(model), variables,
                            tiny_trusted(20), config, jax.random.key(0))
  epochs = [m for m in compiled if m.startswith("Compiling jit(_nc_epoch)")]
  assert len(epochs) == 1, epochs


def digits_population(clean: int, backdoored: int, epochs: int):
  """A detection config on digits: `clean` + `backdoored` 8-wide CNNs trained `epochs` epochs,
  10% of the training set trusted."""
  c = load_config(f"configs/detection.py:clean={clean},backdoored={backdoored}")
  c.data.source, c.data.train_limit, c.data.test_limit = "digits", 0, 0
  c.data.crop_padding, c.data.flip = 1, False
  c.model.name, c.model.cnn.width, c.model.cnn.stages = "cnn", 8, 2
  c.poison.badnets.size = 2
  c.train.update(dict(epochs=epochs, batch_size=64, lr=0.05, schedule_unit="step",
                      checkpoint_every=0, eval_every=0))
  c.defense.clean_fraction = 0.1
  return c


def test_detection_experiment_on_a_small_population(tmp_path, capsys):
  """1 clean + 2 backdoored (BadNets, Blended) CNNs on digits, trained under one vmapped step,
  scored by CTI and NC; the experiment reports each member as it is scored, and prints and
  writes the ROC AUC of both and a ROC plot."""
  c = digits_population(1, 2, epochs=15)
  c.defense.pt.update(dict(steps=20, lr=0.01, batch_size=48))
  c.detection.nc.epochs = 2
  c.detection.cti.steps = 10
  c.log.progress = True  # bars only on a terminal; the per-member lines always
  doc = experiments.run(c, str(tmp_path))
  captured = capsys.readouterr()
  out = captured.out
  assert "| cti |" in out and "| nc |" in out and "ROC AUC" in out
  scored = [l for l in captured.err.splitlines() if l.startswith("detection: member ")]
  assert [l.split(" (")[0] for l in scored] == [f"detection: member {i}/3" for i in (1, 2, 3)]
  assert all(" suspicion cti " in l and " nc " in l for l in scored), scored
  members = doc["metrics"]["members"]
  assert [m["attack"] for m in members] == ["none", "badnets", "blended"]
  for m in members:
    assert m["acc"] >= 0.8, m
    if m["attack"] != "none":
      assert m["asr"] >= 0.8, m
  backdoored = np.array([m["attack"] != "none" for m in members])
  for name in ("cti", "nc"):
    suspicion = np.array(doc["detection"][name]["suspicion"])
    assert suspicion.tolist() == [m[name]["suspicion"] for m in members]
    # AUC = P(a backdoored member is more suspicious than a clean one), ties counting one half.
    pos, neg = suspicion[backdoored][:, None], suspicion[~backdoored][None, :]
    expected = np.mean((pos > neg) + 0.5 * (pos == neg))
    assert doc["detection"][name]["auc"] == pytest.approx(expected)
  for m in members:  # NC's score: the smallest mask norm (the reference's), low = suspicious
    nc = m["nc"]
    assert nc["score"] == nc["min_norm"] == min(nc["norms"]) == -nc["suspicion"]
    assert nc["anomaly_index"] == pytest.approx(detection.anomaly_index(nc["norms"]))
  # 10% of the 1,437 digits, half of them held out to measure CTI's s_t.
  assert [(m["cti"]["fit_size"], m["cti"]["scored_size"]) for m in members] == [(72, 72)] * 3
  assert doc["timing"]["vmap"] is True
  assert (tmp_path / "roc.png").stat().st_size > 1000
  assert json.loads((tmp_path / "results.json").read_text())["detection"] == doc["detection"]
  # The record: each backdoored member's plan and trigger, the trusted rows outside every plan.
  trusted = np.load(tmp_path / "trusted_indices.npy")
  assert len(trusted) == 144
  for m in members:
    path = tmp_path / f"poison_plan_member{m['index']}.npz"
    assert path.exists() == (m["attack"] != "none")
    if path.exists():
      with np.load(path) as plan:
        assert len(plan["indices"]) == int(0.1 * 1437) and not set(trusted) & set(plan["indices"])
        assert plan["trigger/mask"].shape == (8, 8, 1)


def nan_trigger_members(monkeypatch, broken: set[int]):
  """Makes `build_members` give the members of `broken` (indices) a NaN trigger pattern, so that
  their poisoned rows drive their training to NaN."""
  build = detection_experiment.build_members

  def members(r):
    out = build(r)
    for m in out:
      if m["index"] in broken:
        m["trigger"] = m["trigger"].replace(pattern=np.full_like(m["trigger"].pattern, np.nan))
    return out

  monkeypatch.setattr(detection_experiment, "build_members", members)


def nan_population(clean: int, backdoored: int):
  """`digits_population` of BadNets members for 10 epochs, scored by NC alone."""
  c = digits_population(clean, backdoored, epochs=10)
  c.detection.update(dict(attacks="badnets", scorers="nc"))
  c.detection.nc.epochs = 2
  return c


@pytest.mark.parametrize("vmap", [True, False])
def test_a_diverged_member_is_left_out_of_the_scores(tmp_path, monkeypatch, capsys, vmap):
  """One of two backdoored members diverges: the experiment says so on stderr, records it in
  results.json and its report, and scores the clean member and the other backdoored one."""
  nan_trigger_members(monkeypatch, {1})
  c = nan_population(1, 2)
  c.detection.vmap = vmap
  doc = experiments.run(c, str(tmp_path))
  captured = capsys.readouterr()
  assert "detection: member 2/3 (badnets, seed 2000) diverged and is left out" in captured.err
  assert [m["index"] for m in doc["metrics"]["members"]] == [0, 2]
  (row,) = doc["metrics"]["diverged"]
  assert (row["index"], row["attack"], row["seed"]) == (1, "badnets", 2000)
  assert "diverged" in row["error"]
  assert len(doc["detection"]["nc"]["suspicion"]) == 2
  assert "| diverged model |" in captured.out
  assert doc["metrics"]["members"][1]["asr"] >= 0.8


def test_a_population_without_backdoored_members_left_fails(tmp_path, monkeypatch):
  """Every backdoored member diverges: no ROC AUC can be measured, one DivergedError, and no
  results.json."""
  nan_trigger_members(monkeypatch, {1})
  with pytest.raises(DivergedError, match="every backdoored member of the detection population"):
    experiments.run(nan_population(1, 1), str(tmp_path))
  assert not (tmp_path / "results.json").exists()


def test_a_killed_detection_run_resumes_at_the_member_it_was_scoring(tmp_path, monkeypatch):
  """Killed while scoring the second member, the rerun restores the trained members, reads the
  first member's saved scores back, scores only the second, and reports what an uninterrupted
  run reports; a damaged score file is one CheckpointError."""
  nc = detection.neural_cleanse
  calls = []

  def counted(*args, **kwargs):
    calls.append(1)
    if interrupt and len(calls) == 2:
      raise KeyboardInterrupt
    return nc(*args, **kwargs)

  monkeypatch.setattr(detection, "neural_cleanse", counted)
  config = lambda: nan_population(1, 1)
  interrupt, workdir = True, tmp_path / "killed"
  with pytest.raises(KeyboardInterrupt):
    experiments.run(config(), str(workdir))
  assert sorted(p.name for p in (workdir / "scores").iterdir()) == ["member0.json"]
  assert not (workdir / "results.json").exists()
  interrupt, calls[:] = False, []
  resumed = experiments.run(config(), str(workdir))
  assert len(calls) == 1
  whole = experiments.run(config(), str(tmp_path / "whole"))
  assert resumed["metrics"]["members"] == whole["metrics"]["members"]
  assert resumed["detection"] == whole["detection"]
  (workdir / "scores" / "member0.json").write_text("{")
  with pytest.raises(CheckpointError, match="member0.json is not a member's scores"):
    experiments.run(config(), str(workdir))


def test_a_suspicion_that_is_not_finite_is_left_out_of_the_auc(tmp_path, monkeypatch, capsys):
  """NC gives the second backdoored member a NaN suspicion: it is left out of NC's ROC AUC (said
  on stderr, recorded as `left_out`), saved as null, and a rerun that reads it back reports the
  same; with no finite suspicion of a backdoored member left, one DivergedError."""
  nc, calls = detection.neural_cleanse, []

  def nan_for(members):
    def scored(*args, **kwargs):
      calls.append(1)
      out = nc(*args, **kwargs)
      return {**out, "suspicion": np.nan} if len(calls) in members else out
    return scored

  monkeypatch.setattr(detection, "neural_cleanse", nan_for({3}))
  doc = experiments.run(nan_population(1, 2), str(tmp_path / "w"))
  assert "nc scored members [3] with a suspicion that is not a finite number" in (
      capsys.readouterr().err)
  nc_doc = doc["detection"]["nc"]
  assert nc_doc["left_out"] == [2] and nc_doc["suspicion"][2] is None
  finite = nc_doc["suspicion"][:2]
  assert nc_doc["auc"] == metrics.roc_auc(finite, [False, True])
  saved = json.loads((tmp_path / "w" / "scores" / "member2.json").read_text())
  assert saved["nc"]["suspicion"] is None
  calls[:] = []
  again = experiments.run(nan_population(1, 2), str(tmp_path / "w"))
  assert not calls and again["detection"] == doc["detection"]
  calls[:] = []
  monkeypatch.setattr(detection, "neural_cleanse", nan_for({2, 3}))
  with pytest.raises(DivergedError, match="nc gave no finite suspicion for any clean or for any "
                                          "backdoored member"):
    experiments.run(nan_population(1, 2), str(tmp_path / "none"))


def test_a_repair_that_does_not_fit_the_model_is_refused_before_training(tmp_path):
  """CTI's repair by D3 with a layer the CNN lacks: one ConfigError before any member trains or
  any file is written."""
  c = load_config("configs/detection.py:clean=1,backdoored=1")
  c.data.source, c.data.train_limit, c.data.test_limit = "digits", 0, 0
  c.model.name = "cnn"
  c.detection.cti.repair, c.defense.d3.layers = "d3", "conv9"
  workdir = tmp_path / "w"
  with pytest.raises(ConfigError, match="defense.d3.layers: module 'conv9' has no kernel"):
    experiments.run(c, str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("overrides,message", [
    ({"poison.rate": 0.0}, "set poison.rate > 0"),
    ({"attack.name": "pcb", "poison.rate": 0.0}, "attack.name must be 'none', got 'pcb'"),
    # the trusted set comes from rows no member poisoned: 2 members at 10% leave about 81%
    ({"defense.clean_fraction": 0.85}, "defense.clean_fraction 0.85 asks for"),
    # one trusted image (of the 1,617 digits) cannot be split into CTI's repair and score parts
    ({"defense.clean_fraction": 0.0007}, r"config key 'detection.cti.score_fraction' 0.5 of 1 "
     r"trusted images holds out 0: one part would be empty"),
])
def test_a_population_that_cannot_be_scored_is_refused_before_training(tmp_path, overrides,
                                                                        message):
  """Backdoored members that would train clean (no poisoned rows, or a training-time attack the
  population does not run) or a trusted set larger than the rows no member poisoned: one
  ConfigError before any member trains or any file is written."""
  c = load_config("configs/detection.py:clean=1,backdoored=2")
  c.data.source, c.data.train_limit, c.data.test_limit = "digits", 0, 0
  c.model.name = "cnn"
  for path, value in overrides.items():
    section, key = path.split(".")
    c[section][key] = value
  workdir = tmp_path / "w"
  with pytest.raises(ConfigError, match=message):
    experiments.run(c, str(workdir))
  assert not workdir.exists()
