"""Fine-pruning (Liu, Dolan-Gavitt and Garg, RAID 2018, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks"), as the BadPatches thesis code runs it on pMoE.

Backdoor behaviour tends to live in neurons that clean inputs leave dormant. Stage 1 (pruning)
runs the suspect model on clean data, takes each channel's mean activation in the model's
fine-pruning layer and switches off the `prune_rate` fraction with the lowest mean; stage 2
fine-tunes the pruned model on the clean data (`jaxbd.defenses.fine_tuning.fine_tune`), the
pruned channels staying off. The BadPatches paper reports both stages: pruning alone leaves the
backdoor, fine-tuning removes it.

The fine-pruning layer is the model's last convolution (see `jaxbd.models.common.prunable`):
each pMoE expert's last conv (channels ranked within each expert), PreAct-ResNet18's last block
output (after the residual sum: a pruned channel is gone from the conv and the shortcut alike,
as BackdoorBench's fine-pruning drops it from layer4's output), the CNN's last stage, the
V-MoE's last MoE layer's expert hidden units (per expert).
Channels are switched off with masks in the variables' `prune` collection, not by editing
parameters, so fine-tuning cannot revive them. Defaults: activations over up to 10,000 clean
images (the defender's trusted set, or as many of its images drawn at random when it is larger;
the BadPatches setting uses `defense.clean_fraction=0.2` of CIFAR-10), prune rate 10%, then 5
epochs of fine-tuning (SGD lr 0.01, momentum 0.9, wd 5e-4, cosine per epoch: *open* in the
thesis, FT's defaults). `sweep` lists extra prune rates whose pruned-only models are reported
as stages `pruned@RATE` (ACC and ASR against fraction pruned).
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import host
from jaxbd import train as train_lib
from jaxbd.data.pipeline import to_unit
from jaxbd.defenses import base, fine_tuning
from jaxbd.errors import ConfigError
from jaxbd.poison import plan as plan_lib

ACTIVATIONS = "prune_activations"
# The ranking images are drawn from fold_in(key, RANKING_STREAM): fold_in(key, i) equals
# split(key, n)[i], and fine-tuning's `jaxbd.train.fit` trains from split(key).
RANKING_STREAM = 1_000_003


def default_config() -> ml_collections.ConfigDict:
  """The `defense.fine_pruning` section: prune rate, ranking images, extra rates, fine-tuning."""
  return ml_collections.ConfigDict(dict(
      prune_rate=0.1,  # fraction of the layer's channels switched off (per expert for MoE)
      num_images=10000,  # clean images whose activations rank the channels (a random draw of
      # the trusted set when it is larger)
      batch_size=500,  # images per activation batch
      sweep=(0.2, 0.4, 0.6, 0.8),  # extra prune rates reported as pruned-only stages
      finetune=base.train_section(epochs=5, batch_size=128, lr=0.01, schedule_unit="epoch",
                                  eval_every=5, checkpoint_every=5),
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `defense.fine_pruning` (ConfigError on a bad value)."""
  c = config.defense.fine_pruning
  config_lib.check_range(config, "defense.fine_pruning.prune_rate", 0, 1)
  config_lib.check_range(config, "defense.fine_pruning.num_images", 1)
  config_lib.check_range(config, "defense.fine_pruning.batch_size", 1)
  config_lib.require(all(0 <= r <= 1 for r in c.sweep),
                     "config key 'defense.fine_pruning.sweep' must hold rates in [0, 1]")
  config_lib.check_train_section(config, "defense.fine_pruning.finetune",
                                 min_epochs=0)  # 0: pruning only


@functools.partial(jax.jit, static_argnums=0)
def _activation_sums(model, variables: dict, images: jax.Array, valid: jax.Array) -> dict:
  """{module path: f32[..., C]} fine-pruning-layer activations summed over the first `valid`
  images of the batch (the rest is padding)."""
  _, state = model.apply(variables, to_unit(images), train=False,
                         mutable=["intermediates"])
  flat = flax.traverse_util.flatten_dict(state.get("intermediates", {}))
  keep = jnp.arange(images.shape[0]) < valid  # [B]

  def total(a):  # f32[B, ..., C] -> f32[..., C]
    return jnp.sum(jnp.where(keep.reshape(-1, *[1] * (a.ndim - 1)), a, 0.0), axis=0)

  return {k[:-1]: total(v[0]) for k, v in flat.items() if k[-1] == ACTIVATIONS}


def no_layer(model) -> ConfigError:
  """The error for a model without a fine-pruning layer."""
  return ConfigError(f"defense fine_pruning: model {type(model).__name__} has no fine-pruning "
                     "layer")


