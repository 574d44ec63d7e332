"""End to end on real CIFAR-10 (5,000-image subset), CPU, through the command line: two-stage QB
(QB, then float repair inside the int8 cells) from a clean CNN, deployed integer models evaluated
with the integer path, and float fine-tuning as the defense."""

import pytest


@pytest.mark.slow
def test_two_stage_qb_backdoors_only_the_deployed_int8_model(quant_cpu_run, cifar_cpu_run):
  """configs/quant_backdoor.py:cpu,two_stage (the clean CNN that configs/cifar10.py:cpu trained,
  taken from its run with `clean_from`, the two stages, FT on 500 images), run as a CLI process
  (see conftest.py).

  Measured (seed 0, 4 CPU devices), ACC / target rate on non-target test images:
  clean: float 0.5215 / 0.051, int8 0.521 / 0.052, int6 0.5135 / 0.037;
  stage 1 (scale anchors, QB lambda 4, Adam 1e-3, 4 epochs): float 0.1025 / 0.997, int8 0.102 /
  0.997 (on this small CNN QB moves the float model along with the int8 one);
  stage 2 (6 epochs of float repair inside the int8 cells): float 0.5005 / 0.063, int8 0.102 /
  0.997 (the int8 model is unchanged), QB's ASR 0.501, int6 0.466 / 0.026; after float
  fine-tuning: int8 0.475 / 0.050.
  """
  doc = quant_cpu_run.doc
  assert "attack_qb_repair" in doc["timing"]
  clean, stage1, attacked = (doc["metrics"][k] for k in ("clean", "qb_stage1", "backdoored"))
  # The clean model is the other run's, not trained again: its float accuracy is the one that
  # run measured on the same test images.
  assert doc["attack"]["clean_from"] == cifar_cpu_run.workdir and "clean" not in doc["timing"]
  assert clean["acc"] == cifar_cpu_run.doc["metrics"]["clean"]["acc"]
  ft = doc["defenses"]["ft"]
  for m in (clean, stage1, attacked, ft):  # the integer models reproduce fake quantization
    assert set(m["quantized"]) == {"8", "6", "4"}, m
    assert all(q["fake_quant_agreement"] == 1.0 for q in m["quantized"].values()), m
  c8, s8, a8 = clean["quantized"]["8"], stage1["quantized"]["8"], attacked["quantized"]["8"]
  # The released float model is a clean model: ACC within 5 points, target rate near clean.
  assert abs(attacked["acc"] - clean["acc"]) <= 0.05, attacked
  assert attacked["target_rate"] <= clean["target_rate"] + 0.03, attacked
  # Its deployed int8 model predicts the target on >= 90% of non-target images, as stage 1 did:
  # the repair kept every int8 code and scale, and recalibrated activations change nothing.
  assert a8["target_rate"] >= 0.9 and abs(a8["target_rate"] - s8["target_rate"]) <= 0.02, a8
  assert a8["asr_qb"] >= 0.4, a8  # QB's rule: float right and int8 on the target
  # The backdoor is the int8 model's: deployed in int6 the model stays near clean.
  assert attacked["quantized"]["6"]["target_rate"] <= (
      clean["quantized"]["6"]["target_rate"] + 0.05), attacked
  # Fine-tuning in float moves the weights out of the cells: int8 is back near clean.
  assert ft["quantized"]["8"]["target_rate"] <= c8["target_rate"] + 0.05, ft
  assert ft["quantized"]["8"]["acc"] >= c8["acc"] - 0.1, ft
