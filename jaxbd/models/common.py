"""Pieces shared by the models: input normalization, dtype names, feature taps, the classifier.

Every classifier takes images f32[B, H, W, C] in [0, 1] and normalizes them itself with its
`mean`/`std` attributes, so attacks and defenses (trigger inversion, input-space losses) work in
pixel space. Penultimate features are sown as `intermediates/features` (see `features`).

Fine-pruning (Liu et al. 2018) needs the activations of one layer's channels and a way to switch
channels off: a model marks that layer with `prunable` (or `sow_prune_activations` and
`prune_mask` where the layer is sparse), which multiplies the channels by `prune/mask` when the
variables hold a `prune` collection (`jaxbd.defenses.fine_pruning` adds it) and records the
per-image mean activation per channel (after the mask) as `intermediates/prune_activations`.
Without that collection the model is unchanged.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbd.quant import layers as qlayers
from jaxbd.quant import quantizer

DTYPES = types.MappingProxyType(
    {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16})
# CIFAR-10's per-channel training-set mean and std of images in [0, 1] (BackdoorBench's values):
# the models' default normalization.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float], dtype: Any) -> jax.Array:
  """(x - mean) / std per channel, cast to the compute dtype.  x: f32[B, H, W, C].

  Raises:
    ValueError: mean or std has neither one value nor one per channel of x (a 1-channel image
      would otherwise be broadcast to the model's channel count).
  """
  for name, values in (("mean", mean), ("std", std)):
    if len(values) not in (1, x.shape[-1]):
      raise ValueError(f"the model normalizes {len(values)} channels ({name} {tuple(values)}) "
                       f"but the images have {x.shape[-1]}")
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def sow_features(module: nn.Module, features: jax.Array) -> None:
  """Records the penultimate features f32[B, D] for `features()`."""
  module.sow("intermediates", "features", features.astype(jnp.float32))


def classifier(module: nn.Module, features: jax.Array, name: str = "head",
               kernel_init: Callable = nn.initializers.lecun_normal()) -> jax.Array:
  """The final classifier of `module` on its penultimate features [B, D]: logits f32[B, K].

  Sows the features (see `sow_features`) and applies a Dense layer named `name` with
  `module.num_classes` outputs in `module.dtype` and the given kernel initializer, quantized only
  with `module.quant.quantize_head` (the QB reference keeps the classifier in float).
  """
  sow_features(module, features)
  quant = quantizer.head_quant(getattr(module, "quant", None))
  head = qlayers.QuantDense(module.num_classes, dtype=module.dtype, quant=quant,
                            kernel_init=kernel_init, name=name)
  return head(features).astype(jnp.float32)


def features(model: nn.Module, variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eval-mode logits f32[B, K] and penultimate features f32[B, D] of `images` in [0, 1]."""
  logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  return logits, state["intermediates"]["features"][0]


def sow_prune_activations(module: nn.Module, activations: jax.Array) -> None:
  """Records per-image channel activations f32[B, ..., C] of the fine-pruning layer."""
  module.sow("intermediates", "prune_activations", activations.astype(jnp.float32))


def prune_mask(module: nn.Module) -> jax.Array | None:
  """The fine-pruning channel mask f32[..., C] of this module, or None when not pruned."""
  if module.has_variable("prune", "mask"):
    return module.get_variable("prune", "mask")
  return None


def prunable(module: nn.Module, x: jax.Array) -> jax.Array:
  """Marks x: [B, H, W, C] as the fine-pruning layer: applies the mask, records mean activations."""
  mask = prune_mask(module)
  x = x if mask is None else x * mask.astype(x.dtype)
  sow_prune_activations(module, jnp.mean(x, axis=tuple(range(1, x.ndim - 1))))
  return x
