"""The D3-table, Pick-your-Poison and detection configs validate for every argument; tables."""

import re

import numpy as np
import pytest

from conftest import load_config
from jaxbd import config as config_lib
from jaxbd import metrics, poison
from jaxbd.errors import ConfigError
from jaxbd.experiments import report, standard


@pytest.mark.parametrize("attack", ["badnets", "blended", "wanet", "sig"])
@pytest.mark.parametrize("cpu", [False, True])
def test_d3_table_configs(attack, cpu):
  c = load_config(f"configs/d3.py:attack={attack}" + (",cpu" if cpu else ""))
  config_lib.validate(c)
  assert c.poison.name == attack and c.poison.target == 0
  if attack == "wanet":  # in the training loop, as BackdoorBench
    assert c.attack.name == "batch" and c.attack.batch.batch_rate == 0.1 and c.poison.rate == 0
    assert c.attack.batch.augment == "backdoorbench"
  else:
    assert c.attack.name == "none" and c.poison.rate == 0.1
  assert c.poison.label_mode == ("clean_label" if attack == "sig" else "all2one")
  assert config_lib.defense_names(c) == ["ft", "d3", "pt"]
  assert c.defense.clean_fraction == 0.05
  if not cpu:  # the paper's settings
    assert c.model.name == "preact_resnet18" and c.train.epochs == 100
    d3 = c.defense.d3
    assert (d3.epochs, d3.batch_size, d3.lr, d3.lmd, d3.eps, d3.warm_up) == (
        100, 256, 0.01, 0.5, 0.1, "random")
  d3 = c.defense.d3  # the CPU recipe changes hyper-parameters only, never the algorithm
  assert d3.weight_decay == 0 and d3.schedule == "cosine" and d3.schedule_unit == "epoch"
  assert d3.train_mode and d3.layers == "" and d3.momentum == 0.9
  if cpu:  # one PT recipe per victim: the D3 table's PT column is the repair claim's PT
    assert c.defense.pt == load_config("configs/pick_your_poison.py:cpu").defense.pt


@pytest.mark.parametrize("attack", ["badnets", "adaptive_blend", "adaptive_patch", "wanet", "tsb",
                                    "sig", "refool", "clean_label", "latent", "pcb"])
def test_pick_your_poison_configs(attack):
  c = load_config(f"configs/pick_your_poison.py:attack={attack}")
  config_lib.validate(c)
  assert c.defense.clean_fraction == 0.01 and "pt" in config_lib.defense_names(c)
  assert c.model.name == "resnet18" and c.model.resnet18.width == 64  # the paper's victim
  pt = c.defense.pt
  assert (pt.steps, pt.lr, pt.nesterov, pt.slol, pt.param, pt.batch_size) == (
      2000, 1e-4, True, 0.05, 20000.0, 128)
  cpu_config = load_config(f"configs/pick_your_poison.py:attack={attack},cpu")
  config_lib.validate(cpu_config)
  cpu = cpu_config.defense.pt  # the CPU recipe keeps Nesterov SGD and the parameter penalty
  assert cpu.nesterov and cpu.momentum == 0.9 and cpu.param == 20000.0 and cpu.use_labels
  if attack == "pcb":
    assert c.attack.name == "pcb" and c.poison.rate == 0 and c.attack.pcb.batch_rate == 0.1
  if attack == "latent":  # attacker-run training: the fitted patch on 10% of every batch
    assert c.attack.name == "latent" and c.poison.rate == 0 and c.standard.train_clean
    assert c.poison.name == "badnets" and c.attack.latent.batch_rate == 0.1
  if attack in ("sig", "refool"):  # clean-label attacks in their papers
    assert c.poison.label_mode == "clean_label" and c.poison.name == attack
  if attack == "clean_label":  # label-consistent: PGD on target-class rows, the clean surrogate
    assert (c.poison.name, c.poison.label_mode) == ("badnets", "clean_label")
    assert c.poison.adversarial.eps == 8.0 and c.standard.train_clean


@pytest.mark.parametrize("name", ["d3", "pick_your_poison"])
def test_unknown_attack_argument_is_refused(name):
  with pytest.raises(ConfigError, match=f"configs/{name}.py: attack must be one of .*'lira'"):
    load_config(f"configs/{name}.py:attack=lira")


def test_detection_config():
  full = load_config("configs/detection.py")
  config_lib.validate(full)
  assert full.model.name == "resnet18" and full.detection.num_clean == 8
  assert (full.train.lr, full.train.schedule_unit, full.train.momentum) == (0.1, "step", 0.9)
  pyp = load_config("configs/pick_your_poison.py")  # both take cifar10.py's `pyp` victim
  assert {k: full.train[k] for k in pyp.train} == pyp.train.to_dict()
  assert pyp.model.name == "resnet18"
  with pytest.raises(ConfigError, match="pyp is a full-scale victim; it does not go with cpu"):
    load_config("configs/cifar10.py:cpu,pyp")
  c = load_config("configs/detection.py:cpu,clean=2,backdoored=3")
  config_lib.validate(c)
  assert c.model.name == "cnn"
  assert c.experiment == "detection" and c.detection.num_clean == 2
  assert c.detection.num_backdoored == 3 and c.detection.attacks == "badnets,blended"
  for scorers, message in (("cti,strip", "'detection.scorers' must be one of"),
                           ("", "'detection.scorers' names none of ['cti', 'nc']"),
                           ("nc,nc", "'detection.scorers' names 'nc' twice")):
    c.detection.scorers = scorers
    with pytest.raises(ConfigError, match=re.escape(message)):
      config_lib.validate(c)
  c.detection.scorers, c.detection.attacks = "cti", "badnets,badnets"
  with pytest.raises(ConfigError, match="'detection.attacks' names 'badnets' twice"):
    config_lib.validate(c)
  c.detection.attacks = "badnets,blended"
  c.detection.cti.repair = "d3"
  config_lib.validate(c)
  c.defense.d3.lmd = 0.0  # the repair's own section is checked
  with pytest.raises(ConfigError, match="defense.d3.lmd"):
    config_lib.validate(c)
  c.defense.d3.lmd = 0.5
  c.detection.cti.repair = "retrain"
  with pytest.raises(ConfigError, match="'detection.cti.repair' must be one of"):
    config_lib.validate(c)
  c.detection.cti.repair, c.detection.scorers = "pt", "nc"
  c.detection.nc.early_stop_patience = 0
  with pytest.raises(ConfigError, match="'detection.nc.early_stop_patience' must be in"):
    config_lib.validate(c)


