"""Refool (`jaxbd.poison.refool`): the reflection selection (the paper's Algorithm 1): the weight
update and ranking by hand, pools that extend each other, and the standard experiment choosing,
saving and reusing the pool, with settings it cannot run refused before anything is written;
BackdoorBench's filter of blends: its SSIM against skimage and its formula, its three checks
recomputed in NumPy from the uint8 layers, the first passing try kept (else the last), the
reference's layers, and the trigger without the filter unchanged."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import experiments
from jaxbd import poison
from jaxbd.errors import CheckpointError, ConfigError
from jaxbd.experiments import standard
from jaxbd.poison import refool

from conftest import tiny_digits_config

# Refool's selection on the digits; without BackdoorBench's filter of blends, which the
# selection does not use and whose tries take seconds to compile into each program.
SELECT = {"poison.name": "refool", "poison.rate": 0.1, "poison.refool.min_offset": 1,
          "poison.refool.max_offset": 3, "poison.refool.count": 4, "poison.refool.candidates": 8,
          "poison.refool.select_rounds": 1, "poison.refool.select_images": 60,
          "poison.refool.filter": False}


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
    ({"poison.refool.tries": 0}, "'poison.refool.tries' must be in"),
])
def test_settings_the_selection_cannot_run_are_refused(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    experiments.run(tiny_digits_config(**{**SELECT, **overrides}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def numpy_ssim(x: np.ndarray, y: np.ndarray) -> float:
  """The mean SSIM of uint8 [H, W, C] images from its formula in float64: every 7x7 window inside
  the image, sample (co)variances (ddof 1), data range 255, K1 0.01, K2 0.03, then the mean over
  windows and channels."""
  x, y = (np.lib.stride_tricks.sliding_window_view(a.astype(np.float64), (7, 7), (0, 1))
          for a in (x, y))  # [H - 6, W - 6, C, 7, 7]
  ux, uy = x.mean((-2, -1)), y.mean((-2, -1))
  vx, vy = x.var((-2, -1), ddof=1), y.var((-2, -1), ddof=1)
  vxy = ((x - ux[..., None, None]) * (y - uy[..., None, None])).sum((-2, -1)) / 48
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  return float(np.mean((2 * ux * uy + c1) * (2 * vxy + c2)
                       / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))))


def numpy_checks(blended: np.ndarray, transmission: np.ndarray, reflection: np.ndarray) -> bool:
  """BackdoorBench's three checks on uint8 [H, W, C] layers, in its own NumPy arithmetic (the
  uint8 difference wraps)."""
  if np.mean(reflection) > np.mean(blended - reflection) * 0.8:
    return False
  if blended.max() < 0.1 * 255:
    return False
  return 0.70 <= numpy_ssim(blended, transmission) <= 0.85


def ssim_pairs():
  """uint8 image pairs: noisy copies, unrelated images, a flat image, grey and colour."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (12, 15, 3))
  yield x, np.clip(x + rng.integers(-40, 41, x.shape), 0, 255)
  yield x, rng.integers(0, 256, x.shape)
  yield np.full((9, 9, 1), 200), rng.integers(0, 256, (9, 9, 1))
  smooth = (255 * refool.textures(1, (10, 8, 3), 1)[0]).astype(int)
  yield smooth, smooth // 2


def test_ssim_matches_its_formula():
  for x, y in ssim_pairs():
    got = float(refool.ssim(jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)))
    np.testing.assert_allclose(got, numpy_ssim(x.astype(np.uint8), y.astype(np.uint8)),
                               atol=1e-6)


