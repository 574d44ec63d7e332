"""D3 and Pivotal Tuning on real CIFAR-10 (5,000-image subset, CPU): the shared fixture's
BadNets-backdoored 16-wide CNN (ACC 0.4995 or 0.504 depending on the machine, ASR 1.0).

Acceptance criteria: D3 with 5% clean data brings ASR below 10% with ACC within 5 points of the
backdoored model; Pivotal Tuning with 1% clean data at least halves ASR with ACC within 3 points.
The settings are the `cpu` branches of configs/d3.py and configs/pick_your_poison.py, chosen on
held-out training images with `python -m jaxbd.select` (never test data; see the configs). On
this 24k-parameter CNN the ASR criterion of D3 and the ACC criterion of PT hold; D3's ACC
criterion and PT's ASR criterion do not, and are kept as strict expected failures so that they
turn into errors once they hold.
"""

import jax
import pytest

from conftest import load_config
from jaxbd import analysis, defenses


def defend(cifar_cpu_run, config_spec: str, name: str) -> dict:
  """Runs defense `name` of `config_spec` on the fixture's backdoored model (seed 0)."""
  config = load_config(config_spec)
  run = cifar_cpu_run.prepare()
  ds = run.dataset
  trusted = defenses.trusted_split(ds.x_train, ds.y_train, run.plan.kind,
                                   config.defense.clean_fraction, 0)
  ctx = defenses.Context(run.model, run.mesh, run.config.data, ds.num_classes, progress=False)
  defended, report = defenses.DEFENSES[name].build(
      ctx, cifar_cpu_run.variables("backdoored"), trusted, config.defense[name],
      jax.random.key(0))
  return {"before": cifar_cpu_run.doc["metrics"]["backdoored"], "after": run.evaluate(defended),
          "report": report, "trusted": len(trusted.labels)}


@pytest.fixture(scope="module")
def d3_result(cifar_cpu_run):
  return defend(cifar_cpu_run, "configs/d3.py:cpu", "d3")


@pytest.fixture(scope="module")
def pt_result(cifar_cpu_run):
  return defend(cifar_cpu_run, "configs/pick_your_poison.py:cpu", "pt")


@pytest.mark.slow
def test_d3_with_5_percent_clean_data_removes_badnets(d3_result):
  """Measured on two machines: ASR 1.0 -> 0.012 / 0.034, ACC 0.4995 -> 0.4395 / 0.504 -> 0.430
  (6.0 / 7.4 points lost; 8 on held-out images). The ACC bound here only says that D3 keeps a
  working classifier (chance is 0.1); the criterion's 5 points is the expected failure below."""
  before, after = d3_result["before"], d3_result["after"]
  assert d3_result["trusted"] == 250
  assert d3_result["report"]["layers"] == ["head/kernel"]
  assert before["asr"] >= 0.9
  assert after["asr"] < 0.10, after
  assert after["acc"] >= before["acc"] - 0.10, (before, after)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="D3 re-learns the re-initialized classifier from 250 "
                   "images; this CNN loses 6-8 points of ACC doing so (see configs/d3.py)")
def test_d3_keeps_accuracy_within_5_points(d3_result):
  before, after = d3_result["before"], d3_result["after"]
  assert after["acc"] >= before["acc"] - 0.05, (before, after)


@pytest.mark.slow
def test_pivotal_tuning_with_1_percent_clean_data_keeps_accuracy(pt_result):
  """Measured: ACC 0.504 -> 0.493 (1.1 points lost), ASR 1.0 -> 1.0."""
  before, after = pt_result["before"], pt_result["after"]
  assert pt_result["trusted"] == 50
  assert after["acc"] >= before["acc"] - 0.03, (before, after)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="on this CNN no PT setting that keeps ACC within 3 "
                   "points lowers the ASR of the BadNets checkerboard (see "
                   "configs/pick_your_poison.py)")
def test_pivotal_tuning_with_1_percent_clean_data_halves_asr(pt_result):
  before, after = pt_result["before"], pt_result["after"]
  assert after["asr"] <= 0.5 * before["asr"], (before, after)


@pytest.mark.slow
def test_a_head_fitted_on_trusted_clean_features_keeps_the_backdoor(cifar_cpu_run):
  """Why the clean-data repairs fail on this CNN: a logistic-regression head fitted on the frozen
  features of the 5% trusted set (C 1) classifies clean images about as well as the model, and
  still sends the triggered ones to the target. Measured: ACC 0.4805, ASR 1.0."""
  run = cifar_cpu_run.prepare()
  ds, p = run.dataset, run.config.poison
  trusted = defenses.trusted_split(ds.x_train, ds.y_train, run.plan.kind, 0.05, 0)
  probe = analysis.linear_probe(run.model, cifar_cpu_run.variables("backdoored"), trusted.images,
                                trusted.labels, ds.x_test, ds.y_test, run.trigger,
                                target=p.target, label_mode=p.label_mode,
                                num_classes=ds.num_classes, c=1.0)
  before = cifar_cpu_run.doc["metrics"]["backdoored"]
  assert probe["acc"] >= before["acc"] - 0.03, (before, probe)
  assert probe["asr"] >= 0.9, probe
