"""Label-consistent poisoning (`jaxbd.poison.adversarial`): PGD stays in its eps-ball and raises the
surrogate's loss, batches do not change it, the standard experiment perturbs exactly the poisoned
rows and saves them, and settings it cannot run are refused before anything is written."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbd import config as config_lib
from jaxbd import experiments, poison
from jaxbd.errors import CheckpointError, ConfigError
from jaxbd.experiments import selection, standard

from conftest import tiny_digits_config


class Linear(nn.Module):
  """A linear classifier of 8x8x1 images with the library's `train` argument."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.fixture
def linear():
  model = Linear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 10)
  return model, variables, images, labels


def loss(model, variables, x, y):
  logits = model.apply(variables, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def test_pgd_stays_in_the_eps_ball_and_raises_every_images_loss(linear):
  model, variables, images, labels = linear
  x = jnp.asarray(images / 255.0, jnp.float32)
  out = poison.adversarial.pgd(model, variables, x, labels, eps=8 / 255, step_size=2 / 255,
                               steps=10)
  assert float(jnp.abs(out - x).max()) <= 8 / 255 + 1e-6
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  # 10 steps of 2/255 reach the 8/255 bound wherever the image leaves room
  assert float(jnp.abs(out - x).max()) > 7.9 / 255
  before, after = loss(model, variables, x, labels), loss(model, variables, out, labels)
  assert bool(jnp.all(after > before)), (before, after)


def test_perturbed_uint8_rows_keep_eps_levels_and_do_not_depend_on_the_batch(linear):
  model, variables, images, labels = linear
  section = config_lib.defaults().poison.adversarial
  section.eps = 6.0
  whole = poison.adversarial.perturb(model, variables, images, labels, section, batch_size=10)
  padded = poison.adversarial.perturb(model, variables, images, labels, section, batch_size=4)
  assert whole.dtype == np.uint8
  np.testing.assert_array_equal(whole, padded)
  change = np.abs(whole.astype(int) - images)
  assert change.max() == 6 and (change > 0).mean() > 0.5


def test_rounding_to_grey_levels_never_leaves_the_ball():
  original = np.array([[0, 100, 255]], np.uint8)
  perturbed = np.array([[0.5 / 255, 108.49 / 255, 247.4 / 255]])
  assert poison.adversarial.to_levels(perturbed, original, 8.0).tolist() == [[0, 108, 247]]
  assert poison.adversarial.to_levels(perturbed, original, 7.5).tolist() == [[0, 107, 248]]


def test_standard_experiment_perturbs_exactly_the_poisoned_rows(tmp_path):
  """SIG, clean-label, on the offline digits: the clean model is trained first and is the
  surrogate; only the plan's rows change, by at most eps levels, and they are saved."""
  c = tiny_digits_config(**{"poison.name": "sig", "poison.label_mode": "clean_label",
                            "poison.rate": 0.05, "poison.adversarial.eps": 16.0,
                            "standard.train_clean": True, "train.epochs": 3})
  doc = experiments.run(c, str(tmp_path))
  plan = poison.load_plan(str(tmp_path / "poison_plan.npz"))
  with np.load(tmp_path / "adversarial_rows.npz") as z:
    indices, images = z["indices"], z["images"]
  np.testing.assert_array_equal(indices, plan.indices)
  original = experiments.common.build(c, str(tmp_path)).dataset.x_train[indices]
  change = np.abs(images.astype(int) - original)
  assert 0 < change.max() <= 16
  adv = doc["attack"]["adversarial"]
  assert adv["eps"] == 16.0 and adv["max_change"] == change.max()
  assert adv["surrogate_acc_after"] < adv["surrogate_acc_before"]
  assert json.loads((tmp_path / "results.json").read_text())["attack"] == doc["attack"]
  assert not standard.population_ready(c)
  # A rerun resumes with the saved rows, and refuses rows of another plan.
  (tmp_path / "results.json").unlink()
  assert experiments.run(c, str(tmp_path))["attack"] == doc["attack"]
  np.savez(tmp_path / "adversarial_rows.npz", indices=indices[::-1], images=images)
  with pytest.raises(CheckpointError, match="holds other rows than this run's poison plan"):
    experiments.run(c, str(tmp_path))
  (tmp_path / "adversarial_rows.npz").write_text("cut short")
  with pytest.raises(CheckpointError, match="adversarial_rows.npz is unreadable"):
    experiments.run(c, str(tmp_path))


@pytest.mark.parametrize("overrides,message", [
    ({"poison.adversarial.eps": 300.0}, "'poison.adversarial.eps' must be in [0, 255]"),
    ({"poison.adversarial.steps": 0}, "'poison.adversarial.steps' must be in [1, inf]"),
    ({"poison.label_mode": "all2one"}, "needs poison.label_mode=clean_label, got 'all2one'"),
    ({"standard.train_clean": False}, "with standard.train_clean=True (the clean model is the"),
    ({"poison.rate": 0.0}, "needs a trigger and poison.rate > 0"),
])
def test_settings_label_consistent_poisoning_cannot_run_are_refused(tmp_path, overrides,
                                                                     message):
  c = tiny_digits_config(**{"poison.label_mode": "clean_label", "poison.adversarial.eps": 8.0,
                            "standard.train_clean": True, **overrides})
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
    experiments.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_heldout_selection_refuses_label_consistent_poisoning(tmp_path):
  c = tiny_digits_config(**{"poison.label_mode": "clean_label", "poison.adversarial.eps": 8.0,
                            "standard.train_clean": True, "data.train_limit": 1000})
  with pytest.raises(ConfigError, match="does not take label-consistent poisoning"):
    selection.select(c, str(tmp_path / "w"), "ft", [{"defense.ft.lr": 0.01}])
  assert not (tmp_path / "w").exists()
