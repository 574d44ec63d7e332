"""PyTorch reference models with the same layout as jaxbd's Flax models (needs the `[torch]` extra).

`PreActResNet18` has BackdoorBench's module names (conv1, layer1..4 of PreActBlocks with bn1,
conv1, bn2, conv2 and an optional 1x1 `shortcut.0`, adaptive average pool, linear), so
BackdoorBench checkpoints load into it and `jaxbd.interop.backdoorbench` maps it to and from
`jaxbd.models.resnet.ResNet`. `ResNet18` is the post-activation CIFAR ResNet-18
(conv1-bn1-ReLU stem, BasicBlocks with a conv1x1-BN `shortcut.0` / `shortcut.1`), the twin of
jaxbd's `resnet18`. Used by the interop tests and the PyTorch side of `scripts/compare_pytorch.py`;
they take normalized NCHW inputs, as BackdoorBench models do.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PreActBlock(nn.Module):
  """Pre-activation basic block; the 1x1 shortcut reads the pre-activated input."""

  def __init__(self, in_planes: int, planes: int, stride: int = 1):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: float[B, C, H, W] -> float[B, planes, H / stride, W / stride]."""
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
    out = self.conv2(F.relu(self.bn2(self.conv1(out))))
    return out + shortcut


class BasicBlock(nn.Module):
  """Post-activation basic block; the projection shortcut is conv1x1-BN of the input."""

  def __init__(self, in_planes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: float[B, C, H, W] -> float[B, planes, H / stride, W / stride]."""
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + (self.shortcut(x) if hasattr(self, "shortcut") else x))


class PreActResNet18(nn.Module):
  """PreAct-ResNet18: x f32[B, C, H, W] (normalized) -> logits f32[B, num_classes]."""

  block = PreActBlock
  preact = True

  def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    if not self.preact:
      self.bn1 = nn.BatchNorm2d(width)
    planes = width
    for stage in range(4):
      out = width * 2**stage
      blocks = [self.block(planes, out, 1 if stage == 0 else 2), self.block(out, out, 1)]
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      planes = out
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.linear = nn.Linear(planes, num_classes)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features float[B, 8 * width] (pooled) of images float[B, C, H, W]."""
    out = self.conv1(x)
    if not self.preact:
      out = F.relu(self.bn1(out))
    for stage in range(4):
      out = getattr(self, f"layer{stage + 1}")(out)
    return torch.flatten(self.avgpool(out), 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Logits, float[B, classes], of images float[B, C, H, W]."""
    return self.linear(self.features(x))


class ResNet18(PreActResNet18):
  """The post-activation CIFAR ResNet-18, the same interface as `PreActResNet18`."""

  block = BasicBlock
  preact = False
