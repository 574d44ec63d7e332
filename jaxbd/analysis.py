"""Where a backdoor lives: linear probes on a model's penultimate features.

A repair that learns from clean data only can remove a backdoor only where clean data exercise it.
Fine-tuning and Pivotal Tuning are such repairs; so is re-learning the classifier head. One test
of this: freeze the suspect model's features and fit a fresh linear classifier on the defender's
trusted clean images. This is multinomial logistic regression on the penultimate features
(scikit-learn, L2 strength `1 / c`). Then apply it to the triggered test images.

- **The probe still sends them to the target.** The trigger moves the features along a direction
  the clean classes already use. Re-learning the head from clean data cannot remove that, so a
  defense has to change the features themselves, or, as D3 does, push the head away from its old
  solution.
- **The probe does not.** The backdoor sits in the head's weights for features that clean images
  leave silent.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import numpy as np

from jaxbd import metrics, models
from jaxbd.data.pipeline import to_unit
from jaxbd.train.evaluate import batch_key, padded_batches, test_targets


@functools.partial(jax.jit, static_argnums=0)
def _features(model, variables: dict, images: jax.Array, transform: Optional[Any],
              start: int) -> jax.Array:
  x = to_unit(images)
  if transform is not None:
    x = transform(x, batch_key(start))
  return models.features(model, variables, x)[1]


def penultimate_features(model, variables: dict, images: np.ndarray,
                         transform: Optional[Any] = None, batch_size: int = 500) -> np.ndarray:
  """Eval-mode penultimate features f32[M, D] of uint8[M, H, W, C] images.

  `transform` (e.g. a trigger, `(x f32[B, H, W, C] in [0, 1], key) -> x`) is applied to the
  images first, with the keys `jaxbd.train.Predictor` gives it; it is a jit argument, so another
  trigger of the same type does not recompile.
  """
  out = [np.asarray(_features(model, variables, chunk, transform, start))[:valid]
         for start, chunk, valid in padded_batches(images, batch_size)]
  return np.concatenate(out)


def linear_probe(model, variables: dict, train_images: np.ndarray, train_labels: np.ndarray,
                 x_test: np.ndarray, y_test: np.ndarray, trigger: Any, *, target: int,
                 label_mode: str, num_classes: int, c: float = 1.0) -> dict[str, float]:
  """ACC and ASR of a linear head fitted on the frozen features of clean training images.

  Args:
    model: the suspect classifier.
    variables: its variables.
    train_images: uint8[N, H, W, C] clean images to fit the head on (the trusted set).
    train_labels: int[N] their labels.
    x_test: uint8[M, H, W, C] test images.
    y_test: int[M] their labels.
    trigger: the attack's trigger.
    target: target class.
    label_mode: all2one | all2all | clean_label.
    num_classes: K.
    c: inverse L2 strength of the logistic regression.

  Returns:
    {"acc": clean test accuracy, "asr": ASR on triggered non-target test images} of the probe.
  """
  # Imported here: scikit-learn takes a second to import, which every CLI start would pay.
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  head = LogisticRegression(C=c, max_iter=5000)
  head.fit(penultimate_features(model, variables, train_images), np.asarray(train_labels))
  wanted = test_targets(y_test, label_mode, target, num_classes)
  keep = metrics.non_target_mask(y_test, wanted)
  triggered = head.predict(penultimate_features(model, variables, x_test[keep], trigger))
  return {"acc": metrics.accuracy(head.predict(penultimate_features(model, variables, x_test)),
                                  y_test),
          "asr": metrics.attack_success_rate(triggered, np.asarray(y_test)[keep], wanted[keep])}
