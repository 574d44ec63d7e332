"""Fine-pruning: the lowest-activation channels are switched off (per expert for MoE) in every
model, stay off through fine-tuning, and both stages plus the prune-rate sweep are reported."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import defenses, models
from jaxbd import train as train_lib
from jaxbd.defenses import fine_pruning
from jaxbd.errors import ConfigError

# model -> (path of its fine-pruning mask, mask shape); the WRN-MoE's is in test_moe.py
LAYERS = {
    "cnn": (("mask",), (8,)),
    "resnet": (("mask",), (8,)),
    "pmoe_patch": (("moe", "mask"), (4, 8)),
    "vmoe": (("block1", "moe", "experts", "mask"), (4, 32)),
}


def leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_masks_switch_off_the_lowest_channels_of_each_expert():
  acts = {"moe": {"mask": np.array([[5.0, 1.0, 3.0, 2.0, 4.0], [0.0, 9.0, 8.0, -1.0, 7.0]])}}
  masks = fine_pruning.prune_masks(acts, 0.4)  # int(0.4 * 5) = 2 per expert
  np.testing.assert_array_equal(masks["moe"]["mask"], [[1, 0, 1, 0, 1], [0, 1, 1, 0, 1]])
  assert float(jnp.sum(fine_pruning.prune_masks(acts, 0.0)["moe"]["mask"])) == 10
  assert float(jnp.sum(fine_pruning.prune_masks(acts, 1.0)["moe"]["mask"])) == 0
  wide = {"a": np.arange(100.0)}  # 0.57 * 100 is 56.99... in float: still 57 channels
  assert float(jnp.sum(fine_pruning.prune_masks(wide, 0.57)["a"])) == 43


@pytest.mark.parametrize("name", list(LAYERS))
def test_pruned_channels_are_silenced_in_every_model(name, tiny_model):
  _, model, variables = tiny_model(name)
  path, shape = LAYERS[name]
  images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
  acts = fine_pruning.mean_activations(model, variables, images, batch_size=16)
  assert leaf(acts, path).shape == shape
  masks = fine_pruning.prune_masks(acts, 0.5)
  pruned = fine_pruning.with_masks(variables, masks)
  after = fine_pruning.mean_activations(model, pruned, images, batch_size=16)
  off = np.asarray(leaf(masks, path)) == 0
  assert off.sum() == np.prod(shape) // 2
  np.testing.assert_array_equal(np.asarray(leaf(after, path))[off], 0.0)
  np.testing.assert_allclose(np.asarray(leaf(after, path))[~off],
                             np.asarray(leaf(acts, path))[~off], rtol=1e-5, atol=1e-6)
  ones = fine_pruning.with_masks(variables, fine_pruning.prune_masks(acts, 0.0))
  kept = fine_pruning.mean_activations(model, ones, images, batch_size=16)
  np.testing.assert_allclose(leaf(kept, path), leaf(acts, path), rtol=1e-6, atol=1e-7)


def test_mean_activations_are_the_plain_mean_whatever_the_padding(tiny_model):
  """24 images in batches of 7 (the last padded from 3 images) give the mean over the 24 of the
  per-image activations of one unbatched pass."""
  _, model, variables = tiny_model("pmoe_patch")
  images = np.random.default_rng(1).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
  _, state = model.apply(variables, jnp.asarray(images, jnp.float32) / 255.0,
                         mutable=["intermediates"])
  per_image = np.asarray(state["intermediates"]["moe"][fine_pruning.ACTIVATIONS][0])  # [24, E, C]
  assert per_image.shape == (24, 4, 8) and per_image.std(0).max() > 0
  for batch_size in (7, 24):
    acts = fine_pruning.mean_activations(model, variables, images, batch_size)
    np.testing.assert_allclose(acts["moe"]["mask"], per_image.mean(0), rtol=1e-5, atol=1e-6)


class NoPruningLayer(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_bad_prune_rate_and_a_model_without_a_pruning_layer_are_refused():
  c = config_lib.defaults()
  c.defense.fine_pruning.prune_rate = 1.5
  c.defense.names = "fine_pruning"
  with pytest.raises(ConfigError, match=r"'defense.fine_pruning.prune_rate' must be in \[0, 1\]"):
    config_lib.validate(c)
  model = NoPruningLayer()
  ctx = defenses.Context(model, train_lib.make_mesh(), c.data, 10, progress=False)
  images = np.zeros((4, 8, 8, 1), np.uint8)
  trusted = defenses.Trusted(images, np.zeros(4, np.int32), np.arange(4))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ConfigError, match="NoPruningLayer has no fine-pruning layer"):
    fine_pruning.fine_prune(ctx, variables, trusted, config_lib.defaults().defense.fine_pruning,
                            jax.random.key(0))
  # the same answer from shapes alone, as experiments ask it before training the victim
  shapes = jax.eval_shape(lambda: variables)
  with pytest.raises(ConfigError, match="NoPruningLayer has no fine-pruning layer"):
    fine_pruning.check_model(c, model, shapes, (8, 8, 1), 10)
  cnn = models.create(c, 10, (0.5,), (0.25,))
  fine_pruning.check_model(c, cnn, jax.eval_shape(
      lambda: train_lib.init_variables(cnn, jax.random.key(0), (8, 8, 1))), (8, 8, 1), 10)


@pytest.mark.slow
def test_fine_pruning_on_the_badpatches_backdoor(badpatches_cpu_run):
  """CPU recipe: 500 trusted images. Measured: pruning 10% of each expert's channels keeps the
  backdoor (ACC 0.392, ASR 1.0; the paper: pruning alone is ineffective); the sweep removes it
  only with the accuracy (60%: ACC 0.161, ASR 0.057); 5 epochs of fine-tuning on 500 images
  (20 steps) leave ASR at 1.0, where the paper's 10,000 images (390 steps) bring it to ~2%."""
  doc = badpatches_cpu_run.doc
  fp, bd = doc["defenses"]["fine_pruning"], doc["metrics"]["backdoored"]
  stages = fp["stages"]
  assert set(stages) == {"pruned", "pruned@0.2", "pruned@0.4", "pruned@0.6", "pruned@0.8"}
  assert fp["trusted_size"] == 500 and fp["pruned_channels"] == 4 * 6
  assert stages["pruned"]["asr"] >= 0.9  # pruning alone leaves the backdoor
  assert bd["acc"] - stages["pruned"]["acc"] <= 0.05
  accs = [bd["acc"]] + [stages[f"pruned@{r}"]["acc"] for r in ("0.2", "0.4", "0.6", "0.8")]
  assert accs[-1] < accs[0] - 0.15  # pruning most channels destroys the model
  assert all(0.0 <= fp[k] <= 1.0 for k in ("acc", "asr", "ra", "der"))
  # The fine-tuned model (its checkpoint) keeps the pruned channels off and has moved.
  run = badpatches_cpu_run.prepared
  epochs = badpatches_cpu_run.config.defense.fine_pruning.finetune.epochs
  ckpt = train_lib.Checkpointer(os.path.join(run.workdir, "checkpoints", "fine_pruning"))
  state = ckpt.restore(epochs)
  ckpt.close()
  tuned = {"params": state["params"], **state["model_state"]}
  backdoored = badpatches_cpu_run.variables("backdoored")
  mask = np.asarray(tuned["prune"]["moe"]["mask"])
  assert (mask == 0).sum() == fp["pruned_channels"]
  acts = fine_pruning.mean_activations(run.model, tuned, run.dataset.x_test[:500], 500)
  np.testing.assert_array_equal(np.asarray(acts["moe"]["mask"])[mask == 0], 0.0)
  assert np.abs(np.asarray(tuned["params"]["head"]["kernel"]) -
                np.asarray(backdoored["params"]["head"]["kernel"])).max() > 1e-3


