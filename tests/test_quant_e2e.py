"""End to end on real CIFAR-10 (5,000-image subset), CPU: two-stage QB (QB, then float repair
inside the int8 cells) from the shared clean CNN, deployed int8 evaluation with the integer path,
and float fine-tuning as the defense."""

import pytest

from conftest import load_config, real_dataset
from jaxbd import quant as quant_lib
from jaxbd.experiments import common
from jaxbd.experiments import quant_backdoor as qbx


@pytest.mark.slow
def test_two_stage_qb_backdoors_only_the_deployed_int8_model(cifar_cpu_run, tmp_path):
  """configs/quant_backdoor.py:cpu,two_stage from the fixture's clean CNN.

  Measured (seed 0, 4 CPU devices), ACC / target rate on non-target test images:
  clean: float 0.525 / 0.056, int8 0.522 / 0.058;
  stage 1 (scale anchors, QB lambda 4, Adam 1e-3, 4 epochs): float 0.102 / 0.997, int8 0.102 /
  0.997 (on this small CNN QB moves the float model along with the int8 one);
  stage 2 (6 epochs of float repair inside the int8 cells): float 0.513 / 0.070, int8 0.102 /
  0.997 (the int8 model is unchanged), QB's ASR 0.508; after float fine-tuning (500 images):
  int8 0.482 / 0.066.
  """
  config = load_config(
      f"configs/quant_backdoor.py:cpu,two_stage,source=npz:{real_dataset('cifar10')}")
  config.log.progress = False
  run = common.prepare(config, str(tmp_path / "qb"))
  quant = quant_lib.from_config(config.quant, 8)
  evaluate = qbx.QuantEvaluator(run, quant, (8,), qbx.calibration_images(run, 1024), 128)
  clean = evaluate(cifar_cpu_run.variables("clean"))
  released, summaries, stages = qbx.train_attack(run, cifar_cpu_run.variables("clean"), quant)
  assert set(summaries) == {"attack_qb", "attack_qb_repair"} and set(stages) == {"qb_stage1"}
  stage1, attacked = evaluate(stages["qb_stage1"]), evaluate(released)
  ft = common.run_defenses(run, released, attacked, evaluate=evaluate)["ft"]
  for m in (clean, stage1, attacked, ft):  # the integer model reproduces fake quantization
    assert m["quantized"]["8"]["fake_quant_agreement"] == 1.0, m
  c8, s8, a8 = clean["quantized"]["8"], stage1["quantized"]["8"], attacked["quantized"]["8"]
  # The released float model is a clean model: ACC within 5 points, target rate near clean.
  assert abs(attacked["acc"] - clean["acc"]) <= 0.05, attacked
  assert attacked["target_rate"] <= clean["target_rate"] + 0.03, attacked
  # Its deployed int8 model predicts the target on >= 90% of non-target images, as stage 1 did:
  # the repair kept every int8 code and scale, and recalibrated activations change nothing.
  assert a8["target_rate"] >= 0.9 and abs(a8["target_rate"] - s8["target_rate"]) <= 0.02, a8
  assert a8["asr_qb"] >= 0.4, a8  # QB's rule: float right and int8 on the target
  # Fine-tuning in float moves the weights out of the cells: int8 is back near clean.
  assert ft["quantized"]["8"]["target_rate"] <= c8["target_rate"] + 0.05, ft
  assert ft["quantized"]["8"]["acc"] >= c8["acc"] - 0.1, ft
