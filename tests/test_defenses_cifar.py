"""D3 and Pivotal Tuning on real CIFAR-10, CPU: configs/d3.py:cpu's BadNets-backdoored 16-wide CNN
(45,000-image training subset, 3 epochs; ACC ~0.60, ASR 1.0 on a 2,000-image test subset).

Acceptance criteria: D3 with 5% clean data (2,250 images) brings ASR below 10% with ACC within 5
points of the backdoored model; Pivotal Tuning with 1% clean data (450 images) at least halves
ASR with ACC within 3 points. The settings are the `cpu` branches of configs/d3.py and
configs/pick_your_poison.py, chosen on 5,000 held-out training images outside the subset with
`python -m jaxbd.select` (never test data; see the configs). D3's criteria hold; PT keeps ACC but
leaves ASR at 1.0 on this CNN (and on PreAct-ResNet18 at width 16 and 32, see README), a strict
expected failure so that it turns into an error once it holds.
"""

import pytest

from jaxbd import analysis


@pytest.mark.slow
def test_d3_with_5_percent_clean_data_removes_badnets(d3_cpu_run):
  """Measured (4 CPU devices, as the suite runs): ACC 0.5975 -> 0.5720 (2.55 points lost), ASR
  1.0 -> 0.079, DER 0.948; on an AVX-512 CPU (the same twice): 0.5965 -> 0.5645, ASR 0.097.
  With the warm-up's earlier key (shared with D3's first step) on two
  CPUs: 0.5965 -> 0.5895, ASR 0.039; 0.5975 -> 0.5785, ASR 0.058 (float round-off differs
  between CPUs and changes what training reaches). With 2 devices the victim differs slightly
  (ACC 0.5915)."""
  doc = d3_cpu_run.doc
  before, after = doc["metrics"]["backdoored"], doc["defenses"]["d3"]
  assert after["trusted_size"] == 2250
  assert after["layers"] == ["head/kernel"]
  assert before["asr"] >= 0.9, before
  assert after["asr"] < 0.10, after
  assert after["acc"] >= before["acc"] - 0.05, (before, after)


@pytest.mark.slow
def test_fine_tuning_on_the_same_clean_data_keeps_the_backdoor(d3_cpu_run):
  """D3's reason to exist (its paper's FT row, here on BadNets): vanilla fine-tuning on the same
  2,250 images keeps ACC and the backdoor. Measured (two CPUs): ACC 0.5965 -> 0.583 and
  0.5975 -> 0.590, ASR 1.0."""
  doc = d3_cpu_run.doc
  before, after = doc["metrics"]["backdoored"], doc["defenses"]["ft"]
  assert after["acc"] >= before["acc"] - 0.03, (before, after)
  assert after["asr"] >= 0.9, after


@pytest.mark.slow
def test_pivotal_tuning_with_1_percent_clean_data_keeps_accuracy(pt_cpu_run, d3_cpu_run):
  """configs/pick_your_poison.py:cpu's PT on d3_cpu_run's victim (`standard.victim_from`: the
  same model, evaluated the same). Measured (4 CPU devices, an AVX-512 CPU): ACC 0.5965 ->
  0.5910, ASR 1.0 -> 1.0; before the suite ran the command, the repair had another key: on two
  CPUs 0.5965 -> 0.5945 and 0.5975 -> 0.593, ASR 1.0."""
  doc = pt_cpu_run.doc
  assert doc["attack"]["victim_from"] == d3_cpu_run.workdir
  assert doc["metrics"] == d3_cpu_run.doc["metrics"]
  before, after = doc["metrics"]["backdoored"], doc["defenses"]["pt"]
  assert after["trusted_size"] == 450
  assert after["acc"] >= before["acc"] - 0.03, (before, after)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="on this CNN no PT setting that keeps ACC within 3 "
                   "points lowers the ASR of the BadNets checkerboard (see "
                   "configs/pick_your_poison.py)")
def test_pivotal_tuning_with_1_percent_clean_data_halves_asr(pt_cpu_run):
  doc = pt_cpu_run.doc
  before, after = doc["metrics"]["backdoored"], doc["defenses"]["pt"]
  assert after["asr"] <= 0.5 * before["asr"], (before, after)


@pytest.mark.slow
def test_a_head_fitted_on_trusted_clean_features_keeps_the_backdoor(d3_cpu_run):
  """Why the clean-data repairs that stay near the suspect model (FT, PT) fail on this CNN: a
  logistic-regression head fitted on the frozen features of the 5% trusted set (C 1) classifies
  clean images about as well as the model, and still sends the triggered ones to the target, so
  a repair must move the features, as D3 does. Measured (two CPUs): ACC 0.5855 and 0.588, ASR
  0.994 and 0.989 (on 1%, 450 images, the fit is poorer: ACC 0.548, ASR 0.587)."""
  run = d3_cpu_run.prepared
  ds, p = run.dataset, run.config.poison
  trusted = run.trusted(0.05)
  probe = analysis.linear_probe(run.model, d3_cpu_run.variables("backdoored"), trusted.images,
                                trusted.labels, ds.x_test, ds.y_test, run.trigger,
                                target=p.target, label_mode=p.label_mode,
                                num_classes=ds.num_classes, c=1.0)
  before = d3_cpu_run.doc["metrics"]["backdoored"]
  assert probe["acc"] >= before["acc"] - 0.03, (before, probe)
  assert probe["asr"] >= 0.9, probe
