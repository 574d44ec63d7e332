"""The Latent Backdoor (`jaxbd.attacks.latent`): the trigger is fitted inside its mask toward the
target's mean features on the clean model, the training loss adds exactly the latent distance of
the poisoned rows, the standard experiment saves and reuses the fitted trigger, and settings it
cannot run are refused before anything is written."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbd import config as config_lib
from jaxbd import experiments, models
from jaxbd import train as train_lib
from jaxbd.attacks import latent
from jaxbd.errors import CheckpointError, ConfigError
from jaxbd.experiments import selection

from conftest import tiny_digits_config

LATENT = {"attack.name": "latent", "poison.rate": 0.0, "standard.train_clean": True}


def cnn(num_classes=10):
  model = models.create(tiny_digits_config(), num_classes, (0.5,), (0.25,))
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)


def test_the_loss_adds_the_latent_distance_of_the_poisoned_rows():
  model, variables = cnn()
  params, state = train_lib.split_variables(variables)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(12, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray([0, 0, 0, 5, 0, 1, 0, 2, 3, 0, 4, 6])  # rows 3.. clean; 0 at 4, 6, 9
  key = jax.random.key(1)
  loss_fn = jax.jit(latent.latent_loss(model, 3, 0, 2.5))
  loss, (_, metrics) = loss_fn(params, state, images, labels, key)
  out = jax.jit(lambda p, s, x, k: train_lib.forward(model, p, s, x, k, with_features=True))(
      params, state, images, key)
  z = np.asarray(out.features)
  expected = np.mean((z[:3] - z[[4, 6, 9]].mean(0)) ** 2)
  ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
  np.testing.assert_allclose(float(metrics["latent"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(ce) + 2.5 * expected, rtol=1e-5)
  no_target = labels.at[3:].set(7)  # no clean target row in the batch: no latent term
  loss, (_, metrics) = loss_fn(params, state, images, no_target, key)
  assert float(metrics["latent"]) == 0.0 and float(loss) == float(metrics["loss"])


def test_standard_experiment_fits_the_trigger_inside_its_mask_and_reuses_it(tmp_path):
  c = tiny_digits_config(**LATENT, **{"poison.badnets.size": 3, "train.epochs": 3,
                                      "attack.latent.trigger_steps": 40})
  doc = experiments.run(c, str(tmp_path))
  fit = doc["attack"]["latent_trigger"]
  assert fit["distance_after"] < 0.9 * fit["distance_before"]
  with np.load(tmp_path / "latent_trigger.npz") as z:
    pattern, mask = z["pattern"], z["mask"][..., 0]
  assert mask.sum() == 9 and pattern.min() >= 0.0 and pattern.max() <= 1.0
  np.testing.assert_array_equal(pattern[mask == 0], 0.0)  # BadNets' pattern outside its patch
  assert np.abs(pattern[mask == 1] - 1.0).max() > 0.05  # moved from the white square
  assert doc["attack"]["training_attack"]["name"] == "latent"
  assert doc["metrics"]["backdoored"]["asr"] > 0.9
  # A rerun reads the fitted trigger back; a pattern of another shape or a broken file is refused.
  (tmp_path / "results.json").unlink()
  assert experiments.run(c, str(tmp_path))["attack"] == doc["attack"]
  # A run that defends these models (standard.victim_from) reads the fitted trigger from here,
  # and one whose victim lost it is refused before its workdir is made.
  borrower = config_lib.apply_cell(c, {"standard.victim_from": str(tmp_path)})
  again = experiments.run(borrower, str(tmp_path / "borrower"))
  assert again["metrics"] == doc["metrics"]
  assert again["attack"]["latent_trigger"] == {**fit, "file": "../latent_trigger.npz"}
  assert sorted(os.listdir(tmp_path / "borrower")) == [
      "config.json", "poison_plan.npz", "results.json"]
  os.rename(tmp_path / "latent_trigger.npz", tmp_path / "kept.npz")
  with pytest.raises(CheckpointError, match=r"latent_trigger.npz is missing \(the attack's"):
    experiments.run(borrower, str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()
  np.savez(tmp_path / "latent_trigger.npz", pattern=pattern[:4], mask=mask)
  with pytest.raises(CheckpointError, match=r"holds a float32\[4, 8, 1\] pattern"):
    experiments.run(c, str(tmp_path))
  (tmp_path / "latent_trigger.npz").write_text("cut short")
  with pytest.raises(CheckpointError, match="latent_trigger.npz is unreadable"):
    experiments.run(c, str(tmp_path))


@pytest.mark.parametrize("overrides,message", [
    ({"poison.name": "sig"}, "needs a mask trigger to fit, poison.name in ('badnets', 'blended')"),
    ({"poison.label_mode": "all2all"}, "needs poison.label_mode=all2one"),
    ({"standard.train_clean": False}, "with standard.train_clean=True"),
    ({"poison.rate": 0.1}, "poisons rows of its batches (attack.latent.batch_rate)"),
    ({"attack.latent.trigger_lr": 0.0}, "'attack.latent.trigger_lr' must be in (0, inf]"),
])
def test_settings_the_latent_backdoor_cannot_run_are_refused(tmp_path, overrides, message):
  c = tiny_digits_config(**{**LATENT, **overrides})
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)")):
    experiments.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_heldout_selection_refuses_the_latent_backdoor(tmp_path):
  c = tiny_digits_config(**LATENT, **{"data.train_limit": 1000})
  with pytest.raises(ConfigError, match="the latent backdoor"):
    selection.select(c, str(tmp_path / "w"), "ft", [{"defense.ft.lr": 0.01}])
  assert not (tmp_path / "w").exists()
