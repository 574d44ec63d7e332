"""Triggers as pure, vectorized `jnp` transforms of image batches.

A trigger is a `flax.struct` dataclass (a pytree, so it can be closed over or passed into `jit`)
with `__call__(images, key, train) -> images` on f32[B, H, W, C] batches in [0, 1], and
`cover(images, key) -> images`, the transform some attacks apply to extra training rows whose
labels they keep (WaNet's noise mode, Adaptive attacks' regularization samples; identity here).
`train` lets an attack differ between training and test time (e.g. Adaptive-Patch keeps random
pieces in training, all of them at test). A trigger draws its random choices from `key`;
`jaxbd.poison.poison_fn` decides whether a training row keeps them for the whole run.

`MaskTrigger` is the common form `x * (1 - mask) + mask * pattern`: BadNets (binary mask), Blended
(mask = alpha), grid-aligned patches. Builders check that the trigger fits the image and raise
`ConfigError` otherwise.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd.data import sources
from jaxbd.errors import ConfigError, DataError


CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
PATTERNS = ("solid", "checkerboard", "noise")


class NoCover:
  """Mixin of triggers without a cover transform: cover rows stay as they are."""

  def cover(self, images: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
    """images: f32[B, H, W, C] -> the same images."""
    del key
    return images


@flax.struct.dataclass
class MaskTrigger(NoCover):
  """Pastes `pattern` where `mask` is 1 and blends where it is fractional.

  Attributes:
    mask: f32[H, W, 1] or f32[H, W, C] in [0, 1].
    pattern: f32[H, W, C] in [0, 1].
  """

  mask: jax.Array
  pattern: jax.Array

  def __call__(self, images: jax.Array, key: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """images: f32[B, H, W, C] in [0, 1] -> the triggered images, same shape."""
    del key, train
    return images * (1.0 - self.mask) + self.mask * self.pattern


def square_position(image_shape: tuple[int, int, int], size: int, row: int, col: int,
                    corner: str, margin: int) -> tuple[int, int]:
  """Top-left pixel of a size x size square: (row, col) if given (>= 0), else at `corner`.

  Raises:
    ConfigError: the square does not fit the image.
  """
  h, w = image_shape[:2]
  if row < 0:
    row = margin if corner.startswith("top") else h - size - margin
  if col < 0:
    col = margin if corner.endswith("left") else w - size - margin
  if size > min(h, w) or row < 0 or col < 0 or row + size > h or col + size > w:
    raise ConfigError(f"a {size}x{size} trigger at row {row}, col {col} does not fit a {h}x{w} "
                      "image")
  return row, col


def patch_pattern(shape: tuple[int, int, int], kind: str, value: int,
                  seed: int | tuple[int, ...]) -> np.ndarray:
  """A trigger pattern f32[h, w, c] in [0, 1].

  Args:
    shape: (h, w, c) of the patch.
    kind: "solid" (every pixel `value`), "checkerboard" (`value` where (i + j) is even, else
      255 - value) or "noise" (uniform uint8 noise from `seed`).
    value: uint8 intensity for solid/checkerboard.
    seed: seed (or seed sequence) of the noise pattern.
  """
  h, w, c = shape
  if kind == "solid":
    pat = np.full(shape, value, np.float32)
  elif kind == "checkerboard":
    even = (np.add.outer(np.arange(h), np.arange(w)) % 2 == 0)[..., None]
    pat = np.where(even, value, 255 - value) * np.ones((1, 1, c), np.float32)
  elif kind == "noise":
    pat = np.random.default_rng(seed).integers(0, 256, shape).astype(np.float32)
  else:
    raise ConfigError(f"unknown trigger pattern {kind!r}; expected one of {PATTERNS}")
  return pat / 255.0


# BadNets ------------------------------------------------------------------------------------


def badnets_config() -> ml_collections.ConfigDict:
  """BadNets (Gu et al. 2017): a square patch; BackdoorBench: 3x3 white at the bottom right."""
  return ml_collections.ConfigDict(dict(
      size=3,  # side in pixels
      row=-1,  # top-left pixel; -1: placed at `corner`
      col=-1,
      corner="bottom_right",  # top_left | top_right | bottom_left | bottom_right
      margin=0,  # pixels between the patch and the corner
      value=255,  # uint8 intensity (solid, checkerboard)
      pattern="solid",  # solid | checkerboard | noise
  ))


def badnets_validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.badnets` (ConfigError on a bad value)."""
  c = config.poison.badnets
  config_lib.check_range(config, "poison.badnets.size", 1)
  config_lib.check_range(config, "poison.badnets.value", 0, 255)
  config_lib.check_range(config, "poison.badnets.margin", 0)
  config_lib.check_range(config, "poison.badnets.row", -1)
  config_lib.check_range(config, "poison.badnets.col", -1)
  config_lib.check_choice(c.corner, "poison.badnets.corner", CORNERS)
  config_lib.check_choice(c.pattern, "poison.badnets.pattern", PATTERNS)


def badnets(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
            seed: int) -> MaskTrigger:
  """Builds the BadNets patch trigger for images of `image_shape` (H, W, C)."""
  h, w, ch = image_shape
  row, col = square_position(image_shape, c.size, c.row, c.col, c.corner, c.margin)
  mask = np.zeros((h, w, 1), np.float32)
  mask[row:row + c.size, col:col + c.size] = 1.0
  pattern = np.zeros((h, w, ch), np.float32)
  pattern[row:row + c.size, col:col + c.size] = patch_pattern((c.size, c.size, ch), c.pattern,
                                                              c.value, seed)
  return MaskTrigger(jnp.asarray(mask), jnp.asarray(pattern))


# Blended -------------------------------------------------------------------------------------


def blended_config() -> ml_collections.ConfigDict:
  """Blended (Chen et al. 2017): x' = (1 - alpha) x + alpha t over the whole image."""
  return ml_collections.ConfigDict(dict(
      alpha=0.2,  # blend ratio, train and test (BackdoorBench: 0.2)
      image="",  # trigger image file (resized to the input size); empty: seeded uniform noise
  ))


def blended_validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.blended` (ConfigError on a bad value)."""
  config_lib.check_range(config, "poison.blended.alpha", 0, 1, low_open=True)


def read_trigger_image(path: str) -> np.ndarray:
  """The 8-bit image file at `path` as uint8[H, W] or uint8[H, W, 3], as the sources read images.

  Raises:
    DataError: the file is missing, or not an image the dataset sources read.
  """
  name = f"trigger image {path!r}"
  try:
    with open(path, "rb") as f:
      blob = f.read()
  except OSError as e:
    raise DataError(f"{name} is unreadable ({e.strerror})") from None
  return sources.decode_image(name, blob)


def load_trigger_image(path: str, image_shape: tuple[int, int, int]) -> np.ndarray:
  """Reads an 8-bit image file as f32[H, W, C] in [0, 1], resized (bilinear) to `image_shape`.

  Raises:
    DataError: the file is missing, or not an image the dataset sources read.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = image_shape
  im = Image.fromarray(read_trigger_image(path))
  im = im.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
  return (np.asarray(im, np.float32) / 255.0).reshape(h, w, c)


def blended(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
            seed: int) -> MaskTrigger:
  """Builds the Blended trigger: the image (or seeded noise) blended in with weight alpha."""
  h, w, _ = image_shape
  pattern = (load_trigger_image(c.image, image_shape) if c.image else
             patch_pattern(image_shape, "noise", 0, seed))
  return MaskTrigger(jnp.full((h, w, 1), c.alpha, jnp.float32), jnp.asarray(pattern))
