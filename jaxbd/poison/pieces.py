"""Triggers made of pieces: Adaptive-Blend, Adaptive-Patch (Qi et al., ICLR 2023) and TSB.

All three apply a set of P pieces, each `x <- x + m_p * (t_p - x)` with a blend mask m_p (the
piece's region times its opacity) and a pattern t_p, and differ only in which pieces a training
image gets:

- Adaptive-Blend ("Revisiting the assumption of latent separability for backdoor defenses"): one
  blended trigger image (a file, or seeded noise) split into a sqrt(P) x sqrt(P) grid of pieces;
  in training each piece is kept with probability `keep_prob` and blended with opacity `alpha`;
  at test time all pieces are blended with `test_alpha`.
- Adaptive-Patch: P small patches at distinct seeded positions with seeded noise patterns, kept
  with probability `keep_prob` in training at opacity `alpha`, all of them at `test_alpha` at test.
- TSB (trigger-scattered backdoor, as Pick-your-Poison evaluates it): P noise marks at distinct
  seeded positions; every poisoned training image carries exactly one of them, chosen at random;
  test images carry all of them.

The adaptive attacks add regularization ("cover") samples: training images that get the partial
trigger but keep their label, so that the latent representations of poisoned and clean samples do
not separate. `conservatism` is the fraction of triggered training images that are such cover
samples (Pick-your-Poison: 0.5, i.e. as many cover as payload samples); the poison plan draws
`conservatism / (1 - conservatism)` cover rows per poisoned row. `sampling="independent"` (the
default, following Pick-your-Poison) keeps each piece independently, so a fraction
(1 - keep_prob)^P of the poisoned rows (6% at P = 4, keep_prob 0.5) carries no piece at all and
is relabeled all the same; `sampling="fixed"` keeps exactly round(keep_prob * P) pieces (at least
one), drawn uniformly, as Qi et al.'s code masks a fixed number of pieces per image. With a
poison plan a row's pieces are drawn once for the whole run (`jaxbd.poison.poison_fn` with a row
key), as the references build their poisoned training sets before training; an in-loop attack
(`attack.name=batch`) draws them at every step.
No image ships with jaxbd: patterns are seeded noise unless a file is given.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd.errors import ConfigError
from jaxbd.poison import triggers

INDEPENDENT, FIXED, ONE = "independent", "fixed", "one"
SAMPLINGS = (INDEPENDENT, FIXED)  # the adaptive attacks' choices (TSB: ONE)


@flax.struct.dataclass
class PiecewiseTrigger:
  """Blends P pieces; training images get a random subset, test images all of them.

  Attributes:
    masks: f32[P, H, W, 1] training blend weight of each piece (region * alpha).
    test_masks: f32[P, H, W, 1] test-time blend weight of each piece.
    patterns: f32[P, H, W, C] in [0, 1].
    sampling: "independent" (each piece kept w.p. keep_prob), "fixed" (round(keep_prob * P)
      pieces, at least one, drawn uniformly) or "one" (exactly one piece).
    keep_prob: keep probability of a piece ("independent"), or the share kept ("fixed").
    cover_ratio: cover rows per poisoned row in the poison plan.
  """

  masks: jax.Array
  test_masks: jax.Array
  patterns: jax.Array
  sampling: str = flax.struct.field(pytree_node=False, default=INDEPENDENT)
  keep_prob: float = flax.struct.field(pytree_node=False, default=1.0)
  cover_ratio: float = flax.struct.field(pytree_node=False, default=0.0)

  @property
  def num_pieces(self) -> int:
    """Number of trigger pieces."""
    return self.masks.shape[0]

  def keep(self, key: jax.Array, batch: int) -> jax.Array:
    """f32[B, P]: 1 where a training image gets a piece."""
    if self.sampling == ONE:
      choice = jax.random.randint(key, (batch,), 0, self.num_pieces)
      return jax.nn.one_hot(choice, self.num_pieces, dtype=jnp.float32)
    if self.sampling == FIXED:
      count = max(1, round(self.keep_prob * self.num_pieces))
      ranks = jnp.argsort(jax.random.uniform(key, (batch, self.num_pieces)), axis=1).argsort(1)
      return (ranks < count).astype(jnp.float32)
    return jax.random.bernoulli(key, self.keep_prob, (batch, self.num_pieces)).astype(jnp.float32)

  def apply(self, images: jax.Array, keep: jax.Array, masks: jax.Array) -> jax.Array:
    """Blends the kept pieces in order.  images: f32[B, H, W, C]; keep: f32[B, P] in {0, 1}."""
    for p in range(self.num_pieces):
      m = keep[:, p, None, None, None] * masks[p]
      images = images + m * (self.patterns[p] - images)
    return images

  def __call__(self, images: jax.Array, key: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """images: f32[B, H, W, C] in [0, 1] -> triggered images (random pieces when `train`)."""
    if not train:
      return self.apply(images, jnp.ones((images.shape[0], self.num_pieces)), self.test_masks)
    if key is None:
      raise ValueError("a piecewise trigger draws its pieces in training: pass a PRNG key")
    return self.apply(images, self.keep(key, images.shape[0]), self.masks)

  def cover(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """f32[B, H, W, C] cover rows: each of `images` gets a random subset of pieces, like the
    poisoned training rows (labels kept)."""
    return self(images, key, train=True)


def grid_regions(image_shape: tuple[int, int, int], pieces: int) -> np.ndarray:
  """f32[P, H, W, 1]: a sqrt(P) x sqrt(P) tiling of the image (the last row/column of tiles
  extends to the border).

  Raises:
    ConfigError: P is not a square number or has more tiles per side than pixels.
  """
  h, w, _ = image_shape
  side = int(round(np.sqrt(pieces)))
  if side * side != pieces or side > min(h, w):
    raise ConfigError(f"{pieces} pieces do not tile a {h}x{w} image as a square grid")
  rows = np.minimum(np.arange(h) * side // h, side - 1)
  cols = np.minimum(np.arange(w) * side // w, side - 1)
  tile = rows[:, None] * side + cols[None, :]
  return (tile[None] == np.arange(pieces)[:, None, None])[..., None].astype(np.float32)


def scattered_regions(image_shape: tuple[int, int, int], count: int, size: int,
                      seed: int) -> np.ndarray:
  """f32[P, H, W, 1]: `count` non-overlapping size x size squares at seeded random grid cells.

  Raises:
    ConfigError: the image has fewer than `count` cells of that size.
  """
  h, w, _ = image_shape
  cells_r, cells_c = h // size, w // size
  if count > cells_r * cells_c:
    raise ConfigError(f"{count} marks of {size}x{size} pixels do not fit a {h}x{w} image")
  cells = np.random.default_rng([seed, 1]).choice(cells_r * cells_c, count, replace=False)
  out = np.zeros((count, h, w, 1), np.float32)
  for p, cell in enumerate(cells):
    r, c = (cell // cells_c) * size, (cell % cells_c) * size
    out[p, r:r + size, c:c + size] = 1.0
  return out


def noise_patterns(image_shape: tuple[int, int, int], count: int, seed: int) -> np.ndarray:
  """f32[P, H, W, C]: an independent seeded uniform-noise image per piece (piece p from the seed
  sequence (seed, 2, p), which no other run's seed reaches)."""
  return np.stack([triggers.patch_pattern(image_shape, "noise", 0, (seed, 2, p))
                   for p in range(count)])


def cover_ratio(conservatism: float) -> float:
  """Cover rows per poisoned row when `conservatism` of the triggered rows keep their label."""
  return conservatism / (1.0 - conservatism)


# Adaptive-Blend ------------------------------------------------------------------------------


def adaptive_blend_config() -> ml_collections.ConfigDict:
  """Adaptive-Blend defaults (Pick-your-Poison: 4 pieces kept w.p. 0.5, conservatism 0.5)."""
  return ml_collections.ConfigDict(dict(
      pieces=4,  # a square number: the trigger is tiled sqrt(pieces) x sqrt(pieces)
      keep_prob=0.5,  # probability a piece is kept on a training image ("fixed": share kept)
      sampling=INDEPENDENT,  # independent: each piece on its own; fixed: a fixed count per image
      alpha=0.15,  # training opacity
      test_alpha=0.2,  # test opacity
      conservatism=0.5,  # fraction of triggered training images that keep their label
      image="",  # trigger image file (resized to the input size); empty: seeded uniform noise
  ))


def adaptive_blend_validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.adaptive_blend` (ConfigError on a bad value)."""
  _check_common(config, "adaptive_blend")


def adaptive_blend(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                   seed: int) -> PiecewiseTrigger:
  """The Adaptive-Blend trigger of section `c` for images of `image_shape` (H, W, C)."""
  regions = grid_regions(image_shape, c.pieces)
  pattern = (triggers.load_trigger_image(c.image, image_shape) if c.image else
             triggers.patch_pattern(image_shape, "noise", 0, seed))
  patterns = np.broadcast_to(pattern, (c.pieces, *image_shape))
  return PiecewiseTrigger(jnp.asarray(regions * c.alpha), jnp.asarray(regions * c.test_alpha),
                          jnp.asarray(patterns), c.sampling, float(c.keep_prob),
                          cover_ratio(c.conservatism))


# Adaptive-Patch ------------------------------------------------------------------------------


def adaptive_patch_config() -> ml_collections.ConfigDict:
  """Adaptive-Patch defaults (Pick-your-Poison: 4 pieces kept w.p. 0.5, conservatism 0.5)."""
  return ml_collections.ConfigDict(dict(
      pieces=4,  # number of patches
      size=4,  # side of each patch in pixels
      keep_prob=0.5,  # probability a patch is applied to a training image ("fixed": share)
      sampling=INDEPENDENT,  # independent: each patch on its own; fixed: a fixed count per image
      alpha=0.5,  # training opacity
      test_alpha=1.0,  # test opacity
      conservatism=0.5,  # fraction of triggered training images that keep their label
  ))


def adaptive_patch_validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.adaptive_patch` (ConfigError on a bad value)."""
  _check_common(config, "adaptive_patch")
  config_lib.check_range(config, "poison.adaptive_patch.size", 1)


def adaptive_patch(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                   seed: int) -> PiecewiseTrigger:
  """The Adaptive-Patch trigger of section `c` for images of `image_shape` (H, W, C)."""
  regions = scattered_regions(image_shape, c.pieces, c.size, seed)
  return PiecewiseTrigger(jnp.asarray(regions * c.alpha), jnp.asarray(regions * c.test_alpha),
                          jnp.asarray(noise_patterns(image_shape, c.pieces, seed)), c.sampling,
                          float(c.keep_prob), cover_ratio(c.conservatism))


# TSB -----------------------------------------------------------------------------------------


def tsb_config() -> ml_collections.ConfigDict:
  """Trigger-scattered backdoor: one of `marks` noise marks per training image, all at test."""
  return ml_collections.ConfigDict(dict(
      marks=4,  # number of marks
      size=4,  # side of each mark in pixels
      alpha=1.0,  # opacity of a mark
  ))


def tsb_validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.tsb` (ConfigError on a bad value)."""
  config_lib.check_range(config, "poison.tsb.marks", 1)
  config_lib.check_range(config, "poison.tsb.size", 1)
  config_lib.check_range(config, "poison.tsb.alpha", 0, 1, low_open=True)


def tsb(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
        seed: int) -> PiecewiseTrigger:
  """The TSB trigger of section `c` for images of `image_shape` (H, W, C)."""
  masks = jnp.asarray(scattered_regions(image_shape, c.marks, c.size, seed) * c.alpha)
  return PiecewiseTrigger(masks, masks, jnp.asarray(noise_patterns(image_shape, c.marks, seed)),
                          ONE)


def _check_common(config: ml_collections.ConfigDict, name: str) -> None:
  config_lib.check_range(config, f"poison.{name}.pieces", 1)
  config_lib.check_range(config, f"poison.{name}.keep_prob", 0, 1, low_open=True)
  config_lib.check_choice(config.poison[name].sampling, f"poison.{name}.sampling", SAMPLINGS)
  config_lib.check_range(config, f"poison.{name}.alpha", 0, 1, low_open=True)
  config_lib.check_range(config, f"poison.{name}.test_alpha", 0, 1, low_open=True)
  config_lib.check_range(config, f"poison.{name}.conservatism", 0, 0.95)
