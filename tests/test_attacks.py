"""The attack suite's triggers: each pinned to its paper's formula, pixel for pixel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import attacks, data, poison
from jaxbd.errors import ConfigError, DataError
from jaxbd.poison import refool, wanet


def trigger_config(name, **kw):
  c = config_lib.defaults()
  c.poison.name = name
  for k, v in kw.items():
    c.poison[name][k] = v
  config_lib.validate(c)
  return c


def images(n=4, shape=(32, 32, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0.1, 0.9, (n, *shape)), jnp.float32)


# WaNet ----------------------------------------------------------------------------------------


def test_wanet_is_the_identity_at_zero_strength():
  x = images()
  trigger = poison.make_trigger(trigger_config("wanet", s=0.0), (32, 32, 3))
  np.testing.assert_allclose(np.asarray(trigger(x)), np.asarray(x), atol=1e-5)  # f32 grid
  np.testing.assert_allclose(np.asarray(trigger.grid), wanet.identity_grid(32, 32), atol=1e-6)


def test_wanet_grids_stay_in_bounds_and_noise_mode_differs():
  for s, rescale in ((0.5, 1.0), (8.0, 1.0), (0.5, 1.3)):
    trigger = poison.make_trigger(trigger_config("wanet", s=s, grid_rescale=rescale),
                                  (32, 32, 3))
    grid = np.asarray(trigger.grid)
    assert grid.min() >= -1.0 and grid.max() <= 1.0
  trigger = poison.make_trigger(trigger_config("wanet"), (32, 32, 3))
  displacement = np.abs(np.asarray(trigger.grid) - wanet.identity_grid(32, 32))
  assert 0 < displacement.max() < 4 * 0.5 / 32  # s / H scaled noise of mean magnitude 1
  x = images()
  warped, noisy = trigger(x), trigger.cover(x, jax.random.key(0))
  assert float(jnp.abs(warped - x).max()) > 0.05
  assert float(jnp.abs(noisy - warped).max()) > 0.01  # fresh per-pixel noise on the grid
  assert 0.0 <= float(noisy.min()) and float(noisy.max()) <= 1.0
  assert trigger.cover_ratio == 2.0
  poison.make_trigger(trigger_config("wanet", k=8), (8, 8, 1))  # one control point per pixel
  with pytest.raises(ConfigError, match="poison.wanet.k 9 is more control points than the 8x8"):
    poison.make_trigger(trigger_config("wanet", k=9), (8, 8, 1))


def test_wanet_matches_torch_interpolate_and_grid_sample():
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  ins = np.random.default_rng(0).uniform(-1, 1, (1, 2, 4, 4))
  ref = f.interpolate(torch.tensor(ins), size=32, mode="bicubic", align_corners=True).numpy()[0]
  a = wanet.bicubic_matrix(4, 32)
  np.testing.assert_allclose(np.einsum("hk,ckl,wl->chw", a, ins[0], a), ref, atol=1e-12)
  grid = wanet.warp_grid((32, 32, 3), 4, 0.5, 1.0, 0)
  x = np.asarray(images(3))
  expected = f.grid_sample(torch.tensor(x).permute(0, 3, 1, 2),
                           torch.tensor(grid)[None].repeat(3, 1, 1, 1),
                           align_corners=True).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(wanet.grid_sample(jnp.asarray(x), grid[None])), expected,
                             atol=1e-6)


# SIG ------------------------------------------------------------------------------------------


def test_sig_adds_the_clipped_sinusoid():
  trigger = poison.make_trigger(trigger_config("sig", delta=40.0, f=6.0), (32, 32, 3))
  x = images()
  j = np.arange(32)
  expected = np.clip(np.asarray(x) + 40 / 255 * np.sin(2 * np.pi * j * 6 / 32)[None, None, :,
                                                                                   None], 0, 1)
  np.testing.assert_allclose(np.asarray(trigger(x)), expected, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(trigger(jnp.ones((1, 32, 32, 3))))[0, :, 0], 1.0)


def test_sig_clean_label_plan_triggers_only_target_images_and_keeps_labels():
  labels = np.repeat(np.arange(10), 50)
  c = trigger_config("sig")
  c.poison.label_mode, c.poison.rate, c.poison.target = "clean_label", 0.08, 3
  plan = poison.plan_from_config(c, labels, 10)
  assert len(plan.indices) == 40 and np.all(labels[plan.indices] == 3)
  np.testing.assert_array_equal(plan.labels, labels)


# Refool ---------------------------------------------------------------------------------------


def test_refool_blur_is_the_reflected_gaussian_convolution():
  sigma, size = 1.7, 12
  radius = 4  # ceil(2 sigma): the reference's kernel side 2 ceil(2 sigma) + 1 = 9
  taps = np.arange(-radius, radius + 1)
  kernel = np.exp(-taps ** 2 / (2 * sigma ** 2))
  kernel /= kernel.sum()
  v = np.random.default_rng(0).uniform(size=size)
  padded = np.pad(v, radius, mode="reflect")  # mirrored without the edge pixel (OpenCV's 101)
  expected = np.convolve(padded, kernel, mode="valid")
  m = np.asarray(refool.blur_matrix(size, jnp.float32(sigma), 10))  # wider support: zero taps
  np.testing.assert_allclose(m @ v, expected, atol=1e-6)
  flat = refool.gaussian_blur(jnp.full((6, 9, 2), 0.3), jnp.float32(4.0), 10)
  np.testing.assert_allclose(np.asarray(flat), 0.3, atol=1e-6)  # weights sum to 1 at borders


def test_refool_ghost_overlays_the_two_offset_crops_resized_back():
  torch = pytest.importorskip("torch")
  r = np.random.default_rng(1).uniform(size=(16, 20, 3)).astype(np.float32)
  dy, dx, a = 3, 5, 0.3

  def zoom(crop):  # bilinear, half-pixel centers (OpenCV's and torch's align_corners=False)
    t = torch.tensor(crop).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(16, 20), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()

  expected = a * zoom(r[dy:, dx:]) + (1 - a) * zoom(r[:16 - dy, :20 - dx])
  got = refool.ghost(jnp.asarray(r), jnp.asarray([dy, dx]), jnp.float32(a))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def refool_trigger(pool_value, ghost_rate):
  return refool.ReflectionTrigger(jnp.full((5, 32, 32, 3), pool_value, jnp.float32), ghost_rate)


reflect = jax.jit(lambda trigger, x, key: trigger(x, key))  # one program per trigger's statics


def test_refool_with_a_black_reflection_only_dims_each_image_by_its_transmission():
  """Nothing to reflect: out = (alpha_t t)^(1 / 2.2) = alpha_t^(1 / 2.2) x, alpha_t in
  [0.55, 0.95] under either model."""
  x = np.asarray(images(64))
  low, high = 0.55 ** (1 / 2.2), 0.95 ** (1 / 2.2)
  for rate in (1.0, 0.0):
    out = np.asarray(reflect(refool_trigger(0.0, rate), jnp.asarray(x), jax.random.key(0)))
    ratio = out / x
    np.testing.assert_allclose(ratio, ratio[:, :1, :1, :1] * np.ones_like(ratio), rtol=1e-4)
    assert low - 1e-4 <= ratio.min() and ratio.max() <= high + 1e-4
    assert ratio[:, 0, 0, 0].std() > 0.02  # drawn per image


def reference_vignette(size):
  """The reference's gen_kernel(size, 3): sqrt of the outer product of the normal's mass in
  `size` bins over [-3 - d / 2, 3 + d / 2], d = 7 / size, scaled to a maximum of 1."""
  from statistics import NormalDist  # pylint: disable=g-import-not-at-top
  d = 7 / size
  cdf = [NormalDist().cdf(e) for e in np.linspace(-3 - d / 2, 3 + d / 2, size + 1)]
  k = np.sqrt(np.outer(np.diff(cdf), np.diff(cdf)))
  return k / k.max()


def test_refool_out_of_focus_weighs_the_blur_by_the_vignette_and_half_the_transmission():
  """A white reflection on a black image, out of focus: the blur of white is white and nothing
  overexposes, so out^2.2 = v (1 - alpha_t / 2), v the whole 32-pixel vignette window of a square
  image and 1 - alpha_t / 2 in [0.525, 0.725], one per image."""
  out = np.asarray(reflect(refool_trigger(1.0, 0.0), jnp.zeros((32, 32, 32, 3)),
                           jax.random.key(0)))
  v = reference_vignette(32)
  assert v[0, 0] < 0.02 and v.min() == v[0, 0] and np.isclose(v.max(), 1.0)
  weight = out ** 2.2 / v[None, :, :, None]
  np.testing.assert_allclose(weight, weight[:, :1, :1, :1] * np.ones_like(weight), rtol=1e-3)
  assert 0.525 - 1e-4 <= weight.min() and weight.max() <= 0.725 + 1e-4
  assert weight[:, 0, 0, 0].std() > 0.03


def test_refool_vignette_crops_a_window_of_the_longer_side_along_the_shorter():
  """16 x 40: the 40-pixel window, its 16 rows from a random start in [0, 14), all 40 columns."""
  window = reference_vignette(40)
  np.testing.assert_allclose(refool.vignette_window(40), window, atol=1e-6)
  starts = set()
  for i in range(24):
    crop = np.asarray(refool.vignette((16, 40), jax.random.key(i)))[..., 0]
    start = int(np.argmin([np.abs(window[s:s + 16] - crop).max() for s in range(25)]))
    np.testing.assert_allclose(crop, window[start:start + 16], atol=1e-6)
    starts.add(start)
  assert len(starts) > 5 and max(starts) < 14
  np.testing.assert_allclose(np.asarray(refool.vignette((32, 32), jax.random.key(0)))[..., 0],
                             reference_vignette(32), atol=1e-6)


def test_refool_reflections_brighten_and_are_drawn_per_image_and_key():
  x = jnp.asarray(images(16))
  trigger = refool_trigger(1.0, 1.0)  # a white ghost: ((1 - alpha) + alpha t)^(1 / 2.2) >= x
  out = np.asarray(reflect(trigger, x, jax.random.key(0)))
  assert np.all(out >= np.asarray(x) - 1e-6) and out.max() <= 1.0
  assert float(np.mean(out - np.asarray(x))) > 0.05
  built = poison.make_trigger(trigger_config("refool"), (32, 32, 3))
  pool = np.asarray(built.reflections)
  assert pool.shape == (200, 32, 32, 3) and pool.min() == 0.0 and pool.max() == 1.0
  a, b = reflect(built, x, jax.random.key(3)), reflect(built, x, jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(reflect(built, x, jax.random.key(3))))
  assert float(jnp.abs(a - b).max()) > 0.05
  assert float(jnp.abs(a - x).max((1, 2, 3)).min()) > 0.01  # every image gets a reflection


def test_refool_pool_comes_from_a_data_source(tmp_path):
  grey = (np.arange(6, dtype=np.uint8) * 40)[:, None, None, None] * np.ones((6, 8, 8, 1), np.uint8)
  path = tmp_path / "reflections.npz"
  np.savez(path, x_train=grey, y_train=np.arange(6) % 2, x_test=grey[:2], y_test=np.arange(2))
  c = trigger_config("refool", images=f"npz:{path}", count=4)
  pool = np.asarray(poison.make_trigger(c, (16, 16, 3)).reflections)
  assert pool.shape == (4, 16, 16, 3)
  values = pool[:, 0, 0, 0]
  np.testing.assert_allclose(pool, values[:, None, None, None] * np.ones_like(pool), atol=1e-6)
  assert set(np.round(values * 255).astype(int)) <= {0, 40, 80, 120, 160, 200}
  assert len(set(values)) == 4
  with pytest.raises(ConfigError, match="count 7 asks for more reflection images"):
    poison.make_trigger(trigger_config("refool", images=f"npz:{path}", count=7), (16, 16, 3))
  with pytest.raises(DataError, match="file not found"):
    poison.make_trigger(trigger_config("refool", images=f"npz:{tmp_path}/none.npz"),
                        (16, 16, 3))
  with pytest.raises(ConfigError, match="min_offset <= max_offset"):
    trigger_config("refool", min_offset=9)
  with pytest.raises(ConfigError, match="max_offset 8 does not fit a 8x8 image"):
    poison.make_trigger(trigger_config("refool"), (8, 8, 3))


# Adaptive-Blend, Adaptive-Patch, TSB ----------------------------------------------------------


def piece_state(trigger, out, x):
  """bool[B, P]: whether each piece of each image was blended at its training opacity."""
  masks, patterns = np.asarray(trigger.masks), np.asarray(trigger.patterns)
  got = []
  for p in range(len(masks)):
    region = masks[p, ..., 0] > 0
    blended = x + masks[p] * (patterns[p] - x)
    on = np.all(np.isclose(out[:, region], blended[:, region], atol=1e-6), axis=-1).all(-1)
    off = np.all(np.isclose(out[:, region], x[:, region], atol=1e-6), axis=-1).all(-1)
    assert np.all(on ^ off), "every piece is either fully applied or untouched"
    got.append(on)
  return np.stack(got, 1)


def test_adaptive_blend_pieces_tile_the_image_and_are_kept_at_random():
  trigger = poison.make_trigger(trigger_config("adaptive_blend"), (32, 32, 3))
  masks = np.asarray(trigger.masks)[..., 0]
  assert masks.shape == (4, 32, 32)
  np.testing.assert_allclose(masks.sum(0), 0.15)  # a 2x2 tiling at training opacity
  assert masks[0, :16, :16].min() == 0.15 and masks[3, 16:, 16:].min() == 0.15
  x = np.asarray(images(256))
  out = np.asarray(trigger(jnp.asarray(x), jax.random.key(1), train=True))
  kept = piece_state(trigger, out, x)
  assert 0.43 < kept.mean() < 0.57  # each of 1,024 pieces kept w.p. 0.5
  assert len({tuple(k) for k in kept}) == 16  # all subsets occur
  test = np.asarray(trigger(jnp.asarray(x)))
  pattern = np.asarray(trigger.patterns[0])
  np.testing.assert_allclose(test, 0.8 * x + 0.2 * pattern, atol=1e-6)  # all pieces, test alpha
  assert trigger.cover_ratio == 1.0  # conservatism 0.5: as many cover as payload rows


@pytest.mark.parametrize("name", ["adaptive_blend", "adaptive_patch"])
def test_fixed_sampling_keeps_the_same_number_of_pieces_on_every_image(name):
  """sampling=fixed (Qi et al.'s code): round(keep_prob * P) pieces per training image, at least
  one, every subset of that size drawn; no image goes without a piece."""
  x = np.asarray(images(256))
  for keep_prob, count in ((0.5, 2), (0.1, 1)):
    trigger = poison.make_trigger(trigger_config(name, sampling="fixed", keep_prob=keep_prob),
                                  (32, 32, 3))
    kept = piece_state(trigger, np.asarray(trigger(jnp.asarray(x), jax.random.key(4),
                                                   train=True)), x)
    np.testing.assert_array_equal(kept.sum(1), count)
    assert len({tuple(k) for k in kept}) == (6 if count == 2 else 4)  # 4 choose count
  with pytest.raises(ConfigError, match=f"'poison.{name}.sampling' must be one of"):
    trigger_config(name, sampling="one")


def test_adaptive_patch_patches_are_disjoint_and_applied_fully_at_test():
  trigger = poison.make_trigger(trigger_config("adaptive_patch", size=5), (32, 32, 3))
  regions = np.asarray(trigger.test_masks)[..., 0]
  assert np.all(regions.sum(0) <= 1.0) and np.all(regions.sum((1, 2)) == 25)
  x = np.asarray(images(64))
  kept = piece_state(trigger, np.asarray(trigger(jnp.asarray(x), jax.random.key(2), train=True)),
                     x)
  assert 0.35 < kept.mean() < 0.65
  test = np.asarray(trigger(jnp.asarray(x)))
  on = regions.sum(0) > 0
  pasted = (regions[..., None] * np.asarray(trigger.patterns)).sum(0)  # opacity 1 at test
  np.testing.assert_allclose(test[:, on], np.broadcast_to(pasted[on], test[:, on].shape),
                             atol=1e-6)
  np.testing.assert_array_equal(test[:, ~on], x[:, ~on])


def test_tsb_puts_exactly_one_mark_on_training_images_and_all_at_test():
  trigger = poison.make_trigger(trigger_config("tsb", marks=4, size=4), (32, 32, 3))
  x = np.asarray(images(200))
  kept = piece_state(trigger, np.asarray(trigger(jnp.asarray(x), jax.random.key(3), train=True)),
                     x)
  np.testing.assert_array_equal(kept.sum(1), 1)
  assert set(np.argmax(kept, 1)) == {0, 1, 2, 3}
  np.testing.assert_array_equal(piece_state(trigger, np.asarray(trigger(jnp.asarray(x))), x),
                                True)
  assert trigger.cover_ratio == 0.0


@pytest.mark.parametrize("name", ["adaptive_blend", "tsb"])
def test_a_poisoned_row_keeps_its_pieces_across_steps_with_a_row_key(name):
  """Data poisoning with a plan: a row's pieces are drawn once (the references build the poisoned
  set before training), whatever the step's key and the row's place in the batch; in-loop
  poisoning (no row key) draws them anew at every step."""
  trigger = poison.make_trigger(trigger_config(name), (32, 32, 3))
  n = 64
  x = np.asarray(images(n))
  arrays = data.TrainArrays(jnp.asarray(np.round(x * 255), jnp.uint8), jnp.zeros(n, jnp.int32),
                            jnp.full(n, poison.POISONED, jnp.int8))
  ref = np.asarray(arrays.images) / 255.0

  def pieces_at(step_key, order, row_key=None):
    fn = poison.poison_fn(trigger, row_key)
    out, _ = data.gather_batch(arrays, jnp.asarray(order), jax.random.key(step_key),
                               poison_fn=fn)
    kept = np.empty((n, trigger.num_pieces), bool)
    kept[order] = piece_state(trigger, np.asarray(out), ref[order])
    return kept

  order = np.random.default_rng(0).permutation(n)
  fixed = pieces_at(1, np.arange(n), jax.random.key(7))
  np.testing.assert_array_equal(pieces_at(2, order, jax.random.key(7)), fixed)
  assert len({tuple(k) for k in fixed}) > 3  # drawn per row, not one subset for all rows
  assert not np.array_equal(pieces_at(1, np.arange(n), jax.random.key(8)), fixed)
  assert not np.array_equal(pieces_at(1, np.arange(n)), pieces_at(2, np.arange(n)))


def test_piece_patterns_are_independent_across_pieces_and_run_seeds():
  """Piece p's noise comes from the seed sequence (seed, 2, p): it differs from every other
  piece, from another run's pieces (seeds 1000 apart, as a detection population's members) and
  from a Blended run's seeded noise image."""
  from jaxbd.poison import pieces, triggers
  shape = (8, 8, 3)
  a, b = pieces.noise_patterns(shape, 3, 0), pieces.noise_patterns(shape, 3, 1000)
  blended = triggers.patch_pattern(shape, "noise", 0, 2000)
  patterns = [*a, *b, blended]
  assert all(not np.array_equal(x, y) for i, x in enumerate(patterns) for y in patterns[i + 1:])
  np.testing.assert_array_equal(a, pieces.noise_patterns(shape, 3, 0))  # seeded


