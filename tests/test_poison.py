"""BadNets pixels and poison plans: the trigger lands exactly where configured, on planned rows;
poisoned labels agree on the host and inside jit (PCB's batches)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import attacks, data, poison
from jaxbd.errors import CheckpointError, ConfigError, DataError


def badnets_config(**kw):
  c = config_lib.defaults()
  c.poison.name = "badnets"
  for k, v in kw.items():
    c.poison.badnets[k] = v
  return c


@pytest.mark.parametrize("kw,rows,cols", [
    (dict(size=3), slice(29, 32), slice(29, 32)),
    (dict(size=3, margin=1), slice(28, 31), slice(28, 31)),
    (dict(size=4, corner="top_left"), slice(0, 4), slice(0, 4)),
    (dict(size=2, corner="top_right", margin=2), slice(2, 4), slice(28, 30)),
    (dict(size=5, row=10, col=3), slice(10, 15), slice(3, 8)),
])
def test_badnets_pixels_land_where_configured(kw, rows, cols):
  trigger = poison.make_trigger(badnets_config(value=255, **kw), (32, 32, 3))
  rng = np.random.default_rng(0)
  images = rng.uniform(0.2, 0.8, (4, 32, 32, 3)).astype(np.float32)
  out = np.asarray(trigger(jnp.asarray(images)))
  inside = np.zeros((32, 32), bool)
  inside[rows, cols] = True
  np.testing.assert_array_equal(out[:, inside], 1.0)
  np.testing.assert_array_equal(out[:, ~inside], images[:, ~inside])


def test_badnets_patterns():
  c = badnets_config(size=4, pattern="checkerboard", value=255, corner="top_left")
  out = np.asarray(poison.make_trigger(c, (8, 8, 1))(jnp.full((1, 8, 8, 1), 0.5)))[0, :4, :4, 0]
  np.testing.assert_array_equal(out, np.indices((4, 4)).sum(0) % 2 == 0)
  c = badnets_config(size=3, pattern="noise")
  a = poison.make_trigger(c, (8, 8, 3)).pattern
  b = poison.make_trigger(c, (8, 8, 3)).pattern
  np.testing.assert_array_equal(a, b)  # seeded
  assert len(np.unique(np.asarray(a)[5:, 5:])) > 5


def test_trigger_larger_than_image_is_refused():
  with pytest.raises(ConfigError, match="a 9x9 trigger at row -1, col -1 does not fit a 8x8"):
    poison.make_trigger(badnets_config(size=9), (8, 8, 1))
  with pytest.raises(ConfigError, match="does not fit a 32x32 image"):
    poison.make_trigger(badnets_config(size=3, row=30, col=0), (32, 32, 3))
  with pytest.raises(ConfigError, match="'poison.badnets.row' must be in"):
    config_lib.validate(badnets_config(row=-7))  # -1 means "at the corner"; below is refused


def test_plan_counts_pools_and_labels():
  labels = np.repeat(np.arange(10), 100)
  plan = poison.make_plan(labels, 10, rate=0.1, target=3, seed=1)
  assert len(plan.indices) == 100 and np.all(labels[plan.indices] != 3)
  assert np.all(plan.labels[plan.indices] == 3)
  untouched = np.setdiff1d(np.arange(1000), plan.indices)
  np.testing.assert_array_equal(plan.labels[untouched], labels[untouched])
  np.testing.assert_array_equal(plan.kind, np.isin(np.arange(1000), plan.indices).astype(np.int8))
  again = poison.make_plan(labels, 10, rate=0.1, target=3, seed=1)
  np.testing.assert_array_equal(plan.indices, again.indices)
  other = poison.make_plan(labels, 10, rate=0.1, target=3, seed=2)
  assert not np.array_equal(plan.indices, other.indices)

  a2a = poison.make_plan(labels, 10, rate=0.05, target=0, label_mode="all2all", seed=0)
  np.testing.assert_array_equal(a2a.labels[a2a.indices], (labels[a2a.indices] + 1) % 10)
  cl = poison.make_plan(labels, 10, rate=0.05, target=4, label_mode="clean_label", seed=0)
  assert np.all(labels[cl.indices] == 4) and np.array_equal(cl.labels, labels)
  assert len(poison.make_plan(labels, 10, rate=0.0001, target=0).indices) == 0  # int(0.1)
  # 0.57 * 100 is 56.99... in floating point: still 57 rows
  assert len(poison.make_plan(labels[:100], 10, rate=0.57, target=0, exclude_target=False)
             .indices) == 57
  with pytest.raises(ConfigError, match="only 100 are eligible"):
    poison.make_plan(labels, 10, rate=0.2, target=4, label_mode="clean_label")
  with pytest.raises(ConfigError, match="poison.target 10 is not a class"):
    poison.make_plan(labels, 10, rate=0.1, target=10)


@pytest.mark.parametrize("mode", ["all2one", "clean_label"])
def test_cover_rows_come_from_every_class(mode):
  """Cover rows (labels kept) are drawn from all rows not poisoned, whatever the poisoned pool:
  the target class too under all-to-one, the other classes under clean-label poisoning (10%
  poisoned of the target's 10%, and 20% cover, as WaNet's cross ratio 2 asks)."""
  labels = np.repeat(np.arange(10), 100)
  plan = poison.make_plan(labels, 10, rate=0.1, target=3, label_mode=mode, seed=1, cover_rate=0.2)
  assert len(plan.indices) == 100 and len(plan.cover_indices) == 200
  assert not set(plan.indices) & set(plan.cover_indices)
  assert len(np.unique(labels[plan.cover_indices])) == (10 if mode == "all2one" else 9)
  np.testing.assert_array_equal(plan.labels[plan.cover_indices], labels[plan.cover_indices])
  no_cover = poison.make_plan(labels, 10, rate=0.1, target=3, label_mode=mode, seed=1)
  np.testing.assert_array_equal(plan.indices, no_cover.indices)  # cover rows drawn after
  with pytest.raises(ConfigError, match="100 poisoned and 901 cover images but the training set"):
    poison.make_plan(labels, 10, rate=0.1, target=3, label_mode=mode, cover_rate=0.901)


@pytest.mark.parametrize("mode", ["all2one", "all2all", "clean_label"])
def test_poisoned_label_is_the_same_on_host_and_traced_labels(mode):
  labels = np.arange(12, dtype=np.int32) % 5
  host = poison.poisoned_label(labels, mode, 2, 5)
  want = {"all2one": np.full(12, 2), "all2all": (labels + 1) % 5, "clean_label": labels}[mode]
  assert isinstance(host, np.ndarray) and host.dtype == np.int32 and host is not labels
  np.testing.assert_array_equal(host, want)
  traced = jax.jit(lambda y: poison.poisoned_label(y, mode, 2, 5))(jnp.asarray(labels))
  assert traced.dtype == jnp.int32
  np.testing.assert_array_equal(traced, host)


@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_in_loop_batches_relabel_their_triggered_rows_with_poisoned_label(mode):
  """attack.batch and PCB: the first rows of a batch are triggered and relabeled; with cover
  rows (WaNet's cross ratio) the next ones get the cover transform and keep their labels."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 200, (20, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, 20).astype(np.int32)
  arrays = data.train_arrays(images, labels, np.zeros(20, np.int8))
  trigger = poison.make_trigger(badnets_config(size=2), (8, 8, 3))
  batch = functools.partial(attacks.batch.poisoned_batch, trigger=trigger, poisoned=5, cover=0,
                            label_mode=mode, target=3, num_classes=5, crop_padding=0, flip=False)
  x, y = jax.jit(batch)(arrays, jnp.arange(20), jax.random.key(0))
  y = np.asarray(y)
  np.testing.assert_array_equal(y[:5], poison.poisoned_label(labels[:5], mode, 3, 5))
  np.testing.assert_array_equal(y[5:], labels[5:])
  np.testing.assert_array_equal(np.asarray(x)[:5, -2:, -2:], 1.0)

  c = config_lib.defaults()
  c.poison.name = "wanet"
  wanet = poison.make_trigger(c, (8, 8, 3))
  batch = functools.partial(attacks.batch.poisoned_batch, trigger=wanet, poisoned=3, cover=6,
                            label_mode=mode, target=3, num_classes=5, crop_padding=0, flip=False)
  x, y = jax.jit(batch)(arrays, jnp.arange(20), jax.random.key(0))
  x, y, clean = np.asarray(x), np.asarray(y), images / 255.0
  np.testing.assert_allclose(x[:3], np.asarray(wanet(jnp.asarray(clean[:3], jnp.float32))),
                             atol=1e-6)  # the exact warp
  np.testing.assert_array_equal(y[:3], poison.poisoned_label(labels[:3], mode, 3, 5))
  np.testing.assert_array_equal(y[3:], labels[3:])  # cover rows keep their labels
  warped = np.asarray(wanet(jnp.asarray(clean[3:9], jnp.float32)))
  assert np.all(np.abs(x[3:9] - clean[3:9]).max((1, 2, 3)) > 0.01)  # noise-warped: changed,
  assert np.all(np.abs(x[3:9] - warped).max((1, 2, 3)) > 1e-3)  # but not the exact warp
  np.testing.assert_allclose(x[9:], clean[9:], atol=1e-6)


def test_backdoorbench_augmentation_moves_every_row_of_a_batch_alike():
  """attack.batch.augment=backdoorbench: after poisoning, one crop, rotation and flip for the
  whole batch, padded with the model's mean; the run's augmentation crops each row on its own."""
  z = np.arange(8 * 8 * 3).reshape(8, 8, 3).astype(np.uint8) + 10
  arrays = data.train_arrays(np.stack([z] * 12), np.ones(12, np.int32))
  c = badnets_config(size=2)
  c.attack.name, c.poison.rate, c.attack.batch.batch_rate = "batch", 0.0, 0.25
  c.attack.batch.augment = "backdoorbench"
  config_lib.validate(c)
  trigger = poison.make_trigger(c, (8, 8, 3))
  mean = (0.25, 0.5, 0.75)
  alike = jax.jit(attacks.batch.batch_fn(c, trigger, 5, poisoned=3, cover=0, batch_fill=mean))
  c.data.crop_padding, c.data.flip = 2, True
  apart = jax.jit(attacks.batch.batch_fn(c, trigger, 5, poisoned=3, cover=0))
  outside = triggered = 0
  for key in jax.random.split(jax.random.key(0), 8):
    x, y = (np.asarray(a) for a in alike(arrays, jnp.arange(12), key))
    np.testing.assert_array_equal(y, [0] * 3 + [1] * 9)  # all-to-one: the first rows relabeled
    assert all(np.array_equal(row, x[0]) for row in x[:3])  # the triggered rows alike,
    assert all(np.array_equal(row, x[3]) for row in x[3:])  # the clean rows alike
    triggered += not np.array_equal(x[0], x[3])  # unless the crop moved the patch out of view
    filled = np.all(x == mean, axis=-1)
    outside += filled.any()
    assert np.all(filled[0] == filled[3])  # the same pixels come from outside every row
    x = np.asarray(apart(arrays, jnp.arange(12), key)[0])
    assert len({x[i].tobytes() for i in range(3, 12)}) > 1  # per row: clean rows differ
  assert outside and triggered  # some batch reaches outside the images; some shows the patch
  c.attack.batch.augment = "dataset"
  with pytest.raises(ConfigError, match="'attack.batch.augment' must be one of"):
    config_lib.validate(c)


def test_plan_save_load_roundtrip(tmp_path):
  labels = np.repeat(np.arange(5), 20)
  plan = poison.make_plan(labels, 5, rate=0.2, target=1, seed=3, cover_rate=0.1)
  path = str(tmp_path / "plan.npz")
  plan.save(path)
  back = poison.load_plan(path)
  assert back.target == 1 and back.label_mode == "all2one"
  for field in ("indices", "cover_indices", "labels"):
    np.testing.assert_array_equal(getattr(back, field), getattr(plan, field))
  assert not set(plan.indices) & set(plan.cover_indices)
  with open(path, "r+b") as f:  # cut short, as by a full disk
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(DataError, match="poison plan .* unreadable"):
    poison.load_plan(path)
  np.save(str(tmp_path / "plan.npy"), plan.indices)
  with pytest.raises(DataError, match=r"unreadable \(not a zip archive of arrays\)"):
    poison.load_plan(str(tmp_path / "plan.npy"))
  for key, value, message in [
      ("indices", plan.indices + 100, "indices holds rows outside the plan's 100 labels"),
      ("cover_indices", plan.cover_indices.astype(np.float32), "cover_indices is not a 1-D int"),
      ("target", np.array([1, 2, 3]), "target is not a 0-D integer array"),
      ("label_mode", np.array(1), "label_mode is not a string")]:
    np.savez(path, **{**plan.records(), key: value})
    with pytest.raises(DataError, match=message):
      poison.load_plan(path)


def test_a_rerun_checks_the_saved_plan_and_trigger(tmp_path):
  """The plan file holds the trigger's arrays; `save_or_check` accepts the same plan and trigger
  (floats to 1e-5) and refuses other rows or another trigger, naming what differs."""
  labels = np.repeat(np.arange(5), 20)
  plan = poison.make_plan(labels, 5, rate=0.2, target=1, seed=3)
  trigger = poison.triggers.badnets(poison.triggers.badnets_config(), (8, 8, 3), 0)
  path = str(tmp_path / "plan.npz")
  plan.save_or_check(path, trigger)
  with np.load(path) as z:
    np.testing.assert_array_equal(z["trigger/mask"], trigger.mask)
    np.testing.assert_array_equal(z["trigger/pattern"], trigger.pattern)
  plan.save_or_check(path, trigger.replace(pattern=trigger.pattern * (1 + 1e-7)))
  other = poison.make_plan(labels, 5, rate=0.2, target=1, seed=4)
  with pytest.raises(CheckpointError, match="another poison plan .*first difference: indices"):
    other.save_or_check(path, trigger)
  with pytest.raises(CheckpointError, match="first difference: trigger/pattern"):
    plan.save_or_check(path, trigger.replace(pattern=1 - trigger.pattern))
  with pytest.raises(CheckpointError, match="first difference: trigger/mask; this run's plan "
                     "has no trigger/mask"):
    plan.save_or_check(path, None)  # a clean run's plan has no trigger
  plan.save(str(tmp_path / "older.npz"))  # as written before plans held their trigger
  with pytest.raises(CheckpointError, match="the saved plan lacks trigger/mask: an older jaxbd"):
    plan.save_or_check(str(tmp_path / "older.npz"), trigger)
  with open(path, "r+b") as f:
    f.truncate(100)
  with pytest.raises(CheckpointError, match="poison plan .* is unreadable"):
    plan.save_or_check(path, trigger)
  # A trigger with a PRNG key leaf (BadPatches' random positions) saves the key's data.
  keyed = poison.badpatches.PatchTrigger(
      jnp.zeros((8, 8), jnp.int32), jnp.ones((8, 8, 3)), jnp.arange(2), jax.random.key(5),
      num_cells=4)
  arrays = poison.plan.trigger_arrays(keyed)
  np.testing.assert_array_equal(arrays["trigger/key"], jax.random.key_data(jax.random.key(5)))
  plan.save_or_check(str(tmp_path / "keyed.npz"), keyed)
  plan.save_or_check(str(tmp_path / "keyed.npz"), keyed)


def test_every_process_checks_a_saved_plan_and_only_process_0_writes(tmp_path, monkeypatch):
  """In a multi-host run the processes other than 0 write no plan, but check one that is there,
  so that a rerun with another plan stops every process, not process 0 alone."""
  labels = np.repeat(np.arange(5), 20)
  plan = poison.make_plan(labels, 5, rate=0.2, target=1, seed=3)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  path = str(tmp_path / "plan.npz")
  plan.save_or_check(path)
  assert not os.path.exists(path)
  plan.save(path)
  plan.save_or_check(path)
  with pytest.raises(CheckpointError, match="another poison plan"):
    poison.make_plan(labels, 5, rate=0.2, target=1, seed=4).save_or_check(path)


def test_device_pipeline_triggers_only_planned_rows():
  """gather_batch with a BadNets plan: planned rows get the patch, all other pixels untouched."""
  rng = np.random.default_rng(0)
  n = 64
  images = rng.integers(0, 200, (n, 16, 16, 3), dtype=np.uint8)  # never 255 before poisoning
  labels = rng.integers(0, 4, n)
  plan = poison.make_plan(labels, 4, rate=0.25, target=0, seed=0)
  trigger = poison.make_trigger(badnets_config(size=3, margin=1), (16, 16, 3))
  arrays = data.train_arrays(images, plan.labels, plan.kind)
  idx = jnp.arange(n, dtype=jnp.int32)
  x, y = jax.jit(lambda a, i, k: data.gather_batch(a, i, k, poison_fn=poison.poison_fn(trigger)))(
      arrays, idx, jax.random.key(0))
  x = np.asarray(x)
  ref = images / 255.0
  patch = np.zeros((16, 16), bool)
  patch[12:15, 12:15] = True
  planned = np.isin(np.arange(n), plan.indices)
  np.testing.assert_array_equal(x[planned][:, patch], 1.0)
  np.testing.assert_allclose(x[planned][:, ~patch], ref[planned][:, ~patch], rtol=0, atol=1e-7)
  np.testing.assert_allclose(x[~planned], ref[~planned], rtol=0, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(y), plan.labels)


def test_blended_is_the_convex_combination(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  t = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(t).save(tmp_path / "t.png")
  c = config_lib.defaults()
  c.poison.name = "blended"
  c.poison.blended.alpha = 0.2
  c.poison.blended.image = str(tmp_path / "t.png")
  trigger = poison.make_trigger(c, (16, 16, 3))
  x = rng.uniform(size=(3, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(trigger(jnp.asarray(x))), 0.8 * x + 0.2 * t / 255.0,
                             atol=1e-6)
  c.poison.blended.image = ""
  noise = poison.make_trigger(c, (16, 16, 3)).pattern
  assert 0.4 < float(noise.mean()) < 0.6 and noise.shape == (16, 16, 3)
  c.poison.blended.image = str(tmp_path / "missing.png")
  with pytest.raises(DataError, match="trigger image .* is unreadable"):
    poison.make_trigger(c, (16, 16, 3))
  Image.fromarray(t[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
  c.poison.blended.image = str(tmp_path / "deep.png")
  with pytest.raises(DataError, match="trigger image .* 'I;16' image is not 8-bit"):
    poison.make_trigger(c, (16, 16, 3))
