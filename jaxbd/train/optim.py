"""Optimizers and learning-rate schedules from `config.train`, with torch.optim semantics.

Weight decay is L2 added to the gradient before momentum (`torch.optim.SGD/Adam(weight_decay=)`),
applied to every parameter as PyTorch does by default. Schedules are per step, or constant within
each epoch with `schedule_unit="epoch"` (a torch scheduler stepped once per epoch, as BackdoorBench
does).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(c: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the global step.

  Args:
    c: a `train`-style section: lr, epochs, schedule (cosine | constant | step), schedule_unit,
      step_epochs, warmup_epochs; a section that counts `steps` instead of whole epochs (Pivotal
      Tuning) spans that many.
    steps_per_epoch: optimizer steps per epoch.
  """
  total = max(c.get("steps") or c.epochs * steps_per_epoch, 1)
  warmup = int(c.warmup_epochs * steps_per_epoch)
  per_epoch = c.schedule_unit == "epoch"

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    t = jnp.floor(step / steps_per_epoch) * steps_per_epoch if per_epoch else step
    if c.schedule == "cosine":
      frac = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
      lr = 0.5 * c.lr * (1.0 + jnp.cos(jnp.pi * frac))
    elif c.schedule == "step":
      drops = sum(jnp.where(t >= e * steps_per_epoch, 1.0, 0.0) for e in c.step_epochs)
      lr = c.lr * 0.1**drops
    else:
      lr = jnp.asarray(c.lr, jnp.float32)
    if warmup:
      lr = jnp.where(step < warmup, c.lr * (step + 1) / warmup, lr)
    return lr

  return schedule


def make_optimizer(c: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD (momentum, Nesterov) or Adam from a `train`-style config section."""
  schedule = lr_schedule(c, steps_per_epoch)
  if c.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=c.momentum or None, nesterov=c.nesterov)
  else:
    opt = optax.adam(schedule, b1=c.momentum, b2=c.b2)
  if c.weight_decay:
    return optax.chain(optax.add_decayed_weights(c.weight_decay), opt)
  return opt
