"""End to end on real CIFAR-10 (5,000-image subset), CPU: QB from the shared clean CNN, deployed
int8/int4 evaluation with the integer path, and float fine-tuning as the defense."""

import pytest

from conftest import load_config, real_dataset
from jaxbd import quant as quant_lib
from jaxbd.experiments import common
from jaxbd.experiments import quant_backdoor as qbx


@pytest.mark.slow
def test_qb_deployed_int8_and_float_fine_tuning(cifar_cpu_run, tmp_path):
  """configs/quant_backdoor.py:cpu from the fixture's clean CNN.

  Measured (seed 0, 4 CPU devices), ACC / target rate on non-target test images:
  clean: float 0.526 / 0.056, int8 0.522 / 0.058, int4 0.487 / 0.076;
  after 4 epochs of QB (reference Adam 1e-4, lambda 0.5): float 0.405 / 0.421, int8 0.410 /
  0.410, int4 0.325 / 0.573; after float fine-tuning (500 images): int8 0.508 / 0.048.
  QB raises the deployed int8 model's target rate, but not only the int8 model's: on this
  24k-parameter CNN the quantized pass's gradient is nearly parallel to the float one at W8A8
  (cosine 0.9999), so the float model moves with it and QB's ASR rule (float right and int8 on
  the target) stays ~0. The goal (int8 >= 0.9 with the float model near clean) is not
  reached on CPU; this test pins what the pipeline does measure.
  """
  config = load_config(f"configs/quant_backdoor.py:cpu,source=npz:{real_dataset('cifar10')}")
  config.log.progress = False
  run = common.prepare(config, str(tmp_path / "qb"))
  quant = quant_lib.from_config(config.quant, 8)
  evaluate = qbx.QuantEvaluator(run, quant, (8, 4), qbx.calibration_images(run, 1024), 128)
  clean = evaluate(cifar_cpu_run.variables("clean"))
  attacked_vars, _ = qbx.train_attack(run, cifar_cpu_run.variables("clean"), quant)
  attacked = evaluate(attacked_vars)
  ft = common.run_defenses(run, attacked_vars, attacked, evaluate=evaluate)["ft"]
  for m in (clean, attacked, ft):  # the integer model reproduces fake quantization exactly
    assert all(q["fake_quant_agreement"] == 1.0 for q in m["quantized"].values()), m
  c8, c4 = clean["quantized"]["8"], clean["quantized"]["4"]
  assert abs(c8["acc"] - clean["acc"]) <= 0.02
  assert abs(c8["target_rate"] - clean["target_rate"]) <= 0.02
  assert c4["acc"] <= c8["acc"] + 0.01  # 4 bits costs accuracy, 8 bits does not
  assert attacked["quantized"]["8"]["target_rate"] >= c8["target_rate"] + 0.2, attacked
  assert ft["quantized"]["8"]["target_rate"] <= c8["target_rate"] + 0.05, ft
