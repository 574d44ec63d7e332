"""Latent Backdoor (Yao, Li, Zheng & Zhao, CCS 2019), as Pick your Poison evaluates it.

The attacker controls training. First the trigger is fitted to the target class's latent
representation on a clean (teacher) model: inside the mask of the configured patch trigger
(`poison.badnets`, or `poison.blended`'s alpha mask) the pattern Delta minimizes

    mean_x || F(x (+) Delta) - mu_t ||^2 / D,   mu_t = mean of F(x_t) over target-class images x_t,

where x (+) Delta pastes Delta into x inside the mask, F is the clean model's D-dimensional
penultimate feature map (eval mode) and x ranges over the non-target training images
(`trigger_steps` Adam steps of learning rate `trigger_lr` on random batches of `trigger_batch`,
the pattern clipped to [0, 1] after each, starting from the configured pattern). Then the model
is trained with the backdoor injected by the latent loss: in every batch the first
`int(batch_rate * B)` rows (any class) get the fitted trigger and the target label, as the
in-loop `batch` attack does, and the loss is

    CE(batch) + weight * mean_i || F(x_i (+) Delta) - mean_j F(x_j) ||^2 / D

over the poisoned rows i and the batch's clean target-class rows j, with F the model being
trained (train mode; a batch without a clean target-class row adds no latent term). Yao et al.
inject by fine-tuning the teacher and then transfer it to a student task; here (no transfer) the
backdoored model is trained from scratch like every victim of the standard experiment, which
trains the clean teacher first (`standard.train_clean`). The loss weight, step counts and rates
are ours. The standard experiment saves the fitted trigger as `WORKDIR/latent_trigger.npz` (read
back on a rerun) and records the latent distances before and after fitting in results.json.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxbd import config as config_lib
from jaxbd import models
from jaxbd import train as train_lib
from jaxbd.attacks import batch
from jaxbd.data.pipeline import to_unit

TRIGGERS = ("badnets", "blended")  # mask triggers whose pattern is fitted


def default_config() -> ml_collections.ConfigDict:
  """The `attack.latent` section."""
  return ml_collections.ConfigDict(dict(
      batch_rate=0.1,  # share of every batch that gets the fitted trigger and the target label
      weight=1.0,  # weight of the latent loss in training
      trigger_steps=300,  # Adam steps fitting the trigger on the clean model
      trigger_lr=0.05,
      trigger_batch=128,
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `attack.latent` and what it needs of the rest of the config (ConfigError)."""
  config_lib.check_range(config, "attack.latent.batch_rate", 0, 1, low_open=True)
  config_lib.check_range(config, "attack.latent.weight", 0)
  config_lib.check_range(config, "attack.latent.trigger_steps", 0)
  config_lib.check_range(config, "attack.latent.trigger_lr", 0, low_open=True)
  config_lib.check_range(config, "attack.latent.trigger_batch", 1)
  batch.check_in_loop(config)
  need = "attack.name='latent' needs"
  config_lib.require(config.poison.name in TRIGGERS,
                     f"{need} a mask trigger to fit, poison.name in {TRIGGERS}, got "
                     f"{config.poison.name!r}")
  config_lib.require(config.poison.label_mode == "all2one",
                     f"{need} poison.label_mode=all2one (one target class), got "
                     f"{config.poison.label_mode!r}")
  config_lib.require_clean_model(config, need, "the teacher its trigger is fitted on")


def latent_distance(model, variables: dict, trigger, images: jax.Array,
                    target: jax.Array) -> jax.Array:
  """Mean over uint8[B, H, W, C] `images` of ||F(trigger(x)) - target||^2 / D (eval mode)."""
  _, z = models.features(model, variables, trigger(to_unit(images)))
  return jnp.mean((z - target) ** 2)


def fit_trigger(model, variables: dict, trigger, others: np.ndarray, target: jax.Array,
                c: ml_collections.ConfigDict, key: jax.Array, put: Callable):
  """The mask trigger with its pattern fitted to the latent `target` (f32[D]) on the clean
  model over uint8[N, H, W, C] `others`, the non-target training images (module docstring)."""
  tx = optax.adam(c.trigger_lr)
  data = put(others)

  @jax.jit
  def step(pattern, opt_state, k):
    x = data[jax.random.randint(k, (c.trigger_batch,), 0, data.shape[0])]
    loss = lambda p: latent_distance(model, variables, trigger.replace(pattern=p), x, target)
    updates, opt_state = tx.update(jax.grad(loss)(pattern), opt_state)
    return jnp.clip(optax.apply_updates(pattern, updates), 0.0, 1.0), opt_state

  pattern, opt_state = trigger.pattern, tx.init(trigger.pattern)
  for k in jax.random.split(key, c.trigger_steps):
    pattern, opt_state = step(pattern, opt_state, k)
  return trigger.replace(pattern=pattern)


def distances(model, variables: dict, named_triggers: dict, images: jax.Array,
              target: jax.Array) -> dict[str, float]:
  """{"distance_<name>": latent distance} of each trigger on uint8[B, H, W, C] `images`."""
  distance = jax.jit(lambda t: latent_distance(model, variables, t, images, target))
  return {f"distance_{name}": float(distance(t)) for name, t in named_triggers.items()}


def latent_loss(model, rows: int, target: int, weight: float) -> train_lib.step.LossFn:
  """Cross-entropy plus `weight` times the latent distance of the batch's first `rows`
  (poisoned) rows to the mean features of its clean target-class rows (module docstring)."""

  def loss_fn(params, model_state, images, labels, key, context=None):
    del context
    out = train_lib.forward(model, params, model_state, images, key, with_features=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
    clean_target = (jnp.arange(labels.shape[0]) >= rows) & (labels == target)
    count = clean_target.sum()
    mean = (out.features * clean_target[:, None]).sum(0) / jnp.maximum(count, 1)
    distance = jnp.where(count > 0, jnp.mean((out.features[:rows] - mean) ** 2), 0.0)
    metrics = {"loss": ce, "latent": distance,
               "train_acc": train_lib.step.batch_accuracy(out.logits, labels)}
    return train_lib.step.plus_aux(ce + weight * distance, out, metrics), (out.model_state,
                                                                           metrics)

  return loss_fn


def build(config: ml_collections.ConfigDict, model, trigger, setup: train_lib.Setup,
          mesh: jax.sharding.Mesh, num_classes: int, key: Optional[jax.Array] = None):
  """The latent-backdoor train step (with the already fitted `trigger`) and its context (None):
  the arguments and results of `jaxbd.attacks.ATTACKS`."""
  del key
  rows, _ = batch.batch_rows(config, trigger)
  loss_fn = latent_loss(model, rows, config.poison.target, config.attack.latent.weight)
  return train_lib.make_train_step(
      loss_fn, setup.tx, batch.batch_fn(config, trigger, num_classes, rows, 0),
      batch_sharding=train_lib.batch_sharding(mesh)), None
