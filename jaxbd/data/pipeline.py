"""The on-device input pipeline: batch gather, poisoning, augmentation, all inside `jax.jit`.

The training set lives on the accelerator as uint8 (`TrainArrays`). Each step gathers its batch
by index, converts to f32 in [0, 1], lets a poisoning function transform the planned rows, then
applies a random crop with zero padding and a horizontal flip. Every random choice comes from the
step's PRNG key, so a batch is a pure function of (arrays, indices, key) and is identical on any
number of devices. Normalization (mean/std) belongs to the model, so attacks and defenses work in
[0, 1] pixel space. A triggered image stays in f32 (BackdoorBench stores its poisoned sets as
uint8, truncating e.g. a blend by up to one grey level). `batch_augment` is BackdoorBench's WaNet
augmentation instead: one crop, rotation and flip drawn for the whole batch.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

# poison_fn(images f32[B, H, W, C] in [0, 1], kind int8[B], rows int32[B], key) -> images:
# transforms the rows whose kind is not 0 (1: poisoned, 2: the attack's cover transform); `rows`
# are their indices in the training set. See jaxbd.poison.poison_fn.
PoisonFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class TrainArrays:
  """A training set on device.

  Attributes:
    images: uint8[N, H, W, C].
    labels: int32[N] training labels (after relabeling by the poison plan).
    kind: int8[N] per-example poisoning role: 0 clean, 1 poisoned, 2 cover.
  """

  images: jax.Array
  labels: jax.Array
  kind: jax.Array

  @property
  def size(self) -> int:
    """Number of training rows."""
    return self.images.shape[0]


def train_arrays(images: np.ndarray, labels: np.ndarray,
                 kind: Optional[np.ndarray] = None, sharding=None) -> TrainArrays:
  """Puts a training set on device (replicated over `sharding`'s devices when given).

  Args:
    images: uint8[N, H, W, C].
    labels: int[N].
    kind: int8[N] poisoning roles (default: all clean).
    sharding: a `jax.sharding.Sharding` for all three arrays, e.g. a replicated NamedSharding.
  """
  if kind is None:
    kind = np.zeros(len(labels), np.int8)
  put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray
  return TrainArrays(put(np.asarray(images, np.uint8)), put(np.asarray(labels, np.int32)),
                     put(np.asarray(kind, np.int8)))


def to_unit(images: jax.Array) -> jax.Array:
  """uint8[...] in [0, 255] -> f32[...] in [0, 1], the same shape."""
  return images.astype(jnp.float32) / 255.0


def pad(images: jax.Array, padding: int, fill=0.0) -> jax.Array:
  """Pads each side of f32[B, H, W, C] by `padding` pixels of `fill` (a scalar or one value per
  channel) -> f32[B, H + 2 padding, W + 2 padding, C]."""
  b, h, w, c = images.shape
  canvas = jnp.broadcast_to(jnp.asarray(fill, images.dtype),
                            (b, h + 2 * padding, w + 2 * padding, c))
  return jax.lax.dynamic_update_slice(canvas, images, (0, padding, padding, 0))


def random_crop(images: jax.Array, key: jax.Array, padding: int) -> jax.Array:
  """Zero-pads each side by `padding` and crops back to H x W at a random offset per image.

  Matches torchvision's `RandomCrop(size, padding)` (constant fill 0).

  Args:
    images: f32[B, H, W, C].
    key: PRNG key.
    padding: pixels of zero padding per side; 0 returns `images`.
  """
  if padding == 0:
    return images
  b, h, w, c = images.shape
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(pad(images, padding), offsets)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
  """Flips each image left-right with probability 1/2.  images: f32[B, H, W, C]."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def augment(images: jax.Array, key: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  """Random crop (with zero padding) then random horizontal flip.  images: f32[B, H, W, C]."""
  k_crop, k_flip = jax.random.split(key)
  images = random_crop(images, k_crop, crop_padding)
  return random_flip(images, k_flip) if flip else images


def rotate(images: jax.Array, degrees: jax.Array, fill=0.0) -> jax.Array:
  """Rotates every image counter-clockwise by `degrees` about its center, nearest neighbour.

  torchvision's `rotate(img, degrees)` on a tensor (no expand): output pixel (i, j) takes the
  input pixel nearest to R(-degrees) applied to its offset from the center ((H - 1) / 2,
  (W - 1) / 2), rounded half to even as `grid_sample`; pixels from outside the image get `fill`.

  Args:
    images: f32[B, H, W, C].
    degrees: a scalar angle, the same for the whole batch (90: `np.rot90`).
    fill: scalar or per-channel value of the pixels that come from outside the image.
  """
  _, h, w, _ = images.shape
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  y = jnp.arange(h, dtype=jnp.float32)[:, None] - (h - 1) / 2
  x = jnp.arange(w, dtype=jnp.float32)[None, :] - (w - 1) / 2
  src_x = jnp.round(cos * x - sin * y + (w - 1) / 2).astype(jnp.int32)
  src_y = jnp.round(sin * x + cos * y + (h - 1) / 2).astype(jnp.int32)
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  gathered = images[:, jnp.clip(src_y, 0, h - 1), jnp.clip(src_x, 0, w - 1)]
  return jnp.where(inside[None, :, :, None], gathered, jnp.asarray(fill, images.dtype))


def batch_augment(images: jax.Array, key: jax.Array, fill, *, padding: int = 5,
                  degrees: float = 10.0, flip: bool = True) -> jax.Array:
  """BackdoorBench's WaNet augmentation of a whole batch: one draw for all its images.

  In order: w.p. 0.8 a crop at one random offset of the batch padded by `padding` pixels of
  `fill`; w.p. 0.5 a rotation by one angle uniform in [-degrees, degrees] (`rotate`, `fill`
  outside); with `flip`, a left-right flip w.p. 0.5 (BackdoorBench flips CIFAR-10 only, not
  digits or traffic signs). BackdoorBench applies it to normalized images with fill 0, which is
  `fill` = the dataset mean here, in [0, 1] pixel space.

  Args:
    images: f32[B, H, W, C].
    key: PRNG key.
    fill: per-channel value of the pixels that come from outside the image.
  """
  k_crop, k_offset, k_rotate, k_angle, k_flip = jax.random.split(key, 5)
  offset = jnp.where(jax.random.bernoulli(k_crop, 0.8),
                     jax.random.randint(k_offset, (2,), 0, 2 * padding + 1), padding)
  images = jax.lax.dynamic_slice(pad(images, padding, fill), (0, offset[0], offset[1], 0),
                                 images.shape)
  angle = jax.random.uniform(k_angle, (), minval=-degrees, maxval=degrees)
  images = jnp.where(jax.random.bernoulli(k_rotate, 0.5), rotate(images, angle, fill), images)
  if not flip:
    return images
  return jnp.where(jax.random.bernoulli(k_flip, 0.5), images[:, :, ::-1], images)


def gather_batch(arrays: TrainArrays, idx: jax.Array, key: jax.Array, *,
                 poison_fn: Optional[PoisonFn] = None, crop_padding: int = 0,
                 flip: bool = False) -> tuple[jax.Array, jax.Array]:
  """Builds one training batch on device.

  Args:
    arrays: the training set.
    idx: int32[B] example indices.
    key: PRNG key of this step.
    poison_fn: transforms poisoned/cover rows (None: no poisoning).
    crop_padding: random-crop padding; 0 disables cropping.
    flip: random horizontal flips.

  Returns:
    images f32[B, H, W, C] in [0, 1], labels int32[B].
  """
  k_poison, k_aug = jax.random.split(key)
  images = to_unit(arrays.images[idx])
  if poison_fn is not None:
    images = poison_fn(images, arrays.kind[idx], idx, k_poison)
  images = augment(images, k_aug, crop_padding, flip)
  return images, arrays.labels[idx]


def epoch_indices(key: jax.Array, n: int, batch_size: int) -> jax.Array:
  """A random permutation of [0, n) padded to whole batches, as int32[steps, batch_size].

  The last batch is completed with the first examples of the same permutation (repeated when
  batch_size > n), so every example is seen at least once per epoch and every batch has the
  same shape (`steps = ceil(n / batch_size)`). A PyTorch DataLoader (drop_last=False) gives a
  short last batch instead: here `steps * batch_size - n` examples count twice per epoch (e.g.
  D3's 2,500 trusted CIFAR-10 images at batch 256: 60 of them, in the loss mean and BatchNorm
  statistics of the last step), a fixed-shape cost the PyTorch parity tests avoid by using whole
  batches.
  """
  steps = -(-n // batch_size)
  perm = jax.random.permutation(key, n)
  return jnp.resize(perm, (steps, batch_size)).astype(jnp.int32)
