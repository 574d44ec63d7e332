"""PCB: the parameter-controlled backdoor of "Pick your Poison" (Lukas & Kerschbaum, 2023).

A supply-chain attacker who runs the training can trade robustness for detectability by deciding
which parameters carry the backdoor. PCB trains on clean data and, on every `every`-th batch of
an epoch (batches 0, 2, 4, ... by default, as the reference counts them), triggers a `batch_rate`
fraction of the batch's rows (10%) and relabels them to the attack's target; the updates of those
poisoned batches are restricted to a fixed random subset of the parameters (`param_fraction` of
the elements of every parameter array, `int(param_fraction * size)` of them (rounded down, as
the reference counts them) drawn at random once from the run's seed), so the backdoor lives in those
parameters. Clean batches update all parameters as usual.

How the mask acts (`mask`):
- "gradient" (the reference's): the poisoned batch's gradient is zeroed outside the mask before
  the optimizer step, so weight decay and the momentum trace still move every parameter, as
  `param.grad.mul(mask)` before torch's `SGD.step()` does;
- "update": the poisoned step's result is kept only inside the mask: outside it the parameters
  and their optimizer state (e.g. the momentum trace) stay as they were before the step, so a
  poisoned batch neither moves them nor leaves a trace for later clean steps.
BatchNorm statistics are not parameters and follow every batch. The default `param_fraction` 0.1
is ours. `open_modules` (an ablation, not the paper's) lets the poisoned batches update every
parameter of the named top-level modules (e.g. "head"), the mask covering the rest.

Everything happens inside one jitted step: the batch's index in the epoch sets the number of
poisoned rows (the first `int(batch_rate * B)` rows of the randomly permuted batch, or none)
and whether the mask applies; the mask is drawn once and reaches the step as its context (an
argument, not a constant baked into the program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxbd import config as config_lib
from jaxbd import train as train_lib
from jaxbd.attacks import batch
from jaxbd.errors import ConfigError


MASKS = ("gradient", "update")


def default_config() -> ml_collections.ConfigDict:
  """The `attack.pcb` section: poisoned-batch rate, period and update-mask fraction."""
  return ml_collections.ConfigDict(dict(
      batch_rate=0.1,  # fraction of a poisoned batch's rows that get the trigger and target label
      every=2,  # poison every n-th batch of an epoch (batches 0, n, 2n, ...)
      param_fraction=0.1,  # fraction of parameter elements the poisoned batches may update
      mask="gradient",  # gradient: zero the poisoned gradient outside (the reference's) | update
      open_modules="",  # top-level modules the poisoned batches update in full (ablation; "": none)
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `attack.pcb` and that a trigger is configured (ConfigError otherwise)."""
  config_lib.check_range(config, "attack.pcb.batch_rate", 0, 1, low_open=True)
  config_lib.check_range(config, "attack.pcb.every", 1)
  config_lib.check_range(config, "attack.pcb.param_fraction", 0, 1, low_open=True)
  config_lib.check_choice(config.attack.pcb.mask, "attack.pcb.mask", MASKS)
  batch.check_in_loop(config)


