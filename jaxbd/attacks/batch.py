"""In-loop poisoning: a fixed share of every training batch, as BackdoorBench trains WaNet.

BackdoorBench's WaNet does not poison a fixed set of training images. In every step it warps the
first `int(B * batch_rate)` images of the shuffled batch (any class, the target's included) and
relabels them (all-to-one: to the target; all-to-all: y -> y + 1), and gives the next
`int(int(B * batch_rate) * cross_ratio)` images the noise-mode warp with their labels kept; as
the batches are reshuffled every epoch, the warped images change from epoch to epoch. This
attack does the same for any trigger: the cover rows get the trigger's cover transform
(`trigger.cover_ratio` of them per poisoned row: WaNet's cross ratio, the adaptive attacks'
conservatism; none for the other triggers). It replaces the poison plan (`poison.rate` must be
0); the poisoned share is `attack.batch.batch_rate`, and no row is poisoned for good, so results
record the attack's settings instead of poisoned indices.

BackdoorBench's WaNet also replaces the dataset's crop and flip by its own augmentation of the
whole (poisoned) batch tensor, after normalization: torchvision's RandomCrop (padding 5) w.p. 0.8,
RandomRotation (up to 10 degrees, nearest) w.p. 0.5 and, on CIFAR-10 only, RandomHorizontalFlip,
each drawn once per batch (one offset, angle and flip for all its images) and padding with 0 in
normalized space (the dataset mean). `attack.batch.augment="backdoorbench"` does the same
(`data.batch_augment`, filled with the model's mean, flipping where `data.flip` is set) in place
of the run's per-image crop and flip (`data.crop_padding`, `data.flip`, which the defenses keep);
"run" keeps the run's.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxbd import config as config_lib
from jaxbd import data as data_lib
from jaxbd import poison
from jaxbd import train as train_lib


AUGMENTS = ("run", "backdoorbench")


def default_config() -> ml_collections.ConfigDict:
  """The `attack.batch` section."""
  return ml_collections.ConfigDict(dict(
      batch_rate=0.1,  # share of every batch that is triggered and relabeled (BackdoorBench pratio)
      augment="run",  # run: the run's per-image crop and flip; backdoorbench: data.batch_augment
  ))


def poisoned_rows(config: ml_collections.ConfigDict) -> int:
  """The poisoned rows of a poisoned batch of the in-loop attack `config.attack.name`:
  `int(batch_rate * batch_size)`, rounded down as the references (e.g. 12 of 128 at 10%)."""
  return int(config.attack[config.attack.name].batch_rate * config.train.batch_size)


def check_in_loop(config: ml_collections.ConfigDict) -> None:
  """Checks what an attack that poisons rows inside the training loop (`batch`, `pcb`,
  `latent`: `config.attack.name`) needs: a poisoned row per poisoned batch, a trigger, no poison
  plan, relabeled rows.

  Raises:
    ConfigError: naming `attack.<name>.batch_rate` or the poison setting at fault.
  """
  name = config.attack.name
  rate = config.attack[name].batch_rate
  config_lib.require(poisoned_rows(config) >= 1, f"attack.{name}.batch_rate {rate} poisons no "
                     f"row of a batch of {config.train.batch_size}")
  config_lib.require(config.poison.name != "none",
                     f"attack.name={name!r} needs a trigger: set poison.name (e.g. badnets)")
  config_lib.require(config.poison.rate == 0,
                     f"attack.name={name!r} poisons rows of its batches "
                     f"(attack.{name}.batch_rate); set poison.rate=0")
  config_lib.require(config.poison.label_mode != "clean_label",
                     f"attack.name={name!r} relabels its rows; poison.label_mode must be all2one "
                     "or all2all")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `attack.batch` against the trigger and batch size (ConfigError otherwise)."""
  config_lib.check_range(config, "attack.batch.batch_rate", 0, 1, low_open=True)
  config_lib.check_choice(config.attack.batch.augment, "attack.batch.augment", AUGMENTS)
  check_in_loop(config)


