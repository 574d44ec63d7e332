"""CIFAR ResNet-18s: PreAct-ResNet18 (BackdoorBench's) and the post-activation ResNet-18.

`preact_resnet18` has the layout and parameter names of BackdoorBench's `models/preact_resnet.py`
(conv1, layer1..4 of two pre-activation blocks, adaptive average pool, linear), the architecture
of BackdoorBench's (and D3's) CIFAR-10 results. `resnet18` is the post-activation ResNet-18 for
32x32 images that Pick-your-Poison's code trains (He et al. 2015 with a 3x3 stem and no max pool:
conv1-bn1-ReLU, layer1..4 of two basic blocks whose projection shortcut is conv1x1-BN, average
pool, linear); its penultimate features come after a ReLU, so they are non-negative. Both use
symmetric padding 1 as PyTorch's `Conv2d(padding=1)` and BatchNorm momentum 0.1 / eps 1e-5, so
their PyTorch twins' checkpoints map one to one (see `jaxbd.interop`: `shortcut.0` / `shortcut.1`
are `shortcut` / `shortcut_bn`). `width` scales the channels (64, 128, 256, 512 at width 64).
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


def _bn(block: nn.Module, train: bool, name: str) -> nn.BatchNorm:
  """PyTorch's BatchNorm2d defaults (momentum 0.1, eps 1e-5) in the block's dtype."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=block.dtype, name=name)


def _conv(block: nn.Module, features: int, k: int, stride: int, name: str) -> nn.Module:
  """A bias-free k x k convolution (padding 1 for 3x3, none for 1x1), quantized as the block."""
  padding = ((1, 1), (1, 1)) if k == 3 else "VALID"
  return qlayers.QuantConv(features, (k, k), stride, padding, use_bias=False, dtype=block.dtype,
                           quant=block.quant, name=name)


class Block(nn.Module):
  """What both basic blocks hold: output channels, stride of the first conv, dtype, quantization."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None


class PreActBlock(Block):
  """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

  The 1x1 projection shortcut (when stride > 1 or channels change) reads the pre-activated input,
  as in BackdoorBench.
  """

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H / stride, W / stride, planes]."""
    out = nn.relu(_bn(self, train, "bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = _conv(self, self.planes, 1, self.stride, "shortcut")(out)
    else:
      shortcut = x
    out = _conv(self, self.planes, 3, self.stride, "conv1")(out)
    out = nn.relu(_bn(self, train, "bn2")(out))
    return _conv(self, self.planes, 3, 1, "conv2")(out) + shortcut


class BasicBlock(Block):
  """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

  The projection shortcut (when stride > 1 or channels change) is conv1x1-BN of the block's input.
  """

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H / stride, W / stride, planes], non-negative."""
    out = nn.relu(_bn(self, train, "bn1")(_conv(self, self.planes, 3, self.stride, "conv1")(x)))
    out = _bn(self, train, "bn2")(_conv(self, self.planes, 3, 1, "conv2")(out))
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = _bn(self, train, "shortcut_bn")(_conv(self, self.planes, 1, self.stride, "shortcut")(x))
    return nn.relu(out + x)


class ResNet(nn.Module):
  """ResNet (He et al. 2016) for small images, pre-activation blocks unless `preact` is False.

  Attributes:
    num_classes: K.
    num_blocks: blocks per stage, (2, 2, 2, 2) for ResNet-18.
    width: channels of the first stage (64 in the papers), doubled per stage.
    mean: per-channel input mean (images in [0, 1]).
    std: per-channel input std.
    dtype: compute dtype.
    quant: None (float) or the quantization of every conv and pooling input (see jaxbd.quant);
      the classifier is quantized only with `quant.quantize_head`.
    preact: True: PreAct-ResNet (`PreActBlock`, bare stem); False: the post-activation ResNet
      (`BasicBlock`, stem conv1-bn1-ReLU).
  """

  num_classes: int
  num_blocks: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  preact: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: f32[B, H, W, C] in [0, 1] -> logits f32[B, num_classes]."""
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = _conv(self, self.width, 3, 1, "conv1")(x)
    if not self.preact:
      x = nn.relu(_bn(self, train, "bn1")(x))
    block = PreActBlock if self.preact else BasicBlock
    for stage, blocks in enumerate(self.num_blocks):
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block(self.width * 2**stage, stride, self.dtype, self.quant,
                  name=f"layer{stage + 1}_{i}")(x, train)
    x = common.prunable(self, x)  # fine-pruning layer: the last block's output channels
    x = jnp.mean(qlayers.QuantAct(self.quant, name="avgpool")(x), axis=(1, 2))
    return common.classifier(self, x, name="linear")


def default_config() -> ml_collections.ConfigDict:
  """The `model.preact_resnet18` / `model.resnet18` section: base width (64 in the papers)."""
  return ml_collections.ConfigDict(dict(width=64))


def component(name: str, preact: bool) -> config_lib.Component:
  """The registry entry of the ResNet-18 named `name` (its config section `model.<name>`)."""

  def validate(config: ml_collections.ConfigDict) -> None:
    config_lib.check_range(config, f"model.{name}.width", 1)

  def build(config, num_classes: int, mean, std) -> ResNet:
    return ResNet(num_classes, (2, 2, 2, 2), config.model[name].width, tuple(mean), tuple(std),
                  common.DTYPES[config.model.dtype], preact=preact)

  return config_lib.Component(default_config, validate, build)