def test_defense_table_from_results():
  doc = {"attack": {"name": "badnets"},
         "metrics": {"backdoored": {"acc": 0.9132, "asr": 0.9503, "ra": 0.04}},
         "defenses": {"d3": {"acc": 0.9077, "asr": 0.0074, "der": 0.96870}}}
  pcb = {"attack": {"name": "badnets", "training_attack": {"name": "pcb"}},
         "metrics": {"backdoored": {"acc": 0.9, "asr": 0.8}}, "defenses": {}}
  table = report.defense_table([doc, pcb])
  assert table.splitlines()[0] == "| attack | no defense | d3 |"
  assert "| badnets | 91.32 / 95.03 | 90.77 / 0.74 (96.87) |" in table
  assert "| badnets (pcb) | 90.00 / 80.00 |  |" in table
  reference = {"source": "paper", "table": {"badnets": {"backdoored": {"acc": 0.9, "asr": 0.95},
                                                      "d3": {"acc": 0.89, "asr": 0.01}}}}
  lines = report.defense_table([doc, pcb], reference).splitlines()
  assert lines[2:5] == ["| badnets | 91.32 / 95.03 | 90.77 / 0.74 (96.87) |",
                        "| badnets (paper) | 90.00 / 95.00 | 89.00 / 1.00 |",
                        "| badnets (pcb) | 90.00 / 80.00 |  |"]  # no published row for PCB


def test_defense_table_names_the_fields_that_tell_runs_of_one_attack_apart():
  """Runs of one attack (a defense sweep) get a column per config field they differ in, except
  `standard.victim_from` (where the models were trained); an attack with one run adds none."""
  def run(lmd, victim_from, attack="badnets", asr=0.5):
    return {"config": {"defense": {"d3": {"lmd": lmd}}, "standard": {"victim_from": victim_from},
                       "poison": {"name": attack}},
            "attack": {"name": attack}, "metrics": {"backdoored": {"acc": 0.9, "asr": 1.0}},
            "defenses": {"d3": {"acc": 0.8, "asr": asr, "der": 0.7}}}
  docs = [run(0.5, "", asr=0.25), run(3.0, "runs/a", asr=0.5), run(3.0, "", attack="blended")]
  lines = report.defense_table(docs).splitlines()
  assert lines[0] == "| attack | defense.d3.lmd | no defense | d3 |"
  assert lines[2:] == ["| badnets | 0.5 | 90.00 / 100.00 | 80.00 / 25.00 (70.00) |",
                       "| badnets | 3 | 90.00 / 100.00 | 80.00 / 50.00 (70.00) |",
                       "| blended | 3 | 90.00 / 100.00 | 80.00 / 50.00 (70.00) |"]
  assert report.distinguishing_fields(docs[1:]) == []


def test_d3_paper_reference_names_the_table_s_runs_and_its_der_follows_from_its_rates():
  """configs/d3_paper.json: one row per attack of configs/d3.py, named as the report names the
  runs (WaNet trains in the loop: "wanet (batch)"), and every DER is SPEC's formula of the row."""
  ref = report.read_reference("configs/d3_paper.json")
  names = []
  for attack in ("badnets", "blended", "wanet", "sig"):
    c = load_config(f"configs/d3.py:attack={attack}")
    training = {"training_attack": {"name": c.attack.name}} if c.attack.name != "none" else {}
    names.append(report.attack_name({"attack": {"name": c.poison.name, **training}}))
  assert sorted(ref["table"]) == sorted(names)
  for row in ref["table"].values():
    for model in row.values():
      if "der" in model:
        bd = row["backdoored"]
        want = metrics.defense_effectiveness_rating(bd["acc"], bd["asr"], model["acc"],
                                                    model["asr"])
        assert model["der"] == pytest.approx(want, abs=1e-4)  # the paper rounds to 0.01 points


def test_a_clean_run_records_no_poisoning_whatever_its_rate_field_holds():
  """`configs/cifar10.py:attack=none` keeps the default rate 0.1 in its config; results.json
  says what the run did: no trigger, rate 0, no poisoned rows."""
  c = load_config("configs/cifar10.py:attack=none")
  labels = np.arange(100) % 10
  section = standard.attack_section(c, poison.plan_from_config(c, labels, 10))
  assert section["name"] == "none" and section["poison_rate"] == 0.0
  assert section["num_poisoned"] == 0 and "params" not in section
  c = load_config("configs/cifar10.py")
  section = standard.attack_section(c, poison.plan_from_config(c, labels, 10))
  assert section["poison_rate"] == 0.1 and section["num_poisoned"] == 10