def test_a_prune_rate_that_rounds_down_to_no_channel_says_so(tiny_model, capsys):
  """10% of each expert's 8 channels is 0.8, rounded down: nothing is pruned, and the run says so
  on stderr; 20% prunes one channel per expert and says nothing."""
  c, model, variables = tiny_model("pmoe_patch")
  ctx = defenses.Context(model, train_lib.make_mesh(), c.data, 10, progress=False)
  rng = np.random.default_rng(0)
  trusted = defenses.Trusted(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
                             rng.integers(0, 10, 8).astype(np.int32), np.arange(8))
  for rate, pruned in ((0.1, 0), (0.2, 4)):
    config = config_lib.defaults().defense.fine_pruning
    config.prune_rate = rate
    config.finetune.update(dict(epochs=1, batch_size=8))
    _, report = fine_pruning.fine_prune(ctx, variables, trusted, config, jax.random.key(0))
    assert report["pruned_channels"] == pruned
    said = capsys.readouterr().err
    assert ("prune_rate 0.1 of 8 channels rounds down to none: nothing is pruned" in said) == (
        not pruned)


def test_ranking_images_are_a_random_draw_of_a_larger_trusted_set():
  """A trusted set of 10 classes in class order, 100 rows each: 50 ranking rows come from every
  class (the first 50 rows would all be class 0), the same for the same key; a set no larger than
  `num_images` is taken whole."""
  labels = np.repeat(np.arange(10), 100)
  rows = fine_pruning.ranking_rows(1000, 50, jax.random.key(0))
  assert len(set(rows)) == 50 and np.all(np.diff(rows) > 0)
  assert len(np.unique(labels[rows])) >= 8
  np.testing.assert_array_equal(rows, fine_pruning.ranking_rows(1000, 50, jax.random.key(0)))
  np.testing.assert_array_equal(fine_pruning.ranking_rows(40, 50, jax.random.key(0)),
                                np.arange(40))


def test_ranking_draw_has_a_key_stream_of_its_own():
  """The ranking images' key is none of the keys fine-tuning trains from (`fit` splits the phase
  key into its permutation and step streams)."""
  key = jax.random.key(3)
  ranking = jax.random.key_data(jax.random.fold_in(key, fine_pruning.RANKING_STREAM))
  for used in jax.random.key_data(jax.random.split(key)):
    assert not np.array_equal(ranking, used)
