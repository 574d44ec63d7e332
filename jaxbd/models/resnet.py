"""PreAct-ResNet18, the architecture of BackdoorBench's CIFAR-10 results.

Same layout and parameter names as BackdoorBench's `models/preact_resnet.py` (conv1, layer1..4 of
two pre-activation blocks, adaptive average pool, linear), with symmetric padding 1 as PyTorch's
`Conv2d(padding=1)`, BatchNorm momentum 0.1 / eps 1e-5, so its checkpoints map one to one (see
`jaxbd.interop`). `width` scales the channels (64, 128, 256, 512 at width 64).
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


class PreActBlock(nn.Module):
  """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

  The 1x1 projection shortcut (when stride > 1 or channels change) reads the pre-activated input,
  as in BackdoorBench.
  """

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H / stride, W / stride, planes]."""
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                   dtype=self.dtype, name=name)
    conv = lambda k, stride, padding, name: qlayers.QuantConv(
        self.planes, (k, k), stride, padding, use_bias=False, dtype=self.dtype, quant=self.quant,
        name=name)
    out = nn.relu(bn("bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = conv(1, self.stride, "VALID", "shortcut")(out)
    else:
      shortcut = x
    out = conv(3, self.stride, ((1, 1), (1, 1)), "conv1")(out)
    out = nn.relu(bn("bn2")(out))
    out = conv(3, 1, ((1, 1), (1, 1)), "conv2")(out)
    return out + shortcut


class PreActResNet(nn.Module):
  """Pre-activation ResNet (He et al. 2016) for small images.

  Attributes:
    num_classes: K.
    num_blocks: blocks per stage, (2, 2, 2, 2) for PreAct-ResNet18.
    width: channels of the first stage (64 in the paper), doubled per stage.
    mean: per-channel input mean (images in [0, 1]).
    std: per-channel input std.
    dtype: compute dtype.
    quant: None (float) or the quantization of every conv and pooling input (see jaxbd.quant);
      the classifier is quantized only with `quant.quantize_head`.
  """

  num_classes: int
  num_blocks: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: f32[B, H, W, C] in [0, 1] -> logits f32[B, num_classes]."""
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = qlayers.QuantConv(self.width, (3, 3), 1, ((1, 1), (1, 1)), use_bias=False,
                          dtype=self.dtype, quant=self.quant, name="conv1")(x)
    for stage, blocks in enumerate(self.num_blocks):
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = PreActBlock(self.width * 2**stage, stride, self.dtype, self.quant,
                        name=f"layer{stage + 1}_{i}")(x, train)
    x = common.prunable(self, x)  # fine-pruning layer: the last block's output channels
    x = jnp.mean(qlayers.QuantAct(self.quant, name="avgpool")(x), axis=(1, 2))
    return common.classifier(self, x, name="linear")


def default_config() -> ml_collections.ConfigDict:
  """The `model.preact_resnet18` section: base width (64 in the papers)."""
  return ml_collections.ConfigDict(dict(width=64))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `model.preact_resnet18` (ConfigError on a bad value)."""
  config_lib.check_range(config, "model.preact_resnet18.width", 1)


def build(config, num_classes: int, mean, std) -> PreActResNet:
  """The PreAct-ResNet18 of `config.model.preact_resnet18` with the given input normalization."""
  return PreActResNet(num_classes, (2, 2, 2, 2), config.model.preact_resnet18.width,
                      tuple(mean), tuple(std), common.DTYPES[config.model.dtype])