def check_model(config: ml_collections.ConfigDict, model, variables: dict, image_shape,
                num_classes: int) -> None:
  """Checks, by shapes alone, that the model has a fine-pruning layer (ConfigError otherwise)."""
  del config, num_classes
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8)
  if not jax.eval_shape(lambda v, x: _activation_sums(model, v, x, 1), variables, images):
    raise no_layer(model)


def mean_activations(model, variables: dict, images: np.ndarray, batch_size: int) -> dict:
  """Mean activation per channel of the model's fine-pruning layer over `images`.

  The per-batch sums are accumulated on the device; only the final sums come to the host.

  Args:
    model: a classifier with a fine-pruning layer.
    variables: its variables.
    images: uint8[M, H, W, C].
    batch_size: images per jitted batch.

  Returns:
    The `prune` collection's structure with f32[..., C] means in place of the masks
    (`{module: ... {"mask": means}}`); empty when the model has no fine-pruning layer.
  """
  sums = None
  for _, chunk, valid in train_lib.padded_batches(images, batch_size):
    batch = _activation_sums(model, variables, chunk, valid)
    sums = batch if sums is None else jax.tree.map(jnp.add, sums, batch)
  if not sums:
    return {}
  return flax.traverse_util.unflatten_dict({(*k, "mask"): v / len(images)
                                            for k, v in jax.device_get(sums).items()})


def ranking_rows(size: int, count: int, key: jax.Array) -> np.ndarray:
  """int[min(size, count)]: the trusted rows whose activations rank the channels, all of them or
  `count` drawn without replacement (sorted), so that a trusted set in class order is not ranked
  on its first classes."""
  if size <= count:
    return np.arange(size)
  return np.sort(np.asarray(jax.random.choice(key, size, (count,), replace=False)))


def prune_masks(activations: dict, rate: float) -> dict:
  """Masks switching off the rate * C (rounded down) lowest-activation channels of the last axis.

  Args:
    activations: `mean_activations` output (f32[..., C] leaves).
    rate: fraction of channels to prune; each row of the leading axes (an expert) separately.

  Returns:
    The same structure with f32[..., C] masks (0: pruned).
  """

  def mask(a):
    a = np.asarray(a)
    count = plan_lib.fraction_count(rate, a.shape[-1])
    order = np.argsort(a, axis=-1, kind="stable")
    out = np.ones(a.shape, np.float32)
    np.put_along_axis(out, order[..., :count], 0.0, axis=-1)
    return jnp.asarray(out)

  return jax.tree.map(mask, activations)


def with_masks(variables: dict, masks: dict) -> dict:
  """The variables with a `prune` collection of channel masks (per masked layer f32[..., C], the
  leading axes one per expert: 1 keeps a channel, 0 prunes it; see `prune_masks`)."""
  return {**variables, "prune": masks}


def fine_prune(ctx: base.Context, variables: dict, trusted: base.Trusted,
               config: ml_collections.ConfigDict, key: jax.Array) -> tuple[dict, dict]:
  """Prunes the lowest-activation channels, then fine-tunes (see the module docstring).

  Args:
    ctx: defense context.
    variables: the suspect model's variables.
    trusted: the defender's clean images and labels.
    config: the `defense.fine_pruning` section.
    key: PRNG key of the fine-tuning stage (and, folded with RANKING_STREAM, of the ranking
      images' draw).

  Returns:
    (pruned and fine-tuned variables, report). The report's stages hold the pruned-only model
    (`pruned`) and the pruned-only models of the sweep rates (`pruned@RATE`).

  Raises:
    ConfigError: the model has no fine-pruning layer.
  """
  images = trusted.images[ranking_rows(len(trusted.labels), config.num_images,
                                       jax.random.fold_in(key, RANKING_STREAM))]
  acts = mean_activations(ctx.model, variables, images, config.batch_size)
  if not acts:
    raise no_layer(ctx.model)
  masks = prune_masks(acts, config.prune_rate)
  leaves = jax.tree.leaves(masks)
  pruned_channels = int(sum(np.sum(np.asarray(m) == 0) for m in leaves))
  if config.prune_rate > 0 and not pruned_channels:
    host.say(f"fine-pruning: prune_rate {config.prune_rate:g} of "
             f"{min(m.shape[-1] for m in leaves)} channels rounds down to none: nothing is pruned",
             err=True)
  pruned = with_masks(variables, masks)
  stages = {"pruned": pruned}
  stages.update({f"pruned@{r:g}": with_masks(variables, prune_masks(acts, r))
                 for r in config.sweep})
  tuned, report = fine_tuning.fine_tune(ctx, pruned, trusted, config.finetune, key,
                                        phase="fine_pruning")
  return tuned, {**report, "stages": stages, "prune_rate": config.prune_rate,
                 "activation_images": len(images), "pruned_channels": pruned_channels,
                 "channels": int(sum(np.size(m) for m in leaves))}
