"""PyTorch reference models with the same layout as jaxbd's Flax models (needs the `[torch]` extra).

`PreActResNet18` has BackdoorBench's module names (conv1, layer1..4 of PreActBlocks with bn1,
conv1, bn2, conv2 and an optional 1x1 `shortcut.0`, adaptive average pool, linear), so
BackdoorBench checkpoints load into it and `jaxbd.interop.backdoorbench` maps it to and from
`jaxbd.models.resnet.PreActResNet`. Used by the interop tests and the PyTorch side of
`scripts/compare_pytorch.py`; it takes normalized NCHW inputs, as BackdoorBench models do.
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


class PreActResNet18(nn.Module):
  """PreAct-ResNet18: x f32[B, C, H, W] (normalized) -> logits f32[B, num_classes]."""

  def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    planes = width
    for stage in range(4):
      out = width * 2**stage
      blocks = [PreActBlock(planes, out, 1 if stage == 0 else 2), PreActBlock(out, out, 1)]
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      planes = out
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.linear = nn.Linear(planes, num_classes)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features float[B, 8 * width] (pooled) of images float[B, C, H, W]."""
    out = self.conv1(x)
    for stage in range(4):
      out = getattr(self, f"layer{stage + 1}")(out)
    return torch.flatten(self.avgpool(out), 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Logits, float[B, classes], of images float[B, C, H, W]."""
    return self.linear(self.features(x))
