"""Train state and the jitted train step.

The train state is a plain dict of pytrees (big_vision style):
`{"step": int32[], "params": ..., "model_state": {collection: ...}, "opt_state": ...}`, where
`model_state` holds the mutable variable collections (BatchNorm `batch_stats`, quantization
observers, fine-pruning masks). `variables(state)` rebuilds what `model.apply` takes. The
collections in `TRANSIENT` are recomputed by every `apply` and never stored: `intermediates`
(sown analysis values) and `aux_loss` (auxiliary losses, e.g. MoE router balancing losses, which
`classification_loss` adds to the loss).

A step is `step(state, arrays, perm, i, key, context) -> (state, metrics)`: it takes row `i` of
the epoch's index matrix `perm`, builds the batch on device (gather, poison, augment; see
`jaxbd.data.gather_batch`), differentiates a loss and applies the optimizer. Its PRNG key is
`fold_in(key, state["step"])`, so a run is a pure function of its seed and resumes bit for bit.
Losses are pluggable: `loss_fn(params, model_state, images, labels, key, context) ->
(loss, (model_state, metrics))`; `context` carries extra pytrees a defense needs (a frozen pivot
model, initial weights) as jit arguments rather than baked-in constants.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

State = dict[str, Any]
TRANSIENT = ("intermediates", "aux_loss")
LossFn = Callable[..., tuple[jax.Array, tuple[dict, dict]]]
BatchFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def variables(state: State) -> dict:
  """The `model.apply` variables of a train state."""
  return {"params": state["params"], **state["model_state"]}


def split_variables(variables_: dict) -> tuple[Any, dict]:
  """(params, mutable collections) of `model.init` variables, without the TRANSIENT ones."""
  rest = {k: v for k, v in variables_.items() if k not in ("params", *TRANSIENT)}
  return variables_["params"], rest


def init_variables(model: nn.Module, key: jax.Array, image_shape) -> dict:
  """`model.init` on a single zero image of shape (H, W, C)."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  params_key, noise_key = jax.random.split(key)
  variables_ = model.init({"params": params_key, "noise": noise_key, "dropout": noise_key},
                          dummy, train=False)
  params, rest = split_variables(variables_)
  return {"params": params, **rest}


def create_state(variables_: dict, tx: optax.GradientTransformation) -> State:
  """A fresh train state (step 0) around model variables."""
  params, model_state = split_variables(variables_)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
          "opt_state": tx.init(params)}


def model_rngs(key: jax.Array) -> dict[str, jax.Array]:
  """The PRNG streams models may use in training (dropout, router noise)."""
  dropout, noise = jax.random.split(key)
  return {"dropout": dropout, "noise": noise}


class Forward(NamedTuple):
  """One forward pass inside a loss (see `forward`)."""
  logits: jax.Array  # f32[B, num_classes]
  model_state: dict  # updated mutable collections (train mode) or the input ones (eval mode)
  features: Optional[jax.Array]  # f32[B, D] penultimate features, when asked for
  aux_loss: Optional[jax.Array]  # scalar sum of the model's sown auxiliary losses, if any


def forward(model: nn.Module, params, model_state: dict, images: jax.Array, key: jax.Array, *,
            train: bool = True, with_features: bool = False) -> Forward:
  """`model` on images f32[B, H, W, C] inside a loss.

  In train mode the mutable collections (BatchNorm statistics) are updated and the auxiliary
  losses the model sows into `aux_loss` (already weighted, e.g. V-MoE's router importance and load
  losses) are summed; in eval mode `model_state` comes back unchanged. `with_features` also returns
  the penultimate features (see `jaxbd.models.features`).
  """
  mutable = [*model_state, "aux_loss"] if train else []
  if with_features:
    mutable = mutable + ["intermediates"]
  out = model.apply({"params": params, **model_state}, images, train=train,
                    mutable=mutable or False, rngs=model_rngs(key))
  logits, new_state = out if mutable else (out, {})
  new_state = dict(new_state)
  feats = new_state.pop("intermediates", {}).get("features", (None,))[0]
  aux = jax.tree.leaves(new_state.pop("aux_loss", {}))
  return Forward(logits, new_state if train else model_state, feats, sum(aux) if aux else None)


def batch_accuracy(logits: jax.Array, labels) -> jax.Array:
  """Fraction of the rows of f32[B, K] logits whose argmax is `labels` (int[B] or one class)."""
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def plus_aux(loss: jax.Array, out: Forward, metrics: dict) -> jax.Array:
  """The f32[] `loss` plus the f32[] auxiliary losses of the forward pass `out`, if the model sowed
  any (e.g. V-MoE's router losses); they are recorded in `metrics` as `aux_loss`."""
  if out.aux_loss is None:
    return loss
  metrics["aux_loss"] = out.aux_loss
  return loss + out.aux_loss


def classification_loss(model: nn.Module) -> LossFn:
  """Mean softmax cross-entropy of `model` in train mode (BatchNorm statistics updated).

  Auxiliary losses the model sows into the `aux_loss` collection (already weighted, e.g. V-MoE's
  router importance and load losses) are added to the loss and reported as `aux_loss`.
  """

  def loss_fn(params, model_state, images, labels, key, context=None):
    del context
    out = forward(model, params, model_state, images, key)
    loss = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
    metrics = {"loss": loss, "train_acc": batch_accuracy(out.logits, labels)}
    return plus_aux(loss, out, metrics), (out.model_state, metrics)

  return loss_fn


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, batch_fn: BatchFn, *,
                    batch_sharding=None,
                    post_update: Optional[Callable[[Any, Any], Any]] = None):
  """Builds the (un-jitted) train step; see the module docstring for its signature.

  Args:
    loss_fn: the differentiated loss.
    tx: optimizer.
    batch_fn: `(arrays, idx int32[B], key) -> (images f32[B, H, W, C], labels int32[B])`.
    batch_sharding: sharding constraint for the batch (data parallelism under jit).
    post_update: `(params, context) -> params` after each update (e.g. a norm projection).
  """

  def step(state, arrays, perm, i, key, context=None):
    key = jax.random.fold_in(key, state["step"])
    k_batch, k_model = jax.random.split(key)
    images, labels = batch_fn(arrays, perm[i], k_batch)
    if batch_sharding is not None:
      images = jax.lax.with_sharding_constraint(images, batch_sharding)
      labels = jax.lax.with_sharding_constraint(labels, batch_sharding)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (model_state, metrics)), grads = grad_fn(state["params"], state["model_state"], images,
                                                 labels, k_model, context)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if post_update is not None:
      params = post_update(params, context)
    new_state = {"step": state["step"] + 1, "params": params, "model_state": model_state,
                 "opt_state": opt_state}
    return new_state, metrics

  return step
