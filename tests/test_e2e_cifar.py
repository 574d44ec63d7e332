"""End to end on real CIFAR-10 (5,000-image subset), CPU: a clean CNN learns, BadNets backdoors
it."""

import numpy as np
import pytest

from jaxbd import poison


@pytest.mark.slow
def test_cnn_learns_cifar10_subset_and_badnets_backdoors_it(cifar_cpu_run):
  """configs/cifar10.py:cpu — measured: clean ACC 0.50, backdoored ACC 0.49-0.50, ASR 1.0."""
  doc = cifar_cpu_run.doc
  clean, bd = doc["metrics"]["clean"], doc["metrics"]["backdoored"]
  assert doc["attack"]["num_poisoned"] == 500
  assert clean["acc"] >= 0.45, clean  # on the 2,000-image class-balanced test subset
  assert clean["asr"] <= 0.20, clean  # the trigger alone does not fool a clean model
  assert bd["asr"] >= 0.90, bd
  assert clean["acc"] - bd["acc"] <= 0.05, (clean, bd)


@pytest.mark.slow
def test_saved_plan_and_checkpoint_reproduce_the_results(cifar_cpu_run):
  """The saved poison plan is the config's plan, and the saved model gives the reported metrics."""
  run = cifar_cpu_run.prepared
  saved = poison.load_plan(f"{cifar_cpu_run.workdir}/poison_plan.npz")
  np.testing.assert_array_equal(saved.indices, run.plan.indices)
  assert set(run.dataset.y_train[saved.indices]) <= set(range(1, 10))  # non-target rows only
  metrics = run.evaluate(cifar_cpu_run.variables("backdoored"))
  assert metrics == cifar_cpu_run.doc["metrics"]["backdoored"]
