"""Batched, jitted evaluation on device: predictions, ACC, ASR and RA of a model.

`Predictor` jits `argmax(model(transform(images)))` once per model and input shape, pads the last
batch, and splits batches over the mesh's devices; a random transform (BadPatches' random
positions) draws each batch from its own key, `batch_key(start)`. `backdoor_metrics` evaluates a
model on the clean test set and on the triggered non-target test set (BackdoorBench's
`bd_test`).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbd import metrics
from jaxbd.data.pipeline import to_unit
from jaxbd.poison.plan import poisoned_label
from jaxbd.train import mesh as mesh_lib


class Predictor:
  """Predicted labels of a model on uint8 images, in jitted batches.

  With a `batch_sharding`, each batch is placed on the mesh (also across processes) and split
  over its devices, and the predictions come back replicated so every process can read them.
  """

  def __init__(self, model, batch_size: int = 500, batch_sharding=None):
    """model: a classifier; batch_sharding: optional NamedSharding of the batch axis."""
    self.batch_size = batch_size
    self._mesh = None if batch_sharding is None else batch_sharding.mesh

    def predict(variables, images, transform, start):
      x = to_unit(images)
      if transform is not None:
        x = transform(x, batch_key(start))
      if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
      return jnp.argmax(model.apply(variables, x, train=False), axis=-1)

    self._predict = jax.jit(predict, out_shardings=None if self._mesh is None else
                            mesh_lib.replicated(self._mesh))

  def _place(self, chunk: np.ndarray):
    return chunk if self._mesh is None else mesh_lib.put_replicated(chunk, self._mesh)

  def __call__(self, variables, images: np.ndarray, transform: Optional[Any] = None) -> np.ndarray:
    """Predictions int[M] for uint8[M, H, W, C] images, optionally transformed (e.g. a trigger).

    `transform` is a callable pytree such as a trigger (`transform(x f32[B, H, W, C], key) -> x`,
    the key `batch_key` of the batch's first row), passed to jit as an argument, so a new
    trigger of the same type does not recompile.
    """
    throttle = mesh_lib.Throttle()
    out = [throttle(self._predict(variables, self._place(chunk), transform, start))
           for start, chunk, _ in padded_batches(images, self.batch_size)]
    return (np.concatenate([np.asarray(o) for o in out])[:len(images)] if out else
            np.zeros(0, np.int32))


def batch_key(start) -> jax.Array:
  """The PRNG key of a random transform on the evaluation batch whose first row is `start` (an
  int, traced or not): batches draw independently of each other, and the same in every run."""
  return jax.random.fold_in(jax.random.key(0), start)


def padded_batches(images: np.ndarray,
                   batch_size: int) -> Iterator[tuple[int, np.ndarray, int]]:
  """Splits images into whole batches, so that a jitted function compiles one shape.

  Yields:
    (the batch's first row, chunk [batch_size, ...] whose last batch is padded by repeating its
    last image, the number of real rows in it).
  """
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size])
    valid = len(chunk)
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, 0)])
    yield start, chunk, valid


def test_targets(y_test: np.ndarray, label_mode: str, target: int, num_classes: int):
  """int[M]: the label the attack wants for each of the int[M] `y_test` (clean-label attacks aim
  at `target`)."""
  mode = "all2one" if label_mode == "clean_label" else label_mode
  return poisoned_label(np.asarray(y_test), mode, target, num_classes)


def backdoor_metrics(predict: Predictor, variables, x_test: np.ndarray, y_test: np.ndarray,
                     trigger: Optional[Any], *, target: int, label_mode: str,
                     num_classes: int) -> dict[str, float]:
  """ACC on clean test images; ASR and RA on triggered non-target test images.

  Args:
    predict: a Predictor of the model.
    variables: the model's variables.
    x_test: uint8[M, H, W, C].
    y_test: int[M].
    trigger: the attack's trigger (None: ACC only).
    target: target class.
    label_mode: all2one | all2all | clean_label.
    num_classes: K.
  """
  out = {"acc": metrics.accuracy(predict(variables, x_test), y_test)}
  if trigger is not None:
    wanted = test_targets(y_test, label_mode, target, num_classes)
    keep = metrics.non_target_mask(y_test, wanted)
    pred = predict(variables, x_test[keep], trigger)
    y, wanted = np.asarray(y_test)[keep], wanted[keep]
    out["asr"] = metrics.attack_success_rate(pred, y, wanted)
    out["ra"] = metrics.robust_accuracy(pred, y, wanted)
  return out
