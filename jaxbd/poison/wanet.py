"""WaNet: warping-based backdoor (Nguyen & Tran, ICLR 2021), as BackdoorBench implements it.

The trigger is a fixed, smooth warp of the image. A k x k field of random offsets in [-1, 1],
scaled so that its mean magnitude is 1, is upsampled to the image size with bicubic interpolation
(corners aligned); the sampling grid is `clip((identity + s * noise / H) * grid_rescale, -1, 1)`
in normalized coordinates, and the warped image is a bilinear resampling of the input on that
grid (`torch.nn.functional.grid_sample(..., align_corners=True)`). The same warp is applied in
training and at test time.

Noise mode: `cross_ratio` extra training images per poisoned image (the plan's cover rows, labels
kept) are warped with the grid plus independent per-pixel noise U(-1, 1) / H, so the model learns
that only the exact warp means the target class.

Every grid stays inside [-1, 1], so sampling never reads outside the image. At s = 0 (and
grid_rescale = 1) the warp is the identity.

Which images are warped: with the poison plan, as for every trigger, a fixed set of
`int(rate * N)` non-target rows (and `cross_ratio` times as many cover rows), drawn once and
saved with the run; `attack.name=batch` (jaxbd.attacks.batch) warps a share of every batch
instead, as BackdoorBench's WaNet training loop does.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import config as config_lib


def cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Weights of the 4 taps at offsets -1, 0, 1, 2 of cubic convolution (PyTorch's a = -0.75).

  Args:
    t: f64[...] fractional positions in [0, 1).

  Returns:
    f64[..., 4].
  """
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """f64[out_size, in_size]: 1-D bicubic upsampling with aligned corners, border taps clamped.

  `A @ x` equals `torch.nn.functional.interpolate(x, out_size, mode="bicubic",
  align_corners=True)` along one axis.
  """
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  src = np.arange(out_size) * scale
  base = np.floor(src).astype(np.int64)
  weights = cubic_weights(src - base)
  out = np.zeros((out_size, in_size))
  for tap in range(4):
    idx = np.clip(base - 1 + tap, 0, in_size - 1)
    np.add.at(out, (np.arange(out_size), idx), weights[:, tap])
  return out


def identity_grid(h: int, w: int) -> np.ndarray:
  """f32[H, W, 2]: normalized (x, y) coordinates in [-1, 1] of every pixel (corners aligned)."""
  ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
  return np.stack([xs, ys], -1).astype(np.float32)


def warp_grid(image_shape: tuple[int, int, int], k: int, s: float, grid_rescale: float,
              seed: int) -> np.ndarray:
  """The WaNet sampling grid f32[H, W, 2] (x, y in [-1, 1]) from a seeded k x k noise field."""
  h, w, _ = image_shape
  ins = np.random.default_rng(seed).uniform(-1.0, 1.0, (2, k, k))
  ins = ins / np.mean(np.abs(ins))
  noise = np.einsum("hk,ckl,wl->hwc", bicubic_matrix(k, h), ins, bicubic_matrix(k, w))
  grid = (identity_grid(h, w) + s * noise / h) * grid_rescale
  return np.clip(grid, -1.0, 1.0).astype(np.float32)


def grid_sample(images: jax.Array, grid: jax.Array) -> jax.Array:
  """Bilinear resampling at normalized coordinates (torch `grid_sample`, align_corners=True).

  Args:
    images: f32[B, H, W, C].
    grid: f32[B or 1, H, W, 2] (x, y) in [-1, 1]; values outside are clamped to the border.

  Returns:
    f32[B, H, W, C].
  """
  _, h, w, _ = images.shape
  grid = jnp.broadcast_to(grid, (images.shape[0], h, w, 2))
  x = (jnp.clip(grid[..., 0], -1, 1) + 1) * 0.5 * (w - 1)
  y = (jnp.clip(grid[..., 1], -1, 1) + 1) * 0.5 * (h - 1)
  x0 = jnp.clip(jnp.floor(x), 0, w - 1).astype(jnp.int32)
  y0 = jnp.clip(jnp.floor(y), 0, h - 1).astype(jnp.int32)
  x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]

  def sample(image, yy0, xx0, yy1, xx1, ax, ay):
    top = image[yy0, xx0] * (1 - ax) + image[yy0, xx1] * ax
    bottom = image[yy1, xx0] * (1 - ax) + image[yy1, xx1] * ax
    return top * (1 - ay) + bottom * ay

  return jax.vmap(sample)(images, y0, x0, y1, x1, wx, wy)


@flax.struct.dataclass
class WarpTrigger:
  """WaNet's warp; `cover` is the noise mode (the warp grid plus per-image random noise).

  Attributes:
    grid: f32[H, W, 2] sampling grid in [-1, 1].
    cover_ratio: cover (noise-mode) rows per poisoned row (WaNet's cross ratio).
  """

  grid: jax.Array
  cover_ratio: float = flax.struct.field(pytree_node=False, default=0.0)

  def __call__(self, images: jax.Array, key: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """images: f32[B, H, W, C] in [0, 1] -> warped images."""
    del key, train
    return grid_sample(images, self.grid[None])

  def cover(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """Noise mode: each of f32[B, H, W, C] `images` warped by `clip(grid + U(-1, 1) / H, -1, 1)`,
    noise per image."""
    b, h, w, _ = images.shape
    noise = jax.random.uniform(key, (b, h, w, 2), minval=-1.0, maxval=1.0) / h
    return grid_sample(images, jnp.clip(self.grid[None] + noise, -1.0, 1.0))


def default_config() -> ml_collections.ConfigDict:
  """BackdoorBench's WaNet defaults."""
  return ml_collections.ConfigDict(dict(
      k=4,  # side of the random control grid
      s=0.5,  # warp strength
      grid_rescale=1.0,  # scale of the grid before clipping to [-1, 1]
      cross_ratio=2.0,  # noise-mode (cover) images per poisoned image; 0: no noise mode
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.wanet` (ConfigError on a bad value)."""
  config_lib.check_range(config, "poison.wanet.k", 2)
  config_lib.check_range(config, "poison.wanet.s", 0)
  config_lib.check_range(config, "poison.wanet.grid_rescale", 0, low_open=True)
  config_lib.check_range(config, "poison.wanet.cross_ratio", 0)


def build(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
          seed: int) -> WarpTrigger:
  """The WaNet trigger of section `c` for images of `image_shape` (H, W, C).

  Raises:
    ConfigError: a control grid (k x k) finer than the image, which its upsampling would shrink.
  """
  config_lib.require(c.k <= min(image_shape[:2]), f"poison.wanet.k {c.k} is more control points "
                     f"than the {image_shape[0]}x{image_shape[1]} images have pixels per side")
  grid = warp_grid(image_shape, c.k, c.s, c.grid_rescale, seed)
  return WarpTrigger(jnp.asarray(grid), float(c.cross_ratio))
