"""Pivotal Tuning (PT): repair with little clean data (Lukas & Kerschbaum, "Pick your Poison",
arXiv 2305.09671).

The suspect model, frozen, is the pivot theta0. A copy theta is trained on the trusted set
(1% of the training data in the paper) with standard augmentation on

    L = CE(f(x), y) + l_slol * SLOL(z, z0, y) + l_param * mean((theta - theta0)^2),

where z, z0 are the penultimate features of the model (train mode) and of the pivot (eval mode),
and the parameter penalty is the mean over all N parameter elements, so at a fixed l_param each
weight is held in proportion to 1/N: the paper's 20,000 is set for ResNet-18 (11.2M parameters),
and a smaller network wants l_param chosen on held-out data (`python -m jaxbd.select`). Without
labels (`use_labels=False`) the cross-entropy becomes distillation from the pivot at temperature
1, `-mean_i sum_k softmax(f0(x_i))_k log(softmax(f(x_i))_k + 1e-7)`, and SLOL groups the images
by the pivot's predicted class (the reference reads dataset labels there).

SLOL (soft latent orthogonality loss) on the per-class centroids mu_k of z and mu0_k of z0 over
the classes present in the batch (M = their stack, K' of them):
- term 1: `||C - diag(C)||_F` with `C = M^T M / K'`. The reference code subtracts
  `torch.diag(C)`, a vector, which broadcasts as `C[i, j] - C[j, j]`; that is the default
  (`slol_diagonal="reference"`); `"zero"` removes only the diagonal.
- term 2: `1/2 sum_{i != j} cos(mu_i - mu_j, mu0_i - mu0_j)`, computed from K' x K' Gram
  matrices (no K' x K' x D tensor).

Defaults (the paper's): SGD with Nesterov momentum 0.9, lr 1e-4, no weight decay, 2,000 steps,
batch 128, l_slol 0.05, l_param 20,000.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxbd import config as config_lib
from jaxbd import models
from jaxbd import train as train_lib
from jaxbd.defenses import base, fine_tuning

DIAGONALS = ("reference", "zero")


def default_config() -> ml_collections.ConfigDict:
  """The `defense.pt` section with the paper's defaults (see the module docstring)."""
  section = base.train_section(epochs=0, batch_size=128, lr=1e-4, momentum=0.9, nesterov=True,
                               weight_decay=0.0, schedule="constant", eval_every=0,
                               checkpoint_every=100)
  section.steps = 2000  # optimizer steps: epochs over the trusted set, the last one cut short
  section.slol = 0.05  # weight of SLOL
  section.param = 20000.0  # weight of the parameter penalty
  section.use_labels = True  # False: distill from the pivot instead of cross-entropy on labels
  section.slol_diagonal = "reference"  # reference | zero (see the module docstring)
  return section


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `defense.pt` (ConfigError on a bad value)."""
  config_lib.check_train_section(config, "defense.pt", min_epochs=0)
  config_lib.require(config.defense.pt.epochs == 0,
                     "config key 'defense.pt.epochs' must be 0: Pivotal Tuning runs "
                     f"defense.pt.steps ({config.defense.pt.steps}) steps, got "
                     f"{config.defense.pt.epochs}")
  config_lib.check_range(config, "defense.pt.steps", 1, config_lib.MAX_STEPS)
  config_lib.check_range(config, "defense.pt.slol", 0)
  config_lib.check_range(config, "defense.pt.param", 0)
  config_lib.check_choice(config.defense.pt.slol_diagonal, "defense.pt.slol_diagonal",
                          DIAGONALS)


def _cosine_matrix(dot, sq_a, sq_b) -> jax.Array:
  """cos(a_i - a_j, b_i - b_j) for all pairs, from Gram matrices.

  Args:
    dot: f32[K, K] with dot[i, j] = <a_i, b_j>.
    sq_a: f32[K, K] with <a_i, a_j>; sq_b likewise for b.
  """
  num = jnp.diag(dot)[:, None] - dot - dot.T + jnp.diag(dot)[None, :]
  # Floored before the square root so that the (masked) diagonal has a finite gradient.
  norm = lambda g: jnp.sqrt(jnp.maximum(jnp.diag(g)[:, None] + jnp.diag(g)[None, :] - 2 * g,
                                        1e-12))
  return num / jnp.maximum(norm(sq_a) * norm(sq_b), 1e-8)


def slol(z: jax.Array, z0: jax.Array, labels: jax.Array, num_classes: int,
         diagonal: str = "reference") -> jax.Array:
  """Soft latent orthogonality loss (see the module docstring).

  Args:
    z: f32[B, D] features of the tuned model.
    z0: f32[B, D] features of the pivot.
    labels: int32[B] class of each row.
    num_classes: K; classes absent from the batch are left out.
    diagonal: "reference" or "zero".
  """
  onehot = jax.nn.one_hot(labels, num_classes, dtype=z.dtype)
  counts = onehot.sum(0)
  present = counts > 0
  mu = onehot.T @ z / jnp.maximum(counts, 1)[:, None]
  mu0 = onehot.T @ z0 / jnp.maximum(counts, 1)[:, None]
  cov = mu.T @ mu / jnp.sum(present)
  if diagonal == "reference":
    off = cov - jnp.diag(cov)[None, :]
  else:
    off = cov - jnp.diag(jnp.diag(cov))
  term1 = jnp.sqrt(jnp.sum(jnp.square(off)) + 1e-12)
  cos = _cosine_matrix(mu @ mu0.T, mu @ mu.T, mu0 @ mu0.T)
  pairs = present[:, None] & present[None, :] & ~jnp.eye(num_classes, dtype=bool)
  return term1 + jnp.sum(jnp.where(pairs, cos, 0.0)) / 2


def distillation(logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Scalar cross-entropy of f32[B, K] logits from the teacher's f32[B, K] softmax at temperature 1
  (the reference's form)."""
  p_teacher = jax.nn.softmax(teacher_logits)
  return -jnp.mean(jnp.sum(p_teacher * jnp.log(jax.nn.softmax(logits) + 1e-7), -1))