def parameter_mask(params, fraction: float, key: jax.Array):
  """A pytree of bool arrays like `params`: in each array, `int(fraction * size)` elements True,
  drawn uniformly at random."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))

  def leaf_mask(k, x):
    chosen = jax.random.permutation(k, x.size)[:int(fraction * x.size)]
    return jnp.zeros(x.size, bool).at[chosen].set(True).reshape(x.shape)

  return treedef.unflatten([leaf_mask(k, x) for k, x in zip(keys, leaves)])


def open_modules(mask, params, names: str):
  """`mask` with every element of the top-level modules `names` (comma-separated) True.

  Raises:
    ConfigError: a named module is not a top-level module of `params`.
  """
  names = open_module_names(params, names)
  return {k: jax.tree.map(jnp.ones_like, m) if k in names else m for k, m in mask.items()}


def open_module_names(params, names: str) -> list[str]:
  """The comma-separated `names`, each checked to be a top-level module of `params`.

  Raises:
    ConfigError: naming the modules that are not.
  """
  names = config_lib.split_names(names)
  missing = [n for n in names if n not in params]
  if missing:
    raise ConfigError(f"attack.pcb.open_modules: no top-level module {missing} (modules: "
                      f"{sorted(params)})")
  return names


def check_model(config: ml_collections.ConfigDict, model, variables: dict, image_shape,
                num_classes: int) -> None:
  """Checks that `attack.pcb.open_modules` names modules of the model (ConfigError otherwise)."""
  del model, image_shape, num_classes
  open_module_names(variables["params"], config.attack.pcb.open_modules)


def keep_masked(new_state: dict, old_state: dict, mask) -> dict:
  """`new_state` with its parameters and their optimizer state taken from `old_state` outside
  `mask` (a bool pytree like the parameters); the step counter and model state stay new.

  Every subtree of the optimizer state with the parameters' structure (momentum traces, Adam
  moments) is masked like the parameters; its other leaves (step counts) stay new.
  """
  params_def = jax.tree.structure(old_state["params"])
  like_params = lambda x: jax.tree.structure(x) == params_def

  def keep(new, old):
    if not like_params(new):
      return new
    return jax.tree.map(lambda m, n, o: jnp.where(m, n, o), mask, new, old)

  opt_state = jax.tree.map(keep, new_state["opt_state"], old_state["opt_state"],
                           is_leaf=like_params)
  return {**new_state, "params": keep(new_state["params"], old_state["params"]),
          "opt_state": opt_state}


def masked_gradients(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """`tx` (same state) applied to gradients zeroed outside `mask` (a bool pytree like them)."""
  def update(grads, state, params=None):
    return tx.update(jax.tree.map(lambda m, g: jnp.where(m, g, 0), mask, grads), state, params)
  return optax.GradientTransformation(tx.init, update)


def build(config: ml_collections.ConfigDict, model, trigger, setup: train_lib.Setup,
          mesh: jax.sharding.Mesh, num_classes: int, key: jax.Array):
  """The PCB train step: a plain step on clean batches, the masked poisoned step otherwise.

  Args:
    config: the whole config (`attack.pcb`, `poison`, `data`).
    model: the classifier being trained.
    trigger: the attack's trigger.
    setup: the clean supervised phase (`jaxbd.train.supervised_setup`) to attack (its optimizer).
    mesh: device mesh.
    num_classes: K.
    key: the fixed key of the parameter mask (apart from the run's init and train keys).

  Returns:
    (`step(state, arrays, perm, i, key, context) -> (state, metrics)` for `jaxbd.train.fit`,
    its context: the parameter mask, a bool pytree like the parameters, on the mesh).
  """
  c = config.attack.pcb
  rows, _ = batch.batch_rows(config, trigger)
  loss_fn, sharding = train_lib.classification_loss(model), train_lib.batch_sharding(mesh)

  def step(state, arrays, perm, i, step_key, mask):
    # One program for both kinds of batch (a lax.cond between two steps ran 12x slower on CPU):
    # a clean batch is the poisoned step with no poisoned row and every parameter unmasked.
    poisoned = i % c.every == 0
    batch_fn = batch.batch_fn(config, trigger, num_classes,
                              poisoned=jnp.where(poisoned, rows, 0), cover=0)
    mask = jax.tree.map(lambda m: m | ~poisoned, mask)
    tx = masked_gradients(setup.tx, mask) if c.mask == "gradient" else setup.tx
    new_state, metrics = train_lib.make_train_step(loss_fn, tx, batch_fn,
                                                   batch_sharding=sharding)(
        state, arrays, perm, i, step_key)
    return (keep_masked(new_state, state, mask) if c.mask == "update" else new_state), metrics

  params = setup.state["params"]
  mask = open_modules(parameter_mask(params, c.param_fraction, key), params, c.open_modules)
  return step, train_lib.put_replicated(mask, mesh)
