"""Vanilla fine-tuning (FT): train every parameter on the trusted clean data with cross-entropy.

The baseline of BackdoorBench and of the D3 paper's table. Defaults (BackdoorBench's
`config/defense/ft`): SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine per epoch, batch 256,
100 epochs, with the run's crop + flip augmentation; BatchNorm in train mode.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import ml_collections

from jaxbd import config as config_lib
from jaxbd import train as train_lib
from jaxbd.defenses import base


def default_config() -> ml_collections.ConfigDict:
  """The `defense.ft` section: SGD 0.01, cosine per epoch, 100 epochs, batch 256."""
  return base.train_section(epochs=100, batch_size=256, lr=0.01, schedule_unit="epoch",
                            eval_every=10, checkpoint_every=10)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `defense.ft` (ConfigError on a bad value)."""
  config_lib.check_train_section(config, "defense.ft")


def fine_tune(ctx: base.Context, variables: dict, trusted: base.Trusted,
              config: ml_collections.ConfigDict, key: jax.Array, *, phase: str = "ft",
              loss_fn: Optional[train_lib.step.LossFn] = None,
              post_update: Optional[Callable[[Any, Any], Any]] = None,
              context: Any = None, max_steps: Optional[int] = None) -> tuple[dict, dict]:
  """Fine-tunes all parameters on `trusted` (cross-entropy unless `loss_fn` is given).

  Defenses that train with their own objective (D3, Pivotal Tuning) call this with their loss,
  an optional projection after each update and the frozen pytrees their loss reads.

  Args:
    ctx: defense context.
    variables: the suspect model's variables.
    trusted: clean images and labels.
    config: a train-style section (epochs, lr, batch_size, ...).
    key: PRNG key (batch order, augmentation).
    phase: checkpoint/metrics phase name.
    loss_fn: the loss (see `jaxbd.train.step`); default cross-entropy in train mode.
    post_update: `(params, context) -> params` after every update.
    context: pytree passed to `loss_fn` and `post_update` (e.g. initial weights, a pivot model).
    max_steps: stop after this many steps (None: `config.epochs` whole epochs).

  Returns:
    (fine-tuned variables, report with steps, epochs and train_seconds: the training time, which
    a checkpoint carries over to the runs that resume or restore it).
  """
  tuned, summary = train_lib.tune(
      phase, ctx.model, trusted.images, trusted.labels, variables, train_config=config,
      data_config=ctx.data_config, mesh=ctx.mesh, key=key, workdir=ctx.workdir, loss_fn=loss_fn,
      post_update=post_update, context=context, evaluate=ctx.evaluate,
      log_every=ctx.log_every, progress=ctx.progress, max_steps=max_steps,
      step_cache=ctx.step_cache, origin=ctx.origin)
  return tuned, {"steps": summary["steps"], "epochs": config.epochs,
                 "train_seconds": summary["seconds"]}