def test_ssim_matches_skimage():
  from skimage import metrics  # pylint: disable=g-import-not-at-top  (a test dependency)
  for x, y in ssim_pairs():
    want = metrics.structural_similarity(x.astype(np.uint8), y.astype(np.uint8),
                                         channel_axis=-1, data_range=255)
    got = float(refool.ssim(jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-6)


def filter_inputs():
  """A pool of 6 textures, 24 16x16 images (textures with noise, some of them bright)."""
  rng = np.random.default_rng(1)
  pool = jnp.asarray(refool.textures(6, (16, 16, 3), 0))
  images = refool.textures(24, (16, 16, 3), 1) * rng.uniform(0.4, 1.0, (24, 1, 1, 1))
  images = np.clip(images + rng.normal(0.0, 0.08, images.shape) + (np.arange(24) % 3 == 0)
                   [:, None, None, None] * 0.4, 0.0, 1.0)
  return pool, jnp.asarray(images, jnp.float32)


def test_the_filter_keeps_the_first_blend_passing_the_references_checks():
  pool, images = filter_inputs()
  trigger = refool.ReflectionTrigger(pool, tries=4)
  key = jax.random.key(2)
  out = np.asarray(trigger(images, key))
  layers = jax.vmap(trigger.candidates)(images, jax.random.split(key, len(images)))
  blended, transmission, reflection = (np.floor(np.asarray(a) * 255).astype(np.uint8)
                                       for a in layers)
  assert blended.shape == (24, 4, 16, 16, 3)
  passed = np.array([[numpy_checks(blended[i, j], transmission[i, j], reflection[i, j])
                      for j in range(4)] for i in range(24)])
  first = passed.argmax(1)
  chosen = np.where(passed.any(1), first, 3)
  # Some images pass only at a later try, some at none (they get the last try).
  assert (passed.any(1) & (first > 0)).any() and (~passed.any(1)).any(), passed
  np.testing.assert_array_equal(out, np.asarray(layers[0])[np.arange(24), chosen])
  for i in np.flatnonzero(passed.any(1)):  # a kept blend passes the checks as an uint8 image
    kept = np.floor(out[i] * 255).astype(np.uint8)
    assert numpy_checks(kept, transmission[i, chosen[i]], reflection[i, chosen[i]]), i


def test_the_filter_tries_distinct_reflections_and_runs_jitted_per_row():
  pool, images = filter_inputs()
  trigger = refool.ReflectionTrigger(pool, tries=6)
  blended = np.asarray(jax.jit(trigger.candidates)(images[0], jax.random.key(0))[0])
  assert blended.shape[0] == 6 and len({b.tobytes() for b in blended}) == 6
  more = refool.ReflectionTrigger(pool, tries=9)
  assert jax.eval_shape(more.candidates, images[0], jax.random.key(0))[0].shape[0] == 6
  row_key, rows = jax.random.key(5), jnp.arange(8, dtype=jnp.int32)
  kind = jnp.asarray([poison.POISONED] * 4 + [poison.CLEAN] * 4, jnp.int8)
  out = np.asarray(jax.jit(poison.poison_fn(trigger, row_key))(images[:8], kind, rows,
                                                                 jax.random.key(9)))
  np.testing.assert_array_equal(out[4:], np.asarray(images[4:8]))
  # A row's blend is the one its row key draws (poison_fn hands the trigger a batch of one).
  keys = jax.vmap(lambda r: jax.random.split(jax.random.split(jax.random.fold_in(row_key, r))[0],
                                             1)[0])(rows[:4])
  want = jax.jit(jax.vmap(trigger.reflect_checked))(images[:4], keys)
  np.testing.assert_allclose(out[:4], np.asarray(want), atol=1e-5)
  with pytest.raises(ValueError, match="at least 7x7 pixels"):
    trigger(images[:, :6, :6], jax.random.key(0))


def test_the_layers_are_the_references():
  """Ghost: reflection^(2.2^2) = blend^2.2 - transmission^2.2 (the reference's second gamma);
  out of focus: reflection^2.2 = min(1, 4 (1 - alpha_t)) (blend^2.2 - transmission^2.2), with
  transmission^2.2 = alpha_t image^2.2; where the blend is not clipped."""
  pool, images = filter_inputs()
  image = images[1]
  for rate in (1.0, 0.0):
    trigger = refool.ReflectionTrigger(pool, ghost_rate=rate, tries=3)
    blended, transmission, reflection = (
        np.asarray(a, np.float64) for a in trigger.candidates(image, jax.random.key(3)))
    linear = np.asarray(image, np.float64) ** 2.2
    alpha = (transmission ** 2.2).sum((1, 2, 3), keepdims=True) / linear.sum()
    np.testing.assert_allclose(transmission ** 2.2, alpha * linear, atol=1e-5)
    mask = blended ** 2.2 - transmission ** 2.2
    want = mask if rate else np.minimum(1.0, 4.0 * (1.0 - alpha)) * mask
    inside = blended < 1.0
    got = reflection ** (2.2 * 2.2 if rate else 2.2)
    np.testing.assert_allclose(got[inside], np.broadcast_to(want, got.shape)[inside], atol=1e-4)


def previous_reflect(trigger: refool.ReflectionTrigger, image: jax.Array,
                     key: jax.Array) -> jax.Array:
  """f32[H, W, C] -> the trigger's blend as it was before the filter, spelled out from the
  module's helpers (one random pool image, always kept)."""
  k_pick, k_model, k_ghost, k_focus = jax.random.split(key, 4)
  r = trigger.reflections[jax.random.randint(k_pick, (), 0, trigger.reflections.shape[0])]
  t, r = image ** refool.GAMMA, r ** refool.GAMMA
  k_off, k_coin, k_weight, k_alpha = jax.random.split(k_ghost, 4)
  offset = jax.random.randint(k_off, (2,), trigger.offsets[0], trigger.offsets[1] + 1)
  weight = jnp.abs(jax.random.bernoulli(k_coin).astype(jnp.float32)
                   - jax.random.uniform(k_weight, (), minval=0.15, maxval=0.5))
  alpha = jax.random.uniform(k_alpha, (), minval=0.55, maxval=0.95)
  ghosted = (1.0 - alpha) * refool.ghost(r, offset, weight) + alpha * t
  k_sigma, k_att, k_corner, k_alpha = jax.random.split(k_focus, 4)
  sigma = jax.random.uniform(k_sigma, (), minval=trigger.sigmas[0], maxval=trigger.sigmas[1])
  blurred = refool.gaussian_blur(r, sigma, int(np.ceil(2 * trigger.sigmas[1])))
  total = blurred + t
  over = total > 1.0
  mean = jnp.maximum(1.0, (total * over).sum((0, 1)) / (over.sum((0, 1)) + 1e-6))
  factor = jax.random.uniform(k_att, (), minval=1.08, maxval=1.18)
  blurred = jnp.clip(blurred - (mean - 1.0) * factor, 0.0, 1.0)
  alpha = jax.random.uniform(k_alpha, (), minval=0.55, maxval=0.95)
  focused = (refool.vignette(t.shape[:2], k_corner) * (1.0 - alpha / 2.0) * blurred
             + alpha * t)
  out = jnp.where(jax.random.bernoulli(k_model, trigger.ghost_rate), ghosted, focused)
  return jnp.clip(out, 0.0, 1.0) ** (1.0 / refool.GAMMA)


def test_without_the_filter_the_trigger_is_unchanged_bit_for_bit():
  pool, images = filter_inputs()
  trigger = refool.ReflectionTrigger(pool, filter=False)
  key = jax.random.key(4)
  want = jax.vmap(lambda x, k: previous_reflect(trigger, x, k))(
      images, jax.random.split(key, len(images)))
  np.testing.assert_array_equal(np.asarray(trigger(images, key)), np.asarray(want))
