"""Refool: the reflection backdoor (Liu, Ma, Bailey & Lu, ECCV 2020).

A poisoned image x gets a reflection layer made from a reflection image r, in linear light
(gamma 2.2) as the reference code composes it, with one of two reflection models drawn per image:

- ghost effect (probability `ghost_rate`): r convolved with a two-pulse kernel, i.e. r overlaid
  on itself shifted by an offset (dy, dx) in [min_offset, max_offset] pixels with weights a and
  1 - a, a = |b - U(0.15, 0.5)|, b a fair coin; the reference builds it on a canvas padded by
  the offset, crops the overlap and resizes it back to the image size, as done here (bilinear,
  half-pixel centers, edges clamped to the crop). Composite: `(1 - alpha_t) ghost + alpha_t x`,
  alpha_t = 1 - U(0.05, 0.45).
- out of focus: r blurred by a Gaussian with sigma ~ U(min_sigma, max_sigma) (kernel side
  2 ceil(2 sigma) + 1, borders reflected without repeating the edge, as OpenCV's default), added
  to x; where the sum overexposes (> 1) the blur is lowered per channel by (mean overexposed
  value - 1) * U(1.08, 1.18) and clipped to [0, 1]; the composite is
  `v (1 - alpha_t / 2) blur + alpha_t x` with the same alpha_t and v the reference's Gaussian
  vignette (`vignette`: a window of max(H, W) pixels over 3 sigmas a side, cropped at random
  along a side more than 10 pixels shorter; for a square image the whole window).

Offsets, sigmas and the vignette are in the image's own pixels, as BackdoorBench runs the
reference's blending (its `max_image_size` set to the image side); the reference's default of
560 would upscale a 32-pixel image 17.5 times first, which makes the same offsets and sigmas that
much smaller relative to the image.
The result goes back to gamma 1/2.2 and is clipped to [0, 1]. Every image draws its reflection
from the pool and its model's parameters from its key, in training and at test time alike.

With `filter` (the default), as BackdoorBench's `refoolMixStrategyAttack`, an image tries `tries`
blends, each with another pool image (a random order without repeats; the whole pool if it is
smaller) and its own model and parameters, and keeps the first whose uint8 blended image, and
transmission and reflection layers pass the reference's three checks (`passes_checks`), else the
last one tried:
1. mean(reflection) <= 0.8 mean(blended - reflection), where the difference of the reference's
   uint8 arrays wraps modulo 256 (a blend pixel d levels darker than the reflection counts as
   256 - d), replicated here;
2. max(blended) >= 0.1 * 255;
3. 0.70 <= SSIM(blended, transmission) <= 0.85, with the defaults of skimage's
   `compare_ssim(multichannel=True)` on uint8 images (`ssim`).
The layers are the reference's, each made uint8 by truncating 255 v: transmission (alpha_t
x^2.2)^(1/2.2) in either model; ghost: reflection ((1 - alpha_t) ghost)^(1/2.2), clipped and
raised to 1/2.2 a second time (as the reference does); out of focus: reflection (min(1, 4 (1 -
alpha_t)) v (1 - alpha_t / 2) blur)^(1/2.2). The image returned is the blend in f32, not
truncated. The reference composes in float32 and float64 with OpenCV's resize and blur, so a
layer value next to a multiple of 1/255 can truncate one level apart. With `filter` off an image
gets one blend, always kept. The reference tries the whole pool (`tries` >= `count` does that).
Measured on 1,000 CIFAR-10 test images, the share of images no try passes (each try passes 10%
of the time), for tries 1 / 4 / 8 / 16 / 32 / 64 / 200:
- the default pool of 200 seeded textures: 91 / 73 / 61 / 52 / 44 / 36 / 28%;
- 200 CIFAR-10 training images: 89 / 68 / 50 / 34 / 24 / 14 / 6%.
Out-of-focus blends mostly stay too close to the transmission layer (SSIM > 0.85; smooth
textures nearly always), ghost blends mostly fail check 1 (their twice-corrected reflection layer
is bright); images no try passes are brighter than the rest (mean 0.6 against 0.45). Each try
costs a blend and an SSIM (on 2 CPU cores, a batch of 128 32x32 images takes 12 ms without the
filter, 0.2 s with 8 tries, 0.4 s with 16, 1.2 s with 32; in training only a batch's marked rows
pay it, see `jaxbd.poison.poison_fn`).
Refool is a clean-label attack in its paper (only target-class training images are triggered;
`poison.label_mode=clean_label`); it works as a dirty-label one too. The paper draws reflection
images from PASCAL VOC and keeps the most effective ones after a few rounds of training; here the
pool is `count` random training images of the data source `images` (e.g. `npz:PATH` of a dataset
other than the victim's), resized to the input size, or, when `images` is empty, `count` seeded
smooth random textures (no image ships with jaxbd). With `select_rounds` > 0 the standard
experiment runs the paper's selection (its Algorithm 1) over `candidates` such images, all of
weight 1: each round poisons the training set with the `count` candidates of highest weight,
trains the victim for `select_epochs`, scores each of them by how many of `select_images`
non-target clean training images (never test images) it turns to the target, sets their
weights to these scores and every other candidate's to the median of these scores; the `count`
of highest weight after the last round are the pool (ties go to the earlier candidate).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd.poison import triggers

GAMMA = 2.2
TRANSMISSION = (0.55, 0.95)  # either model: alpha_t = 1 - U(0.05, 0.45)
GHOST_WEIGHT = (0.15, 0.5)  # a = |coin - U(0.15, 0.5)|
OVEREXPOSURE = (1.08, 1.18)  # out of focus: factor on the overexposure that is taken off the blur
VIGNETTE_SIGMAS = 3  # the out-of-focus vignette spans this many sigmas each side of its center
VIGNETTE_MARGIN = 10  # a side at least this much shorter than the window gets a random crop
REFLECTION_SHARE = 0.8  # check 1: mean(reflection) <= this * mean(blended - reflection)
MIN_BRIGHTEST = 0.1  # check 2: the blend's brightest value >= this * 255
SSIM_RANGE = (0.70, 0.85)  # check 3: SSIM(blended, transmission) in this range
SSIM_WINDOW = 7  # skimage's default SSIM window side (uniform)
SSIM_K = (0.01, 0.03)  # skimage's SSIM constants K1, K2 (data range 255)

Layers = tuple[jax.Array, jax.Array, jax.Array]  # (blended, transmission, reflection)


def blur_matrix(size: int, sigma: jax.Array, radius: int) -> jax.Array:
  """f32[size, size] M with (M v)_i the Gaussian blur of v (length `size`) at i.

  The kernel has `ceil(2 sigma)` taps a side (the reference's kernel side 2 ceil(2 sigma) + 1), at
  most `radius`, normalized to sum 1; the border is reflected without repeating the edge pixel.
  """
  taps = np.arange(-radius, radius + 1)
  source = np.arange(size)[:, None] + taps[None, :]
  period = 2 * (size - 1) if size > 1 else 1
  source = np.abs(source) % period
  source = np.where(source >= size, period - source, source)  # reflect 101
  gather = np.eye(size, dtype=np.float32)[source]  # [size, 2 radius + 1, size]
  weights = jnp.exp(-0.5 * (taps / sigma) ** 2) * (np.abs(taps) <= jnp.ceil(2.0 * sigma))
  return jnp.einsum("t,itj->ij", weights / weights.sum(), gather)


def separable(rows: jax.Array, image: jax.Array, cols: jax.Array) -> jax.Array:
  """f32[H, W, C] image -> rows @ image @ cols^T per channel (rows f32[H, H], cols f32[W, W])."""
  return jnp.einsum("ik,klc,jl->ijc", rows, image, cols)


def gaussian_blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """f32[H, W, C] image blurred by a Gaussian of std `sigma` (traced) along rows and columns."""
  h, w, _ = image.shape
  return separable(blur_matrix(h, sigma, radius), image, blur_matrix(w, sigma, radius))


def zoom_matrix(size: int, start: jax.Array, length: jax.Array) -> jax.Array:
  """f32[size, size] M with M v the crop v[start:start + length] resized back to `size` samples
  (bilinear, half-pixel centers, edges clamped to the crop, as OpenCV's and torch's resize);
  `start` and `length` may be traced."""
  pos = jnp.maximum((jnp.arange(size) + 0.5) * length / size - 0.5, 0.0)
  low = jnp.floor(pos)
  frac = (pos - low)[:, None]
  high = jnp.minimum(low + 1, length - 1)
  pick = lambda i: jax.nn.one_hot((start + i).astype(jnp.int32), size)
  return (1.0 - frac) * pick(low) + frac * pick(high)


def ghost(image: jax.Array, offset: jax.Array, weight: jax.Array) -> jax.Array:
  """The ghost-effect layer of f32[H, W, C] `image`: `weight * zoom(image[dy:, dx:]) + (1 -
  weight) * zoom(image[:H - dy, :W - dx])`, each crop resized back to H x W (bilinear).

  offset: int[2] (dy, dx), each in [1, H - 1] and [1, W - 1] (may be traced).
  """
  h, w, _ = image.shape

  def zoom(dy, dx):
    return separable(zoom_matrix(h, dy, h - offset[0]), image, zoom_matrix(w, dx, w - offset[1]))

  return weight * zoom(offset[0], offset[1]) + (1.0 - weight) * zoom(0, 0)


def vignette_window(size: int) -> np.ndarray:
  """f32[size, size]: the reference's vignette, `sqrt(p_i p_j)` scaled to 1 at its maximum, p
  the standard normal's mass in `size` equal bins over [-3 - d / 2, 3 + d / 2], d = 7 / size
  (3: VIGNETTE_SIGMAS)."""
  n = VIGNETTE_SIGMAS
  d = (2 * n + 1.0) / size
  edges = np.linspace(-n - d / 2, n + d / 2, size + 1)
  mass = np.diff([0.5 * (1.0 + math.erf(e / math.sqrt(2.0))) for e in edges])
  window = np.sqrt(np.outer(mass, mass))
  return (window / window.max()).astype(np.float32)


def vignette(shape: tuple[int, int], key: jax.Array) -> jax.Array:
  """f32[H, W, 1]: an H x W crop of the `max(H, W)`-sided `vignette_window`, at a random start
  drawn by `key` along a side more than VIGNETTE_MARGIN pixels shorter than the window, else 0
  (the reference's)."""
  size = max(shape)
  starts = [jax.random.randint(k, (), 0, size - side - VIGNETTE_MARGIN)
            if side < size - VIGNETTE_MARGIN else 0
            for k, side in zip(jax.random.split(key), shape)]
  window = jnp.asarray(vignette_window(size))
  return jax.lax.dynamic_slice(window, starts, shape)[..., None]


def to_uint8(x: jax.Array) -> jax.Array:
  """f32[...] in [0, 1] -> int32[...] floor(255 x), the reference's `np.uint8(x * 255)`."""
  return jnp.floor(x * 255.0).astype(jnp.int32)


def window_sums(x: jax.Array, size: int) -> jax.Array:
  """int32[H, W, C] -> int32[H - size + 1, W - size + 1, C]: the sum of each size x size window
  that lies inside the image (at its top-left pixel)."""
  h, w, _ = x.shape
  rows = sum(x[i:h - size + 1 + i] for i in range(size))
  return sum(rows[:, j:w - size + 1 + j] for j in range(size))


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
  """f32[]: the mean SSIM of uint8-valued int32[H, W, C] images x and y (H, W >= SSIM_WINDOW), as
  skimage's `compare_ssim(x, y, multichannel=True)` on uint8 images computes it: data range
  255, a SSIM_WINDOW-sided uniform window, K1, K2 = SSIM_K, sample (co)variances (N / (N - 1),
  N = SSIM_WINDOW^2), the map averaged over the pixels whose window lies inside the image
  (skimage crops (SSIM_WINDOW - 1) // 2 pixels at each border) and over channels.

  The window sums and n^2 times the means' products, n (n - 1) times the (co)variances are
  exact integers, so float32 only rounds the last few operations.
  """
  n = SSIM_WINDOW ** 2
  sx, sy, sxx, syy, sxy = (window_sums(a, SSIM_WINDOW) for a in (x, y, x * x, y * y, x * y))
  c1 = n * n * (SSIM_K[0] * 255.0) ** 2
  c2 = n * (n - 1) * (SSIM_K[1] * 255.0) ** 2
  f32 = lambda v: v.astype(jnp.float32)
  means = (2.0 * f32(sx * sy) + c1) / (f32(sx * sx + sy * sy) + c1)
  spreads = ((2.0 * f32(n * sxy - sx * sy) + c2)
             / (f32(n * sxx - sx * sx + n * syy - sy * sy) + c2))
  return jnp.mean(means * spreads)


def too_small_to_filter(h: int, w: int) -> str:
  """The end of the error line for an h x w image too small for the filter's SSIM window."""
  return (f"needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its SSIM window), got "
          f"{h}x{w}")


def passes_checks(blended: jax.Array, transmission: jax.Array,
                  reflection: jax.Array) -> jax.Array:
  """bool[]: whether BackdoorBench's Refool keeps a blend, from its uint8-valued int32[H, W, C]
  blended image, transmission and reflection layers: (1) mean(reflection) <= REFLECTION_SHARE
  * mean(blended - reflection), the difference wrapping modulo 256 as the reference's uint8
  arrays do; (2) max(blended) >= MIN_BRIGHTEST * 255; (3) `ssim(blended, transmission)` within
  SSIM_RANGE (both ends included)."""
  share = jnp.mean(reflection) <= REFLECTION_SHARE * jnp.mean((blended - reflection) % 256)
  bright = jnp.max(blended) >= MIN_BRIGHTEST * 255.0
  score = ssim(blended, transmission)
  return share & bright & (score >= SSIM_RANGE[0]) & (score <= SSIM_RANGE[1])


@flax.struct.dataclass
class ReflectionTrigger(triggers.NoCover):
  """Adds a reflection of a random pool image to each image (module docstring).

  Attributes:
    reflections: f32[R, H, W, C] in [0, 1], the reflection pool.
    ghost_rate: probability of the ghost-effect model (else out of focus).
    offsets: (min, max) ghost offset in pixels.
    sigmas: (min, max) blur sigma in pixels.
    filter: keep the first of `tries` blends that passes BackdoorBench's checks
      (`passes_checks`), else the last; off: one blend, always kept.
    tries: blends an image tries with the filter, each with another pool image (at most R).
  """

  reflections: jax.Array
  ghost_rate: float = flax.struct.field(pytree_node=False, default=0.49)
  offsets: tuple[int, int] = flax.struct.field(pytree_node=False, default=(3, 8))
  sigmas: tuple[float, float] = flax.struct.field(pytree_node=False, default=(1.0, 5.0))
  filter: bool = flax.struct.field(pytree_node=False, default=True)
  tries: int = flax.struct.field(pytree_node=False, default=16)

  def _ghost(self, t: jax.Array, r: jax.Array, key: jax.Array) -> Layers:
    """Linear-light f32[H, W, C] t and r -> the ghost-effect composite (linear, unclipped),
    transmission and reflection layers (display, in [0, 1]) of the reference."""
    k_off, k_coin, k_weight, k_alpha = jax.random.split(key, 4)
    offset = jax.random.randint(k_off, (2,), self.offsets[0], self.offsets[1] + 1)
    weight = jnp.abs(jax.random.bernoulli(k_coin).astype(jnp.float32)
                     - jax.random.uniform(k_weight, (), minval=GHOST_WEIGHT[0],
                                          maxval=GHOST_WEIGHT[1]))
    alpha = jax.random.uniform(k_alpha, (), minval=TRANSMISSION[0], maxval=TRANSMISSION[1])
    mask = (1.0 - alpha) * ghost(r, offset, weight)
    reflection = jnp.clip(mask ** (1.0 / GAMMA), 0.0, 1.0) ** (1.0 / GAMMA)  # twice, as there
    return mask + alpha * t, (alpha * t) ** (1.0 / GAMMA), reflection

  def _out_of_focus(self, t: jax.Array, r: jax.Array, key: jax.Array) -> Layers:
    """Linear-light f32[H, W, C] t and r -> the out-of-focus composite (linear, unclipped),
    transmission and reflection layers (display, in [0, 1]) of the reference."""
    k_sigma, k_att, k_corner, k_alpha = jax.random.split(key, 4)
    h, w, _ = t.shape
    sigma = jax.random.uniform(k_sigma, (), minval=self.sigmas[0], maxval=self.sigmas[1])
    blurred = gaussian_blur(r, sigma, math.ceil(2 * self.sigmas[1]))
    total = blurred + t
    over = total > 1.0
    mean = jnp.maximum(1.0, (total * over).sum((0, 1)) / (over.sum((0, 1)) + 1e-6))  # [C]
    factor = jax.random.uniform(k_att, (), minval=OVEREXPOSURE[0], maxval=OVEREXPOSURE[1])
    blurred = jnp.clip(blurred - (mean - 1.0) * factor, 0.0, 1.0)
    alpha = jax.random.uniform(k_alpha, (), minval=TRANSMISSION[0], maxval=TRANSMISSION[1])
    mask = vignette((h, w), k_corner) * (1.0 - alpha / 2.0) * blurred
    reflection = (jnp.minimum(1.0, 4.0 * (1.0 - alpha)) * mask) ** (1.0 / GAMMA)
    return mask + alpha * t, (alpha * t) ** (1.0 / GAMMA), reflection

  def _blend(self, image: jax.Array, r: jax.Array, keys: Sequence[jax.Array]) -> Layers:
    """f32[H, W, C] image and reflection r in [0, 1], keys (model, ghost, out of focus) ->
    (blended, transmission, reflection) f32[H, W, C] in [0, 1], of the model `keys` draw."""
    k_model, k_ghost, k_focus = keys
    t, r = image ** GAMMA, r ** GAMMA
    pick = jax.random.bernoulli(k_model, self.ghost_rate)
    out, transmission, reflection = jax.tree.map(
        lambda a, b: jnp.where(pick, a, b), self._ghost(t, r, k_ghost),
        self._out_of_focus(t, r, k_focus))
    return jnp.clip(out, 0.0, 1.0) ** (1.0 / GAMMA), transmission, reflection

  def reflect(self, image: jax.Array, key: jax.Array) -> jax.Array:
    """f32[H, W, C] in [0, 1] -> the image with the reflection its key draws (no filter)."""
    k_pick, *keys = jax.random.split(key, 4)
    r = self.reflections[jax.random.randint(k_pick, (), 0, self.reflections.shape[0])]
    return self._blend(image, r, keys)[0]

  def candidates(self, image: jax.Array, key: jax.Array) -> Layers:
    """f32[H, W, C] in [0, 1] -> the filter's (blended, transmission, reflection), each
    f32[T, H, W, C] in [0, 1], T = min(tries, R): try i blends pool image `order[i]` of a
    random order without repeats, its model and parameters drawn by its own key."""
    size = self.reflections.shape[0]
    count = min(self.tries, size)
    k_order, k_tries = jax.random.split(key)
    order = jax.random.permutation(k_order, size)[:count]
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(jax.random.split(k_tries, count))
    return jax.vmap(lambda i, k: self._blend(image, self.reflections[i], k))(order, keys)

  def reflect_checked(self, image: jax.Array, key: jax.Array) -> jax.Array:
    """f32[H, W, C] in [0, 1] -> the first of its `candidates` blends that `passes_checks`
    (on the layers made uint8), else the last."""
    blended, transmission, reflection = self.candidates(image, key)
    passed = jax.vmap(passes_checks)(to_uint8(blended), to_uint8(transmission),
                                     to_uint8(reflection))
    return blended[jnp.where(passed.any(), jnp.argmax(passed), passed.shape[0] - 1)]

  def __call__(self, images: jax.Array, key: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """images: f32[B, H, W, C] in [0, 1] -> each with its own random reflection (same in
    training and at test)."""
    del train
    if key is None:
      raise ValueError("Refool draws a reflection per image: pass a PRNG key")
    if self.filter and min(images.shape[1:3]) < SSIM_WINDOW:
      raise ValueError("Refool's filter " + too_small_to_filter(*images.shape[1:3]))
    reflect = self.reflect_checked if self.filter else self.reflect
    return jax.vmap(reflect)(images, jax.random.split(key, images.shape[0]))


def default_config() -> ml_collections.ConfigDict:
  """The reference's reflection models; a pool of 200 reflection images."""
  return ml_collections.ConfigDict(dict(
      images="",  # data source of reflection images (npz:PATH, folder:PATH, tfds:NAME);
                  # empty: seeded smooth random textures
      count=200,  # reflection images in the pool
      ghost_rate=0.49,  # probability of the ghost-effect model (else out of focus)
      min_offset=3,  # ghost offset range in pixels
      max_offset=8,
      min_sigma=1.0,  # out-of-focus blur sigma range in pixels
      max_sigma=5.0,
      select_rounds=0,  # rounds of Refool's reflection selection (0: the first `count` drawn)
      candidates=1000,  # candidate reflections the selection ranks (> count)
      select_epochs=1,  # epochs each selection round trains the victim
      select_images=500,  # non-target clean training images each reflection is scored on
      filter=True,  # keep the first blend passing BackdoorBench's checks (module docstring)
      tries=16,  # blends an image tries with the filter (each another pool image)
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.refool` (ConfigError on a bad value)."""
  c = config.poison.refool
  config_lib.check_range(config, "poison.refool.count", 1)
  config_lib.check_range(config, "poison.refool.ghost_rate", 0, 1)
  config_lib.check_range(config, "poison.refool.min_offset", 1)
  config_lib.check_range(config, "poison.refool.min_sigma", 0, low_open=True)
  config_lib.require(c.min_offset <= c.max_offset and c.min_sigma <= c.max_sigma,
                     "poison.refool needs min_offset <= max_offset and min_sigma <= max_sigma, "
                     f"got offsets {c.min_offset}..{c.max_offset}, sigmas "
                     f"{c.min_sigma}..{c.max_sigma}")
  config_lib.check_range(config, "poison.refool.select_rounds", 0)
  config_lib.check_range(config, "poison.refool.select_epochs", 1)
  config_lib.check_range(config, "poison.refool.select_images", 1)
  config_lib.check_range(config, "poison.refool.tries", 1)
  if c.images:
    config_lib.source_parts(c.images, "poison.refool.images")
  if not selects(config):
    return
  need = "poison.refool.select_rounds > 0 (reflection selection) needs"
  config_lib.require(c.candidates > c.count, f"{need} poison.refool.candidates > count, got "
                     f"{c.candidates} candidates for {c.count}")
  config_lib.require(config.experiment == "standard" and config.poison.rate > 0
                     and config.attack.name == "none",
                     f"{need} the standard experiment poisoning poison.rate > 0 of the training "
                     "set with attack.name='none' (its rounds train on the poison plan)")


def selects(config: ml_collections.ConfigDict) -> bool:
  """Whether the run selects its reflections (Refool with `select_rounds` > 0)."""
  return config.poison.name == "refool" and config.poison.refool.select_rounds > 0


def textures(count: int, image_shape: tuple[int, int, int], seed: int) -> np.ndarray:
  """f32[count, H, W, C] seeded smooth random textures in [0, 1]: uniform noise at 2, 4, 8 and
  16 cells a side, each upsampled (bilinear) to H x W and weighted by its cell size. Texture i
  depends only on (seed, i), so a larger pool extends a smaller one."""
  h, w, c = image_shape
  out = np.zeros((count, h, w, c), np.float32)
  for cells in (2, 4, 8, 16):
    noise = np.stack([np.random.default_rng((seed, 0x4ef001, i, cells)).uniform(
        0.0, 1.0, (cells, cells, c)) for i in range(count)]).astype(np.float32)
    out += np.asarray(jax.image.resize(noise, (count, h, w, c), "linear")) / cells
  low, high = out.min((1, 2, 3), keepdims=True), out.max((1, 2, 3), keepdims=True)
  return (out - low) / np.maximum(high - low, 1e-6)


def pool_images(images: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
  """uint8[N, h, w, c] images -> f32[N, H, W, C] in [0, 1]: resized (bilinear, antialiased),
  grey made RGB or RGB made grey (channel mean) as `image_shape` (H, W, C) asks."""
  h, w, c = image_shape
  x = np.asarray(images, np.float32) / 255.0
  if x.shape[-1] != c:
    x = np.repeat(x, c, -1) if x.shape[-1] == 1 else x.mean(-1, keepdims=True)
  return np.clip(np.asarray(jax.image.resize(x, (len(x), h, w, c), "linear")), 0.0, 1.0)


def reflection_pool(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                    seed: int, size: int = 0) -> np.ndarray:
  """f32[size, H, W, C] (size 0: `c.count`): training images of the data source `c.images` in
  a random order drawn by `seed`, or seeded textures when it is empty; a larger pool extends a
  smaller one (the trigger's default pool is the first `count` selection candidates).

  Raises:
    DataError: the source is missing or corrupt.
    ConfigError: it has fewer than `size` training images (its form is checked by `validate`).
  """
  size = size or c.count
  if not c.images:
    return textures(size, image_shape, seed)
  from jaxbd.data import sources  # pylint: disable=g-import-not-at-top  (the data layer)
  source = ml_collections.ConfigDict(dict(source=c.images, train_limit=0, test_limit=0,
                                          tfds_data_dir="", download=False))
  images = sources.load(source).x_train
  key = "count" if size == c.count else "candidates"
  config_lib.require(len(images) >= size, f"poison.refool.{key} {size} asks for more reflection "
                     f"images than {c.images} has ({len(images)})")
  pick = np.random.default_rng((seed, 0x4ef001)).permutation(len(images))[:size]
  return pool_images(images[pick], image_shape)


def top_candidates(weights: np.ndarray, count: int) -> np.ndarray:
  """int[count]: the candidates of highest weight (ties: the earlier one), in index order."""
  return np.sort(np.argsort(-np.asarray(weights), kind="stable")[:count])


def update_weights(weights: np.ndarray, chosen: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Refool's update: each chosen candidate's weight becomes its score, every other candidate's
  the median of those scores (so the next round swaps the weaker half of the chosen for untried
  candidates).  weights: f[N]; chosen: int[M]; scores: f[M]."""
  new = np.full(len(weights), np.median(scores), np.float64)
  new[chosen] = scores
  return new


def effectiveness(predict, variables, trigger: ReflectionTrigger, images: np.ndarray,
                  target: int) -> np.ndarray:
  """int[R]: for each reflection of the trigger's pool, how many of uint8[M, H, W, C] `images`,
  each given that reflection (its model drawn per image; the filter keeps a pool of one's only
  blend), `predict` assigns to `target`."""
  pool = trigger.reflections
  return np.asarray([int(np.sum(predict(variables, images, trigger.replace(
      reflections=pool[j:j + 1])) == target)) for j in range(pool.shape[0])])


def build(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
          seed: int) -> ReflectionTrigger:
  """The Refool trigger of section `c` for images of `image_shape` (H, W, C)."""
  h, w, _ = image_shape
  config_lib.require(c.max_offset < min(h, w),
                     f"poison.refool.max_offset {c.max_offset} does not fit a {h}x{w} image")
  config_lib.require(not c.filter or min(h, w) >= SSIM_WINDOW,
                     "poison.refool.filter " + too_small_to_filter(h, w))
  return ReflectionTrigger(jnp.asarray(reflection_pool(c, image_shape, seed)),
                           float(c.ghost_rate), (int(c.min_offset), int(c.max_offset)),
                           (float(c.min_sigma), float(c.max_sigma)), bool(c.filter),
                           int(c.tries))
