"""Label-consistent (clean-label, PGD) poisoning (Turner, Tsipras & Madry, arXiv 1912.02771).

A clean-label attack keeps the labels of the target-class images it triggers, so the model can
classify them by their natural features and has little reason to learn the trigger. Turner et al.
first make those images hard to classify: an L-inf PGD perturbation of each one, against a
surrogate model, raises its loss on its own (true) label; the trigger goes on top, and the model
leans on the trigger to fit them. Pick your Poison evaluates this "clean-label (PGD)" attack.

Here the surrogate is the run's clean model (`standard.train_clean`, trained first; Turner et al.
use an adversarially trained one, whose perturbations carry more meaning and transfer better).
With `poison.adversarial.eps` > 0 and `poison.label_mode=clean_label`, the standard experiment
replaces the poisoned rows of the training set by their perturbed versions (uint8, at most `eps`
grey levels from the original in every pixel) before it trains the backdoored model, which
then gets the trigger on those rows as usual. PGD (Madry et al.) starts at the image, takes
`steps` signed-gradient steps of `step_size` on the summed cross-entropy of the surrogate in
eval mode, and projects onto the eps-ball and [0, 1] after each; the defaults are Madry et al.'s
CIFAR-10 attack (eps 8/255, step 2/255, 10 steps; Turner et al. report eps 8/255 and 16/255).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxbd import config as config_lib
from jaxbd.data.pipeline import to_unit


def default_config() -> ml_collections.ConfigDict:
  """The `poison.adversarial` section (in grey levels of 0..255; eps 0: no perturbation)."""
  return ml_collections.ConfigDict(dict(
      eps=0.0,  # L-inf radius in grey levels (8 = 8/255); 0: plain clean-label poisoning
      step_size=2.0,  # PGD step in grey levels
      steps=10,  # PGD steps
  ))


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the run perturbs its poisoned rows (`poison.adversarial.eps` > 0)."""
  return config.poison.adversarial.eps > 0


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.adversarial` and, when it is on, what it needs of the rest of the config."""
  config_lib.check_range(config, "poison.adversarial.eps", 0, 255)
  config_lib.check_range(config, "poison.adversarial.step_size", 0, 255, low_open=True)
  config_lib.check_range(config, "poison.adversarial.steps", 1)
  if not enabled(config):
    return
  need = "poison.adversarial.eps > 0 (label-consistent poisoning) needs"
  config_lib.require(config.poison.name != "none" and config.poison.rate > 0,
                     f"{need} a trigger and poison.rate > 0")
  config_lib.require(config.poison.label_mode == "clean_label",
                     f"{need} poison.label_mode=clean_label, got "
                     f"{config.poison.label_mode!r}")
  config_lib.require_clean_model(config, need, "the surrogate")
  config_lib.require(config.attack.name == "none",
                     f"{need} attack.name='none', got {config.attack.name!r}")


def pgd(model, variables: Any, images: jax.Array, labels: jax.Array, *, eps: float,
        step_size: float, steps: int) -> jax.Array:
  """L-inf PGD away from the true labels, from the images themselves.

  Args:
    model: the surrogate classifier (applied in eval mode).
    variables: its variables.
    images: f32[B, H, W, C] in [0, 1].
    labels: int[B] true labels.
    eps: radius in [0, 1] units.
    step_size: step in [0, 1] units.
    steps: number of steps.

  Returns:
    f32[B, H, W, C] in [0, 1], within eps of `images` in every pixel.
  """
  def loss(x):
    logits = model.apply(variables, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  def step(_, x):
    x = x + step_size * jnp.sign(jax.grad(loss)(x))
    return jnp.clip(jnp.clip(x, images - eps, images + eps), 0.0, 1.0)

  return jax.lax.fori_loop(0, steps, step, images)


def to_levels(perturbed: jax.Array, original: np.ndarray, eps: float) -> np.ndarray:
  """uint8[N, H, W, C] images of f32[N, H, W, C] `perturbed` in [0, 1], rounded and kept within
  `eps` grey levels of uint8[N, H, W, C] `original` (rounding could add half a level)."""
  levels = np.rint(np.asarray(perturbed, np.float64) * 255.0)
  base = original.astype(np.float64)
  return np.clip(levels, base - np.floor(eps), base + np.floor(eps)).clip(0, 255).astype(np.uint8)


def perturb(model, variables: Any, images: np.ndarray, labels: np.ndarray,
            config: ml_collections.ConfigDict, batch_size: int, place=lambda x: x) -> np.ndarray:
  """The rows of uint8[M, H, W, C] `images` perturbed by `pgd` (section `poison.adversarial`), in
  jitted batches of `batch_size` (the last one padded), as uint8[M, H, W, C].

  `place` puts each host batch where the variables live (e.g. replicated on a mesh).
  """
  from jaxbd.train.evaluate import padded_batches  # pylint: disable=g-import-not-at-top
  run = jax.jit(lambda v, x, y: pgd(model, v, x, y, eps=config.eps / 255.0,
                                    step_size=config.step_size / 255.0, steps=config.steps))
  out = np.empty_like(images)
  batches = zip(padded_batches(images, batch_size),
                padded_batches(np.asarray(labels, np.int32), batch_size))
  for (start, chunk, valid), (_, y, _) in batches:
    x = run(variables, place(to_unit(chunk)), place(y))
    out[start:start + valid] = to_levels(x[:valid], chunk[:valid], config.eps)
  return out
