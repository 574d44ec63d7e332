"""A small VGG-style CNN for CPU tests and quick experiments.

`stages` blocks of conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool, channels width * 2**i, then
global average pooling and a dense classifier. With width 16 and 3 stages it has 24k parameters and
reaches ~50% on a 5,000-image CIFAR-10 subset in 10 epochs on 2 CPU cores in under a minute.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxbd import config as config_lib
from jaxbd.models import common
from jaxbd.quant import layers as qlayers
from jaxbd.quant.quantizer import QuantConfig


class CNN(nn.Module):
  """Small CNN classifier.

  Attributes:
    num_classes: K.
    width: channels of the first stage (doubled per stage).
    stages: number of conv-pool stages; the input side must be at least 2**stages (each max-pool
      halves it, rounding down).
    mean: per-channel input mean (images in [0, 1]).
    std: per-channel input std.
    dtype: compute dtype.
    flatten: flatten the last feature map instead of global average pooling.
    quant: None (float) or the quantization of every conv and pooling input (see jaxbd.quant);
      the classifier is quantized only with `quant.quantize_head`.
  """

  num_classes: int
  width: int = 16
  stages: int = 3
  mean: Sequence[float] = (0.5,)
  std: Sequence[float] = (0.25,)
  dtype: Any = jnp.float32
  flatten: bool = False
  quant: Optional[QuantConfig] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: f32[B, H, W, C] in [0, 1] -> logits f32[B, num_classes].

    Raises:
      ValueError: an image side below 2**stages (the last max-pool would leave nothing).
    """
    if min(x.shape[1:3]) < 2**self.stages:
      raise ValueError(f"{x.shape[1]}x{x.shape[2]} images are too small for {self.stages} "
                       f"stages of 2x2 max-pooling (sides of at least {2**self.stages})")
    x = common.normalize(x, self.mean, self.std, self.dtype)
    for i in range(self.stages):
      x = qlayers.QuantConv(self.width * 2**i, (3, 3), dtype=self.dtype, quant=self.quant,
                            name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.relu(x)
      x = qlayers.QuantAct(self.quant, name=f"pool{i}")(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = common.prunable(self, x)  # fine-pruning layer: the last stage's channels
    if self.flatten:
      x = x.reshape(x.shape[0], -1)
    else:
      x = jnp.mean(qlayers.QuantAct(self.quant, name="avgpool")(x), axis=(1, 2))
    return common.classifier(self, x)


def default_config() -> ml_collections.ConfigDict:
  """The `model.cnn` section: width of the first stage, number of stages."""
  return ml_collections.ConfigDict(dict(width=16, stages=3))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `model.cnn` (ConfigError on a bad value)."""
  config_lib.check_range(config, "model.cnn.width", 1)
  config_lib.check_range(config, "model.cnn.stages", 1, 6)


def build(config, num_classes: int, mean, std) -> CNN:
  """The CNN of `config.model.cnn` with the given input normalization."""
  c = config.model.cnn
  return CNN(num_classes, c.width, c.stages, tuple(mean), tuple(std),
             common.DTYPES[config.model.dtype])