def parameter_penalty(params, pivot_params) -> jax.Array:
  """f32[] mean((theta - theta0)^2) over every parameter element of two pytrees of the same
  structure and leaf shapes."""
  sq = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), params, pivot_params)
  count = sum(x.size for x in jax.tree.leaves(params))
  return sum(jax.tree.leaves(sq)) / count


def pt_loss(model, c: ml_collections.ConfigDict, num_classes: int) -> train_lib.step.LossFn:
  """The Pivotal Tuning loss; `context` is the pivot's variables."""

  def loss_fn(params, model_state, images, labels, key, context):
    logits0, z0 = models.features(model, context, images)
    logits0, z0 = jax.lax.stop_gradient((logits0, z0))
    out = train_lib.forward(model, params, model_state, images, key, with_features=True)
    logits, z = out.logits, out.features
    if c.use_labels:
      task = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      groups = labels
    else:
      task, groups = distillation(logits, logits0), jnp.argmax(logits0, -1)
    latent = slol(z, z0, groups, num_classes, c.slol_diagonal)
    penalty = parameter_penalty(params, context["params"])
    loss = task + c.slol * latent + c.param * penalty
    metrics = {"loss": loss, "task": task, "slol": latent, "param": penalty,
               "train_acc": train_lib.step.batch_accuracy(logits, labels)}
    return train_lib.step.plus_aux(loss, out, metrics), (out.model_state, metrics)

  return loss_fn


def pivotal_tuning(ctx: base.Context, variables: dict, trusted: base.Trusted,
                   config: ml_collections.ConfigDict, key: jax.Array) -> tuple[dict, dict]:
  """Repairs `variables` by Pivotal Tuning on the trusted data (see the module docstring)."""
  steps_per_epoch = -(-len(trusted.labels) // config.batch_size)
  section = ml_collections.ConfigDict(config.to_dict())
  section.epochs = -(-config.steps // steps_per_epoch)
  repaired, report = fine_tuning.fine_tune(
      ctx, variables, trusted, section, key, phase="pt",
      loss_fn=pt_loss(ctx.model, config, ctx.num_classes), context=variables,
      max_steps=config.steps)
  return repaired, {**report, "use_labels": config.use_labels}