def test_piece_layouts_that_do_not_fit_are_refused():
  with pytest.raises(ConfigError, match="3 pieces do not tile a 32x32 image"):
    poison.make_trigger(trigger_config("adaptive_blend", pieces=3), (32, 32, 3))
  with pytest.raises(ConfigError, match="5 marks of 16x16 pixels do not fit a 32x32 image"):
    poison.make_trigger(trigger_config("tsb", marks=5, size=16), (32, 32, 3))


def test_cover_rows_come_from_the_trigger_and_get_its_cover_transform():
  """WaNet's cross ratio 2: twice as many noise-mode rows as poisoned rows, labels kept."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 400)
  c = trigger_config("wanet")
  c.poison.rate = 0.1
  trigger = poison.make_trigger(c, (16, 16, 3))
  plan = poison.plan_from_config(c, labels, 10, trigger)
  assert len(plan.indices) == 40 and len(plan.cover_indices) == 80
  np.testing.assert_array_equal(plan.labels[plan.cover_indices], labels[plan.cover_indices])
  imgs = rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
  arrays = data.train_arrays(imgs, plan.labels, plan.kind)
  x, _ = data.gather_batch(arrays, jnp.arange(400), jax.random.key(0),
                           poison_fn=poison.poison_fn(trigger))
  x, ref = np.asarray(x), imgs / 255.0
  kind = plan.kind
  np.testing.assert_allclose(x[kind == 1], np.asarray(trigger(jnp.asarray(ref[kind == 1]))),
                             atol=1e-6)
  np.testing.assert_allclose(x[kind == 0], ref[kind == 0], atol=1e-7)
  changed = np.abs(x[kind == 2] - np.asarray(trigger(jnp.asarray(ref[kind == 2])))).max((1, 2, 3))
  assert np.all(changed > 0)  # noise mode, not the plain warp


def test_all_to_all_relabels_to_the_next_class():
  labels = np.repeat(np.arange(10), 100)
  c = trigger_config("badnets")
  c.poison.label_mode = "all2all"
  plan = poison.plan_from_config(c, labels, 10)
  np.testing.assert_array_equal(plan.labels[plan.indices], (labels[plan.indices] + 1) % 10)
  assert len(set(labels[plan.indices])) == 10  # drawn from every class


def test_in_loop_attack_trains_a_backdoor_end_to_end(tmp_path):
  """attack.name=batch on the offline digits: no row is poisoned for good (an empty plan), and
  the model still learns the BadNets backdoor from the rows poisoned inside every batch (ASR 0.73
  in 8 epochs, where the plan's fixed 10% reaches 0.70 and a clean model 0.01)."""
  from conftest import tiny_digits_config
  from jaxbd import experiments
  c = tiny_digits_config(**{"attack.name": "batch", "poison.rate": 0.0,
                            "attack.batch.batch_rate": 0.1, "train.epochs": 8})
  doc = experiments.run(c, str(tmp_path))
  assert doc["attack"]["num_poisoned"] == 0
  assert doc["attack"]["training_attack"] == {"name": "batch", "batch_rate": 0.1, "augment": "run"}
  assert doc["metrics"]["backdoored"]["asr"] > 0.5 and doc["metrics"]["backdoored"]["acc"] > 0.8


def test_in_loop_cover_rows_that_do_not_fit_a_batch_are_refused(tmp_path):
  """WaNet's cross ratio 2 asks for two noise-mode rows per warped row: at batch_rate 0.4 the 25
  poisoned and 50 cover rows of a batch of 64 do not fit, refused before any file is made (rather
  than cutting the cover rows short)."""
  from conftest import tiny_digits_config
  from jaxbd import experiments
  c = tiny_digits_config(**{"attack.name": "batch", "poison.rate": 0.0, "poison.name": "wanet",
                            "train.batch_size": 64, "attack.batch.batch_rate": 0.3})
  trigger = poison.make_trigger(c, (8, 8, 3))
  assert attacks.batch.batch_rows(c, trigger) == (19, 38)
  c.attack.batch.batch_rate = 0.4
  with pytest.raises(ConfigError, match=r"attack.batch.batch_rate 0.4 gives 25 poisoned and 50 "
                     r"cover rows \(2 per poisoned row, poison.wanet\), more than a batch of 64"):
    experiments.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_in_loop_cover_rows_are_counted_as_the_plan_counts_them_and_pcb_refuses_them(tmp_path):
  """Conservatism 0.6 is 0.6 / 0.4 = 1.4999999999999998 cover rows per poisoned row: 18 for 12
  poisoned rows of 128, as the poison plan counts them (not 17). PCB and the Latent Backdoor make
  no cover rows, so a trigger that asks for them is refused, before any file is made."""
  from conftest import tiny_digits_config
  from jaxbd import experiments
  c = tiny_digits_config(**{"attack.name": "batch", "poison.rate": 0.0,
                            "poison.name": "adaptive_blend", "train.batch_size": 128,
                            "attack.batch.batch_rate": 0.1,
                            "poison.adaptive_blend.conservatism": 0.6})
  assert attacks.batch.batch_rows(c, poison.make_trigger(c, (8, 8, 3))) == (12, 18)
  c = tiny_digits_config(**{"attack.name": "pcb", "poison.rate": 0.0, "poison.name": "wanet",
                            "poison.wanet.cross_ratio": 2.0})
  with pytest.raises(ConfigError, match=r"attack.name='pcb' makes no cover rows, but "
                     r"poison.wanet asks for 2 per poisoned row"):
    experiments.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_pcb_trains_through_the_experiment(tmp_path):
  """attack.name=pcb on the offline digits (16-wide CNN, 30 epochs): with every parameter open to
  the poisoned batches, 10% of every second batch teaches the backdoor (ASR 0.975); the 10% mask
  confines it to a partial one (ASR 0.28 at ACC 0.95) in this small network."""
  from conftest import tiny_digits_config
  from jaxbd import experiments

  def run(fraction, name):
    c = tiny_digits_config(**{"attack.name": "pcb", "poison.rate": 0.0, "train.epochs": 30,
                              "model.cnn.width": 16, "attack.pcb.param_fraction": fraction})
    return experiments.run(c, str(tmp_path / name))

  whole, masked = run(1.0, "whole"), run(0.1, "masked")
  assert whole["attack"]["num_poisoned"] == 0
  assert whole["attack"]["training_attack"]["name"] == "pcb"
  assert whole["metrics"]["backdoored"]["asr"] > 0.9
  assert masked["metrics"]["backdoored"]["acc"] > 0.9
  assert 0.1 < masked["metrics"]["backdoored"]["asr"] < 0.6


@pytest.mark.parametrize("name,settings", [("wanet", {}), ("adaptive_patch", {}),
                                           ("refool", {"filter": False})],
                         ids=["wanet", "adaptive_patch", "refool"])
def test_a_batch_poisoned_on_its_marked_rows_only_equals_the_whole_batch_path(name, settings):
  """`poison_fn` with `max_marked` runs the trigger on the gathered marked rows of each shard of a
  batch (and on every row of a batch with a shard holding more): the images are those of the
  whole-batch path up to float rounding, poisoned and cover rows alike (WaNet and Adaptive-Patch
  draw covers; Refool a reflection per row key, here without its filter, whose tries of
  each row's blends take seconds to compile and draw from the same row key)."""
  trigger = poison.make_trigger(trigger_config(name, **settings), (32, 32, 3))
  b = 32
  x = images(b, seed=3)
  kind = np.zeros(b, np.int8)
  kind[[1, 6, 7, 20, 31]] = poison.POISONED
  kind[[3, 30]] = poison.COVER
  rows = jnp.asarray(np.random.default_rng(1).permutation(1000)[:b], jnp.int32)
  row_key, step_key = jax.random.key(4), jax.random.key(5)
  fns = {bound: jax.jit(poison.poison_fn(trigger, row_key, *bound))
         for bound in ((), (8, 1), (4, 2))}
  run = lambda k, *bound: np.asarray(fns[bound](x, jnp.asarray(k), rows, step_key))
  crowded = kind.copy()  # 9 marked rows in the first half, 7 in all before
  crowded[[10, 12, 14, 15]] = poison.POISONED
  for k in (kind, crowded):
    whole = run(k)
    assert (np.abs(whole - np.asarray(x)).max(axis=(1, 2, 3)) > 0).sum() >= 5
    for bound, shards in ((8, 1), (4, 2)):  # kind fits both, crowded neither (8 in a half)
      np.testing.assert_allclose(run(k, bound, shards), whole, atol=1e-6)
  assert poison.marked_bound(np.repeat(kind, 100), 128) == 44  # share 7/32: 28 + 3 * 4.68 + 1
  assert poison.marked_bound(np.repeat(kind, 100), 128, 4) == 16  # 32 rows: 7 + 3 * 2.34 + 1
  assert poison.marked_bound(np.zeros(10, np.int8), 128) == 1
  assert poison.marked_bound(np.ones(10, np.int8), 128) == 128
