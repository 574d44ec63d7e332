"""SIG: the sinusoidal-signal clean-label backdoor (Barni, Kallas & Tondi, ICIP 2019).

A horizontal sinusoid `v(i, j) = delta * sin(2 pi j f / W)` (column j, delta in uint8 units) is
added to every pixel and channel, then clipped to the valid range, as BackdoorBench's
`sigTriggerAttack` does (BackdoorBench: delta 40, f 6). SIG is a clean-label attack: use it with
`poison.label_mode = "clean_label"`, so only target-class training images carry the signal and
keep their labels; at test time the signal on any image should turn the prediction to the target.

`AdditiveTrigger` (`clip(x + pattern, 0, 1)`) is the general form, also used for the additive
full-image triggers that trigger inversion recovers (`jaxbd.defenses.detection`).
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd.poison import triggers


@flax.struct.dataclass
class AdditiveTrigger(triggers.NoCover):
  """Adds `pattern` and clips to [0, 1].

  Attributes:
    pattern: f32[H, W, C] (or broadcastable to it), in [-1, 1].
  """

  pattern: jax.Array

  def __call__(self, images: jax.Array, key: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """images: f32[B, H, W, C] in [0, 1] -> clip(images + pattern, 0, 1)."""
    del key, train
    return jnp.clip(images + self.pattern, 0.0, 1.0)


def sinusoid(image_shape: tuple[int, int, int], delta: float, f: float) -> np.ndarray:
  """f32[H, W, C]: delta / 255 * sin(2 pi j f / W) at column j (constant along rows/channels)."""
  h, w, c = image_shape
  wave = delta / 255.0 * np.sin(2.0 * np.pi * np.arange(w) * f / w)
  return np.broadcast_to(wave[None, :, None], (h, w, c)).astype(np.float32)


def default_config() -> ml_collections.ConfigDict:
  """BackdoorBench's SIG defaults."""
  return ml_collections.ConfigDict(dict(
      delta=40.0,  # amplitude in uint8 units
      f=6.0,  # periods across the image width
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.sig` (ConfigError on a bad value)."""
  config_lib.check_range(config, "poison.sig.delta", 0, 255, low_open=True)
  config_lib.check_range(config, "poison.sig.f", 0, low_open=True)


def build(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
          seed: int) -> AdditiveTrigger:
  """The SIG trigger of section `c` for images of `image_shape` (H, W, C)."""
  del seed
  return AdditiveTrigger(jnp.asarray(sinusoid(image_shape, c.delta, c.f)))