def poisoned_batch(arrays: data_lib.TrainArrays, idx: jax.Array, key: jax.Array, *, trigger,
                   poisoned: int, cover: int, label_mode: str, target: int, num_classes: int,
                   crop_padding: int, flip: bool,
                   batch_fill: Optional[Sequence[float]] = None) -> tuple[jax.Array, jax.Array]:
  """The batch of the int32[B] training rows `idx` with its first `poisoned` rows triggered and
  relabeled and the next `cover` rows given the trigger's cover transform (labels kept), then
  augmented: per image (`crop_padding`, `flip`), or with `batch_fill` (per-channel) the whole
  batch at once by `data.batch_augment` (which flips only with `flip`).

  Returns:
    images f32[B, H, W, C] in [0, 1], labels int32[B].
  """
  rows = jnp.arange(idx.shape[0])
  is_poisoned, is_cover = rows < poisoned, (rows >= poisoned) & (rows < poisoned + cover)
  labels = arrays.labels[idx]
  wanted = poison.poisoned_label(labels, label_mode, target, num_classes)
  kind = jnp.where(is_poisoned, jnp.int8(poison.POISONED),
                   jnp.where(is_cover, jnp.int8(poison.COVER), arrays.kind[idx]))
  batch = data_lib.TrainArrays(arrays.images[idx], jnp.where(is_poisoned, wanted, labels), kind)
  if batch_fill is None:
    return data_lib.gather_batch(batch, rows, key, poison_fn=poison.poison_fn(trigger),
                                 crop_padding=crop_padding, flip=flip)
  k_batch, k_augment = jax.random.split(key)
  images, labels = data_lib.gather_batch(batch, rows, k_batch, poison_fn=poison.poison_fn(trigger))
  return data_lib.batch_augment(images, k_augment, batch_fill, flip=flip), labels


def batch_fn(config: ml_collections.ConfigDict, trigger, num_classes: int, poisoned: int,
             cover: int, batch_fill: Optional[Sequence[float]] = None):
  """`poisoned_batch` with the run's trigger, label mode, target and augmentation."""
  p = config.poison
  return functools.partial(poisoned_batch, trigger=trigger, poisoned=poisoned, cover=cover,
                           label_mode=p.label_mode, target=p.target, num_classes=num_classes,
                           crop_padding=config.data.crop_padding, flip=config.data.flip,
                           batch_fill=batch_fill)


def batch_rows(config: ml_collections.ConfigDict, trigger) -> tuple[int, int]:
  """(poisoned, cover): the rows of every poisoned batch of the in-loop attack
  `config.attack.name` that get `trigger` and its cover transform (`trigger.cover_ratio` per
  poisoned row, rounded down after float error, as the poison plan counts them; only the `batch`
  attack has cover rows).

  Raises:
    ConfigError: they do not fit a batch (BackdoorBench would give fewer cover rows unannounced),
      or the trigger asks for cover rows that the attack would not make.
  """
  name, size = config.attack.name, config.train.batch_size
  poisoned, ratio = poisoned_rows(config), getattr(trigger, "cover_ratio", 0.0)
  config_lib.require(name == "batch" or not ratio,
                     f"attack.name={name!r} makes no cover rows, but poison.{config.poison.name} "
                     f"asks for {ratio:g} per poisoned row (its conservatism or cross ratio): "
                     "set that to 0, or use attack.name='batch'")
  cover = poison.plan.fraction_count(ratio, poisoned)
  config_lib.require(poisoned + cover <= size,
                     f"attack.{name}.batch_rate {config.attack[name].batch_rate} gives {poisoned} "
                     f"poisoned and {cover} cover rows ({ratio:g} per poisoned row, "
                     f"poison.{config.poison.name}), more than a batch of {size}")
  return poisoned, cover


def build(config: ml_collections.ConfigDict, model, trigger, setup: train_lib.Setup,
          mesh: jax.sharding.Mesh, num_classes: int, key: jax.Array):
  """The train step that poisons every batch, and its context (None): the arguments and results
  of `jaxbd.attacks.ATTACKS`."""
  del key  # nothing fixed to draw: the batches' shuffles pick the rows
  poisoned, cover = batch_rows(config, trigger)
  fill = tuple(model.mean) if config.attack.batch.augment == "backdoorbench" else None
  return train_lib.make_train_step(
      train_lib.classification_loss(model), setup.tx,
      batch_fn(config, trigger, num_classes, poisoned, cover, fill),
      batch_sharding=train_lib.batch_sharding(mesh)), None
