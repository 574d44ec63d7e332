"""Refool's reflection selection (`jaxbd.poison.refool`, the paper's Algorithm 1): the weight
update and ranking by hand, pools that extend each other, and the standard experiment choosing,
saving and reusing the pool, with settings it cannot run refused before anything is written."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import experiments
from jaxbd.errors import CheckpointError, ConfigError
from jaxbd.experiments import standard
from jaxbd.poison import refool

from conftest import tiny_digits_config

SELECT = {"poison.name": "refool", "poison.rate": 0.1, "poison.refool.min_offset": 1,
          "poison.refool.max_offset": 3, "poison.refool.count": 4, "poison.refool.candidates": 8,
          "poison.refool.select_rounds": 1, "poison.refool.select_images": 60}


def test_chosen_candidates_take_their_scores_and_the_rest_their_median():
  weights = np.ones(6)
  chosen = refool.top_candidates(weights, 3)
  np.testing.assert_array_equal(chosen, [0, 1, 2])  # ties: the earlier candidates
  weights = refool.update_weights(weights, chosen, np.array([5.0, 0.0, 9.0]))
  np.testing.assert_array_equal(weights, [5.0, 0.0, 9.0, 5.0, 5.0, 5.0])  # median of 5, 0, 9
  chosen = refool.top_candidates(weights, 3)
  np.testing.assert_array_equal(chosen, [0, 2, 3])  # the weakest swapped for an untried one
  weights = refool.update_weights(weights, chosen, np.array([2.0, 7.0, 4.0]))
  np.testing.assert_array_equal(weights, [2.0, 4.0, 7.0, 4.0, 4.0, 4.0])
  np.testing.assert_array_equal(refool.top_candidates(weights, 3), [1, 2, 3])


def test_a_larger_pool_extends_a_smaller_one(tmp_path):
  c = refool.default_config()
  c.count = 3
  np.testing.assert_allclose(refool.reflection_pool(c, (8, 8, 3), 5, 7)[:3],
                             refool.reflection_pool(c, (8, 8, 3), 5), atol=1e-6)
  images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
  np.savez(tmp_path / "r.npz", x_train=images, y_train=np.arange(20) % 2, x_test=images[:2],
           y_test=np.arange(2))
  c.images = f"npz:{tmp_path / 'r.npz'}"
  small, large = (refool.reflection_pool(c, (8, 8, 3), 5, n) for n in (3, 12))
  np.testing.assert_allclose(large[:3], small, atol=1e-6)
  assert len({tuple(np.round(x.ravel() * 255).astype(int)) for x in large}) == 12  # no repeats


def test_standard_experiment_selects_saves_and_reuses_the_pool(tmp_path):
  c = tiny_digits_config(**SELECT)
  doc = experiments.run(c, str(tmp_path))
  selection = doc["attack"]["refool_selection"]
  assert selection["rounds"] == 1 and selection["candidates"] == 8
  with np.load(tmp_path / "refool_selection.npz") as z:
    chosen, saved_success = z["chosen"], z["round_success"]
  np.testing.assert_allclose(saved_success, selection["round_success"])
  # The round's success is a mean over the 4 chosen reflections of counts out of 60 images.
  hits = selection["round_success"][0] * 4 * 60
  assert 0 <= hits <= 240 and abs(hits - round(hits)) < 1e-6, hits
  # Round 0 scored candidates 0-3 and the untried 4-7 took the median of the scores, so the pool
  # keeps the scored ones at or above the median (at least two) and fills up with the first
  # untried ones.
  assert len(chosen) == 4 and np.all(np.diff(chosen) > 0) and chosen.max() < 8, chosen
  untried = chosen[chosen >= 4]
  assert len(untried) <= 2 and np.array_equal(untried, 4 + np.arange(len(untried))), chosen
  rounds = [json.loads(line)["phase"] for line in open(tmp_path / "metrics.jsonl")]
  assert "refool_round_0" in rounds
  assert not standard.population_ready(c)
  # A rerun reads the choice back; a choice of another size or a broken file is refused.
  (tmp_path / "results.json").unlink()
  assert experiments.run(c, str(tmp_path))["attack"] == doc["attack"]
  np.savez(tmp_path / "refool_selection.npz", chosen=chosen[:3], round_success=[0.5])
  with pytest.raises(CheckpointError, match="does not hold a choice of 4 of 8 candidates"):
    experiments.run(c, str(tmp_path))
  (tmp_path / "refool_selection.npz").write_text("cut short")
  with pytest.raises(CheckpointError, match="refool_selection.npz is unreadable"):
    experiments.run(c, str(tmp_path))


def test_a_chosen_reflection_is_scored_on_the_images_it_turns_to_the_target():
  """A 'model' that predicts the target where the first pixel is bright: a white ghost makes
  every grey-40 image at least ((1 - 0.95) + 0.95 t)^(1 / 2.2) >= 0.29, a black one dims it."""
  pool = np.zeros((2, 8, 8, 3), np.float32)
  pool[0] = 1.0
  trigger = refool.ReflectionTrigger(jnp.asarray(pool), ghost_rate=1.0, offsets=(1, 3))
  images = np.full((10, 8, 8, 3), 40, np.uint8)

  def predict(variables, x, transform):
    del variables
    out = transform(np.asarray(x, np.float32) / 255.0, jax.random.key(0))
    return np.where(np.asarray(out)[:, 0, 0, 0] > 0.25, 3, 1)  # t = (40 / 255) ** 2.2: >= 0.29

  np.testing.assert_array_equal(refool.effectiveness(predict, None, trigger, images, 3), [10, 0])


@pytest.mark.parametrize("overrides,message", [
    ({"poison.refool.candidates": 4}, "needs poison.refool.candidates > count, got 4"),
    ({"poison.rate": 0.0}, "the standard experiment poisoning poison.rate > 0"),
    ({"poison.refool.select_images": 10_000}, "select_images 10000 is more than the"),
])
def test_settings_the_selection_cannot_run_are_refused(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    experiments.run(tiny_digits_config(**{**SELECT, **overrides}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
