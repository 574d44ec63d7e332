"""Assembles a supervised training run: training set on device, state, optimizer, jitted-ready step.

`supervised_setup` is what experiments and benchmarks share: it puts the (possibly poisoned)
training set on the mesh, initializes the model, builds the optimizer from a `train`-style config
section and returns a step that gathers, poisons and augments each batch on device. `tune` runs
such a phase from given variables to the end (defenses, the quantization attack's phases).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from jaxbd import data as data_lib
from jaxbd.train import loop
from jaxbd.train import mesh as mesh_lib
from jaxbd.train import optim, step as step_lib


@dataclasses.dataclass
class Setup:
  """A ready-to-run training phase: pass its pieces to `jaxbd.train.fit`.

  Attributes:
    state: the train state (step, params, model_state, opt_state), placed on the mesh.
    step: the train step `(state, arrays, perm, i, key) -> (state, metrics)`, not yet jitted.
    arrays: the device-resident training set (uint8 images, labels, poison kinds).
    tx: the optimizer `step` applies.
  """

  state: dict
  step: Any
  arrays: data_lib.TrainArrays
  tx: Any = None


def supervised_setup(model, images: np.ndarray, labels: np.ndarray, *,
                     train_config: ml_collections.ConfigDict,
                     data_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     key: jax.Array, kind: Optional[np.ndarray] = None,
                     poison_fn: Optional[data_lib.pipeline.PoisonFn] = None,
                     loss_fn: Optional[step_lib.LossFn] = None,
                     variables: Optional[dict] = None,
                     post_update: Optional[Callable[[Any, Any], Any]] = None) -> Setup:
  """Builds a cross-entropy (or `loss_fn`) training phase of `model`.

  Args:
    model: the classifier.
    images: uint8[N, H, W, C] training images.
    labels: int[N] training labels (already relabeled by a poison plan).
    train_config: a `train`-style section (optimizer, lr, schedule, epochs, batch_size, ...).
    data_config: the `data` section (crop_padding, flip).
    mesh: device mesh; the training set is replicated, batches are split over all devices, MoE
      expert parameters over the `expert` axis (`jaxbd.train.state_sharding`).
    key: initializes the model when `variables` is None.
    kind: int8[N] poisoning roles for `poison_fn` (default: all clean).
    poison_fn: on-device transform of poisoned/cover rows (see jaxbd.poison.poison_fn).
    loss_fn: the loss (default: `classification_loss(model)`).
    variables: start from these variables instead of a fresh initialization.
    post_update: `(params, context) -> params` after every update (see `make_train_step`).
  """
  arrays = data_lib.train_arrays(images, labels, kind, mesh_lib.replicated(mesh))
  steps = -(-len(labels) // train_config.batch_size)
  tx = optim.make_optimizer(train_config, steps)
  if variables is None:
    variables = step_lib.init_variables(model, key, images.shape[1:])
  state = mesh_lib.put_state(step_lib.create_state(variables, tx), mesh)
  batch_fn = functools.partial(data_lib.gather_batch, poison_fn=poison_fn,
                               crop_padding=data_config.crop_padding, flip=data_config.flip)
  step = step_lib.make_train_step(loss_fn or step_lib.classification_loss(model), tx, batch_fn,
                                  batch_sharding=mesh_lib.batch_sharding(mesh),
                                  post_update=post_update)
  return Setup(state, step, arrays, tx)


def tune(phase: str, model, images: np.ndarray, labels: np.ndarray, variables: dict, *,
         train_config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
         mesh: jax.sharding.Mesh, key: jax.Array, workdir: Optional[str],
         loss_fn: Optional[step_lib.LossFn] = None,
         post_update: Optional[Callable[[Any, Any], Any]] = None, context: Any = None,
         evaluate: Optional[Callable[[dict], dict]] = None, **fit_options) -> tuple[dict, dict]:
  """Trains `model` from `variables` on clean uint8[N, H, W, C] `images` and int[N] `labels`
  for `train_config.epochs` epochs (`supervised_setup`, then `jaxbd.train.fit`).

  Args:
    phase: checkpoint/metrics phase name.
    model, images, labels, variables, train_config, data_config, mesh, loss_fn, post_update: as
      in `supervised_setup`.
    key: PRNG key of the phase (batch order, augmentation, step keys).
    workdir: run directory for checkpoints and metrics.jsonl (None: neither).
    context: pytree passed to every step (`loss_fn`, `post_update`), replicated on the mesh.
    evaluate: `variables -> metrics` of the evaluations during training (None: none).
    **fit_options: `jaxbd.train.fit`'s log_every, progress, max_steps, step_cache, origin.

  Returns:
    (final variables, `fit`'s summary).
  """
  setup = supervised_setup(model, images, labels, train_config=train_config,
                           data_config=data_config, mesh=mesh, key=key, variables=variables,
                           loss_fn=loss_fn, post_update=post_update)
  state, summary = loop.fit(
      phase, setup.state, setup.step, setup.arrays, epochs=train_config.epochs,
      batch_size=train_config.batch_size, key=key, workdir=workdir,
      context=None if context is None else mesh_lib.put_replicated(context, mesh),
      eval_fn=(lambda s: evaluate(step_lib.variables(s))) if evaluate else None,
      eval_every=train_config.eval_every, checkpoint_every=train_config.checkpoint_every,
      **fit_options)
  return step_lib.variables(state), summary
