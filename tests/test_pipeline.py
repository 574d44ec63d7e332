"""The on-device pipeline: crop/flip semantics, BackdoorBench's batch augmentation, determinism,
epoch index matrices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import data
from jaxbd.data import pipeline


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
  x = jnp.asarray(np.random.default_rng(0).uniform(0.1, 1, (16, 8, 8, 1)), jnp.float32)
  out = np.asarray(pipeline.random_crop(x, jax.random.key(1), 2))
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(16):
    matches = [(r, c) for r in range(5) for c in range(5)
               if np.array_equal(out[i], padded[i, r:r + 8, c:c + 8])]
    assert matches, f"image {i} is not a window of the padded image"
  offsets = {tuple(np.argwhere(np.asarray(out[i, ..., 0]) > 0)[0]) for i in range(16)}
  assert len(offsets) > 1  # offsets differ per image
  np.testing.assert_array_equal(pipeline.random_crop(x, jax.random.key(1), 0), x)


def test_random_flip_mirrors_about_half_the_images():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(200, 4, 5, 3)), jnp.float32)
  out = np.asarray(pipeline.random_flip(x, jax.random.key(0)))
  flipped = np.array([np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, x)])
  kept = np.array([np.array_equal(o, np.asarray(i)) for o, i in zip(out, x)])
  assert np.all(flipped ^ kept) and 70 < flipped.sum() < 130


def test_batches_are_deterministic_in_the_key():
  rng = np.random.default_rng(0)
  arrays = data.train_arrays(rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8),
                             rng.integers(0, 10, 32))
  idx = jnp.arange(16, dtype=jnp.int32)
  fn = jax.jit(lambda k: data.gather_batch(arrays, idx, k, crop_padding=2, flip=True)[0])
  np.testing.assert_array_equal(fn(jax.random.key(5)), fn(jax.random.key(5)))
  assert not np.array_equal(fn(jax.random.key(5)), fn(jax.random.key(6)))


def test_epoch_indices_cover_every_example_in_whole_batches():
  perm = np.asarray(data.epoch_indices(jax.random.key(0), 10, 4))
  assert perm.shape == (3, 4)
  assert set(perm.ravel()) == set(range(10))
  big = np.asarray(data.epoch_indices(jax.random.key(0), 3, 8))
  assert big.shape == (1, 8) and set(big.ravel()) == {0, 1, 2}


def torchvision_rotate(images: np.ndarray, degrees: float) -> np.ndarray:
  """torchvision's tensor `rotate` (nearest, no expand, fill 0) written out in torch: its affine
  grid over pixel centers, inverse rotation matrix, then `grid_sample`.  images: [B, H, W, C]."""
  torch = pytest.importorskip("torch")
  b, h, w, _ = images.shape
  rad = math.radians(-degrees)
  inverse = torch.tensor([[math.cos(rad), math.sin(rad), 0.0],
                          [-math.sin(rad), math.cos(rad), 0.0]])
  base = torch.ones(1, h, w, 3)
  base[..., 0] = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w)
  base[..., 1] = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h).unsqueeze(-1)
  grid = base.view(1, h * w, 3).bmm(inverse.T.unsqueeze(0) / torch.tensor([0.5 * w, 0.5 * h]))
  out = torch.nn.functional.grid_sample(
      torch.from_numpy(images).permute(0, 3, 1, 2), grid.view(1, h, w, 2).expand(b, h, w, 2),
      mode="nearest", padding_mode="zeros", align_corners=False)
  return out.permute(0, 2, 3, 1).numpy()


def test_rotate_is_torchvisions_nearest_rotation():
  x = np.random.default_rng(0).uniform(0.1, 1, (4, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(pipeline.rotate(jnp.asarray(x), 90.0), np.rot90(x, 1, axes=(1, 2)))
  np.testing.assert_array_equal(pipeline.rotate(jnp.asarray(x), 0.0), x)
  for degrees in np.random.default_rng(1).uniform(-10, 10, 20).tolist() + [-10.0, 10.0, 45.0]:
    np.testing.assert_array_equal(pipeline.rotate(jnp.asarray(x), degrees),
                                  torchvision_rotate(x, degrees), err_msg=f"{degrees} degrees")
  corner = np.asarray(pipeline.rotate(jnp.asarray(x), 45.0, fill=(0.1, 0.2, 0.3)))[:, 0, 0]
  np.testing.assert_allclose(corner, np.broadcast_to([0.1, 0.2, 0.3], (4, 3)))


def crops_and_flips(x: np.ndarray, padding: int, fill: float):
  """Every (offset, flipped) -> the crop of `x` padded by `fill`, flipped or not.  x: [H, W, C]."""
  h, w, _ = x.shape
  padded = np.pad(x, ((padding, padding), (padding, padding), (0, 0)), constant_values=fill)
  return {(r, c, f): (lambda im: im[:, ::-1] if f else im)(padded[r:r + h, c:c + w])
          for r in range(2 * padding + 1) for c in range(2 * padding + 1) for f in (0, 1)}


def test_batch_augment_draws_one_crop_rotation_and_flip_for_the_whole_batch():
  """The same pixel map for every image (out[1] = 2 out[0] for inputs x, 2x and fill 0), the fill
  in padded pixels, crops w.p. 0.8, rotations w.p. 0.5, flips w.p. 0.5 (over 400 batches)."""
  x = (np.arange(16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3) + 1) / 1000
  batch = jnp.asarray(np.stack([x, 2 * x]))
  fn = jax.jit(lambda k: pipeline.batch_augment(batch, k, 0.0, padding=3))
  candidates = crops_and_flips(x, 3, 0.0)
  plain, centered, flipped = 0, 0, 0
  for key in jax.random.split(jax.random.key(0), 400):
    out = np.asarray(fn(key))
    np.testing.assert_allclose(out[1], 2 * out[0], rtol=1e-6)
    match = [k for k, v in candidates.items() if np.array_equal(out[0], v)]
    if match:  # not rotated (or by an angle too small to move a pixel)
      plain += 1
      centered += match[0][:2] == (3, 3)
      flipped += match[0][2]
  # Unrotated: 0.5 plus the rotations that move no pixel; their crops: centered w.p. 0.2 + 0.8 / 49.
  assert 200 < plain < 300, plain
  assert 0.12 < centered / plain < 0.32, (centered, plain)
  assert 0.38 < flipped / plain < 0.62, (flipped, plain)
  filled = np.stack([pipeline.batch_augment(batch, k, (7.0, 8.0, 9.0), padding=3)
                     for k in jax.random.split(jax.random.key(1), 10)])
  outside = filled[..., 0] == 7.0
  assert outside.any() and np.all(filled[outside] == [7.0, 8.0, 9.0])
  unflipped = jax.jit(lambda k: pipeline.batch_augment(batch, k, 0.0, padding=3, flip=False))
  kept = [k for key in jax.random.split(jax.random.key(2), 100)
          for k, v in candidates.items() if np.array_equal(np.asarray(unflipped(key))[0], v)]
  assert len(kept) > 30 and not any(f for *_, f in kept), kept  # without flip: never mirrored
