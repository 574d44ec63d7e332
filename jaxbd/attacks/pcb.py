"""PCB: the parameter-controlled backdoor of "Pick your Poison" (Lukas & Kerschbaum, 2023).

A supply-chain attacker who runs the training can trade robustness for detectability by deciding
which parameters carry the backdoor. PCB trains on clean data and, on every `every`-th batch
(every second one by default), triggers a `batch_rate` fraction of the batch's rows (10%) and
relabels them to the attack's target; the gradient of those poisoned batches reaches only a fixed
random subset of the parameters (`param_fraction` of the elements of every parameter array, drawn
once from the run's seed), so the backdoor lives in those parameters. Clean batches update all
parameters as usual.

How the mask acts (*open* in the paper): the loss of a poisoned batch is differentiated with
`stop_gradient` on the unmasked parameters, so its gradient (and so its contribution to the
optimizer's momentum) is zero outside the mask; weight decay and momentum from clean batches still
move every parameter. The default `param_fraction` 0.1 is ours.

Everything happens inside the jitted step: `lax.cond` picks the poisoned or the clean step by the
step counter, the poisoned rows are the first `round(batch_rate * B)` rows of the (randomly
permuted) batch, and the mask is regenerated from its fixed key, so no large constant is baked in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from jaxbd import config as config_lib
from jaxbd import data as data_lib
from jaxbd import poison
from jaxbd import train as train_lib


def default_config() -> ml_collections.ConfigDict:
  """The `attack.pcb` section: poisoned-batch rate, period and update-mask fraction."""
  return ml_collections.ConfigDict(dict(
      batch_rate=0.1,  # fraction of a poisoned batch's rows that get the trigger and target label
      every=2,  # poison every n-th batch (steps n-1, 2n-1, ...)
      param_fraction=0.1,  # fraction of parameter elements the poisoned batches may update
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `attack.pcb` and that a trigger is configured (ConfigError otherwise)."""
  config_lib.check_range(config, "attack.pcb.batch_rate", 0, 1, low_open=True)
  config_lib.check_range(config, "attack.pcb.every", 1)
  config_lib.check_range(config, "attack.pcb.param_fraction", 0, 1, low_open=True)
  config_lib.require(config.poison.name != "none",
                     "attack.name='pcb' needs a trigger: set poison.name (e.g. badnets)")
  config_lib.require(config.poison.rate == 0,
                     "attack.name='pcb' poisons batches during training (attack.pcb.batch_rate); "
                     "set poison.rate=0")
  config_lib.require(config.poison.label_mode != "clean_label",
                     "attack.name='pcb' relabels its rows; poison.label_mode must be all2one or "
                     "all2all")


def parameter_mask(params, fraction: float, key: jax.Array):
  """A pytree of bool arrays like `params`: each element True with probability `fraction`."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.bernoulli(k, fraction, x.shape)
                            for k, x in zip(keys, leaves)])


def masked_loss(loss_fn: train_lib.step.LossFn, fraction: float,
                mask_key: jax.Array) -> train_lib.step.LossFn:
  """`loss_fn` whose gradient is zero outside the fixed parameter mask."""

  def fn(params, *args):
    mask = parameter_mask(params, fraction, mask_key)
    params = jax.tree.map(lambda p, m: jnp.where(m, p, jax.lax.stop_gradient(p)), params, mask)
    return loss_fn(params, *args)

  return fn


def poisoned_batch(arrays: data_lib.TrainArrays, idx: jax.Array, key: jax.Array, *, trigger,
                   batch_rate: float, label_mode: str, target: int, num_classes: int,
                   crop_padding: int, flip: bool) -> tuple[jax.Array, jax.Array]:
  """(f32[B, H, W, C] images, int32[B] labels) of the int32[B] training rows `idx`, whose first
  `round(batch_rate * B)` rows are triggered and relabeled."""
  b = idx.shape[0]
  rows = jnp.arange(b) < round(batch_rate * b)
  labels = arrays.labels[idx]
  wanted = poison.poisoned_label(labels, label_mode, target, num_classes)
  batch = data_lib.TrainArrays(
      arrays.images[idx], jnp.where(rows, wanted, labels),
      jnp.where(rows, jnp.int8(poison.POISONED), arrays.kind[idx]))
  return data_lib.gather_batch(batch, jnp.arange(b), key, poison_fn=poison.poison_fn(trigger),
                               crop_padding=crop_padding, flip=flip)


def build(config: ml_collections.ConfigDict, model, trigger, setup: train_lib.Setup,
          mesh: jax.sharding.Mesh, num_classes: int, key: jax.Array):
  """The PCB train step: `setup.step` on clean batches, the masked poisoned step otherwise.

  Args:
    config: the whole config (`attack.pcb`, `poison`, `data`).
    model: the classifier being trained.
    trigger: the attack's trigger.
    setup: the clean supervised phase (`jaxbd.train.supervised_setup`) to attack.
    mesh: device mesh.
    num_classes: K.
    key: the fixed key of the parameter mask.

  Returns:
    `step(state, arrays, perm, i, key, context) -> (state, metrics)` for `jaxbd.train.fit`.
  """
  c, p = config.attack.pcb, config.poison
  batch_fn = functools.partial(
      poisoned_batch, trigger=trigger, batch_rate=c.batch_rate, label_mode=p.label_mode,
      target=p.target, num_classes=num_classes, crop_padding=config.data.crop_padding,
      flip=config.data.flip)
  loss_fn = masked_loss(train_lib.classification_loss(model), c.param_fraction, key)
  poisoned_step = train_lib.make_train_step(loss_fn, setup.tx, batch_fn,
                                            batch_sharding=train_lib.batch_sharding(mesh))

  def step(state, arrays, perm, i, step_key, context=None):
    poisoned = state["step"] % c.every == c.every - 1
    return jax.lax.cond(poisoned, poisoned_step, setup.step, state, arrays, perm, i, step_key,
                        context)

  return step
