"""Patch-level routed MoE CNNs (pMoE; Chowdhury et al., ICML 2023): WRN-MoE and image-patch pMoE.

**WRN-MoE** (`WRNMoE`, the pMoE CIFAR-10 reference model and the BadPatches victim): conv3x3(16)
-> pre-activation wide block of 16k channels (stride 1) -> block of 32k channels (stride 2) ->
BN-ReLU -> conv3x3 of 64k channels, stride 2, giving an 8x8 map on 32x32 inputs (n = 64 routing
positions, each seeing about a 4x4-pixel block). The MoE layer (`PatchMoE`): E experts, each with
a 1x1 router that takes its top-l positions (`jaxbd.models.routing.ExpertChoiceRouter`); the
selected position vectors are multiplied by their gates, unselected positions are zero, and each
expert BN -> ReLU -> conv1x1(16k) runs on that map; the E outputs are concatenated -> BN-ReLU ->
global average pool -> dense. The reference has k = 10 (160/320/640 channels), E = 4, l = 16;
`widen` is k, the width multiplier. As in the reference (Keras), convolutions have biases, the
first block of each group has a 1x1 projection shortcut on its input, "SAME" padding is
TensorFlow's (extra padding bottom/right on stride 2), and the layers have Keras's defaults:
Glorot-uniform kernels (the experts' per expert; the routers N(0, 1e-4)) and BatchNorm epsilon
1e-3 and momentum 0.99 (`bn_momentum`, an option: its running statistics trail a model that lr 0.1
still moves fast, and on the 390 steps of the CPU recipe the eval-mode model loses 15 points of
ACC to that lag). The reference feeds images in [0, 1] unnormalized; the BadPatches config sets
`data.mean` 0 and `data.std` 1 for this model to do the same.

The experts only compute on the C = l selected positions, yet give exactly the reference's dense
result: an expert's BatchNorm takes its batch statistics over all B * n positions (the unselected
ones contribute zeros to the sums), and its output at an unselected position is the expert
applied to a zero vector, a per-expert constant (`ConvExperts`).

**Image-patch pMoE** (`ImagePatchMoE`, pMoE's MNIST experiment): routers and experts act on the
raw (normalized) image patches: patch p x p with stride p, E experts each taking its top-l
patches, expert = conv(p x p, stride p, no bias) + ReLU on the gated patches (zero elsewhere),
concatenation, global average pool over patch positions, BatchNorm, dense. The BatchNorm on the
pooled features is ours (the MNIST model has a fixed output layer): without it the gated, mostly
zero features are too small for SGD at pMoE's learning rate to train the head on CIFAR-10 (ACC
0.20 instead of 0.40 after 10 epochs on 5,000 images).

Both sow the routing decision (`intermediates/routing`) and mark the experts' last conv as the
fine-pruning layer (per expert and channel; see `jaxbd.models.common.prunable`).

Quantization (`quant`, see `jaxbd.quant`): every conv, the routers and the experts use the quant
layers; each expert's kernel has its own per-output-channel weight scales, and the experts' input
(the gated positions of all experts, plus each expert's input at an unselected position) one
per-tensor activation scale. BatchNorm, the gates and the float classifier stay float.
"""

from __future__ import annotations

import types
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxbd import config as config_lib
from jaxbd.models import common, routing
from jaxbd.quant import layers as qlayers
from jaxbd.quant.quantizer import QuantConfig

KERAS_BN_MOMENTUM, KERAS_BN_EPSILON = 0.99, 1e-3  # Keras's BatchNormalization: the WRN-MoE's
_BN = types.MappingProxyType(dict(momentum=0.9, epsilon=1e-5))  # the image-patch pMoE's (ours)
_GLOROT = nn.initializers.glorot_uniform()  # Keras's Conv2D / Dense kernel default


class ConvExperts(nn.Module):
  """E experts BN -> ReLU -> conv1x1 applied to the selected positions of a map of S positions.

  Parameters and BatchNorm statistics are stacked on a leading expert axis; the BatchNorm has
  Keras's epsilon, the kernels are Glorot-uniform per expert (the WRN-MoE's Keras defaults).

  Attributes:
    features: output channels per expert.
    num_positions: S, the positions of the full map (BatchNorm counts the unselected ones, which
      are zero).
    dtype: compute dtype.
    quant: None (float) or the quantization of the conv1x1.
    bn_momentum: the BatchNorm's running-average momentum.
  """

  features: int
  num_positions: int
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  bn_momentum: float = KERAS_BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """x: f32[E, G, C, D] gated selected positions -> (outputs [E, G, C, F], output at 0 [E, F])."""
    e, g, _, d = x.shape
    scale = self.param("scale", nn.initializers.ones, (e, d))
    bias = self.param("bias", nn.initializers.zeros, (e, d))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (e, d))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (e, d))
    x32 = x.astype(jnp.float32)
    if train:
      total = g * self.num_positions
      mean = jnp.sum(x32, axis=(1, 2)) / total
      var = jnp.maximum(jnp.sum(x32 * x32, axis=(1, 2)) / total - mean * mean, 0.0)
      if not self.is_initializing():
        m = self.bn_momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + KERAS_BN_EPSILON)
    shift = bias - mean * mul  # the normalized value of a zero (unselected) position
    h = nn.relu(x32 * mul[:, None, None] + shift[:, None, None]).astype(self.dtype)
    # The selected positions and, as one more row per expert, the zero position's input.
    rows = jnp.concatenate([h.reshape(e, -1, d), nn.relu(shift)[:, None].astype(self.dtype)], 1)
    kernel = self.param("kernel", routing.stacked_init(nn.initializers.glorot_uniform),
                        (e, d, self.features))
    out_bias = self.param("out_bias", nn.initializers.zeros, (e, self.features))
    out = (expert_product(self, rows, kernel, self.quant, self.dtype)
           + out_bias[:, None].astype(self.dtype))
    return out[:, :-1].reshape(e, g, -1, self.features), out[:, -1].astype(jnp.float32)


class PatchExperts(nn.Module):
  """E experts conv(p x p, stride p, no bias) + ReLU on flattened patches, stacked on axis 0.

  Attributes:
    features: output channels per expert.
    dtype: compute dtype.
    quant: None (float) or the quantization of the conv.
  """

  features: int
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: f32[E, G, C, p * p * channels] -> (f32[E, G, C, features], output at 0: zeros)."""
    e, g, _, d = x.shape
    kernel = self.param("kernel", routing.stacked_init(), (e, d, self.features))
    y = nn.relu(expert_product(self, x.reshape(e, -1, d), kernel, self.quant, self.dtype))
    return y.reshape(e, g, -1, self.features), jnp.zeros((e, self.features))


def _batched_matmul(lhs: jax.Array, rhs: jax.Array, **kwargs) -> jax.Array:
  """[E, N, D] x [E, D, F] -> [E, N, F]."""
  return jax.lax.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))), **kwargs)


def expert_product(module: nn.Module, x: jax.Array, kernel: jax.Array,
                   quant: Optional[QuantConfig], dtype: Any) -> jax.Array:
  """Each expert's rows times its kernel, in float or quantized arithmetic.

  Args:
    module: the experts layer (owner of the quantization variables).
    x: f32[E, N, D] the rows of each expert.
    kernel: f32[E, D, F] (or integer codes in the integer pass).
    quant: None (float) or the QuantConfig (a weight scale per expert and output channel).
    dtype: compute dtype.

  Returns:
    [E, N, F].
  """
  return qlayers.quantized_product(module, x, kernel, _batched_matmul, quant, dtype,
                                   stacked=True)


EXPERTS = ("bn_relu_conv", "conv_relu")


class PatchMoE(nn.Module):
  """pMoE layer on a map of positions: expert-choice routing, gated experts, concatenation.

  Attributes:
    num_experts: E.
    capacity: l, positions per expert.
    features: output channels per expert (the layer returns E * features channels).
    normalize: gate normalization (see `ExpertChoiceRouter`).
    impl: dispatch implementation, "gather" or "einsum".
    expert: "bn_relu_conv" (`ConvExperts`: WRN-MoE) or "conv_relu" (`PatchExperts`: image
      patches).
    dtype: compute dtype.
    quant: None (float) or the quantization of the router and the experts.
    bn_momentum: the `bn_relu_conv` experts' BatchNorm momentum.
  """

  num_experts: int = 4
  capacity: int = 16
  features: int = 160
  normalize: str = "tokens"
  impl: str = routing.DEFAULT_IMPL
  expert: str = "bn_relu_conv"
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  bn_momentum: float = KERAS_BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, D] -> [B, H, W, E * features]."""
    b, h, w, d = x.shape
    if self.capacity > h * w:
      raise ValueError(f"l = {self.capacity} is more than the {h * w} routing positions of the "
                       f"{h}x{w} map")
    tokens = x.reshape(b, h * w, d)
    decision = routing.ExpertChoiceRouter(self.num_experts, self.capacity, self.normalize,
                                          quant=self.quant, name="router")(tokens, train)
    routing.sow_routing(self, decision)
    gated = (routing.dispatch(tokens, decision, self.impl) *
             jnp.swapaxes(decision.gates, 0, 1)[..., None])  # [E, G, C, D]
    if self.expert == "bn_relu_conv":
      y, y0 = ConvExperts(self.features, h * w, self.dtype, self.quant, self.bn_momentum,
                          name="experts")(gated, train)
    elif self.expert == "conv_relu":
      y, y0 = PatchExperts(self.features, self.dtype, self.quant, name="experts")(gated)
    else:
      raise ValueError(f"expert must be one of {EXPERTS}, but it is {self.expert!r}")
    y, y0 = _prunable_experts(self, y, y0, h * w)
    out = routing.combine_stack(y, y0.astype(y.dtype), decision, self.impl)
    return out.reshape(b, h, w, self.num_experts * self.features)


def _prunable_experts(module: nn.Module, y: jax.Array, y0: jax.Array,
                      num_positions: int) -> tuple[jax.Array, jax.Array]:
  """The experts' last conv as the fine-pruning layer.

  Applies `prune/mask` f32[E, F] when present, and records each image's mean output per expert
  channel over all positions of the map (selected ones: y; the others: y0), f32[G, E, F].

  Args:
    module: the MoE layer.
    y: f32[E, G, C, F] outputs at the selected positions.
    y0: f32[E, F] output at the unselected positions.
    num_positions: S.
  """
  mask = common.prune_mask(module)
  if mask is not None:
    y, y0 = y * mask[:, None, None].astype(y.dtype), y0 * mask
  capacity = y.shape[2]
  total = jnp.sum(y.astype(jnp.float32), axis=2) + (num_positions - capacity) * y0[:, None]
  common.sow_prune_activations(module, jnp.swapaxes(total / num_positions, 0, 1))
  return y, y0


def keras_batchnorm(train: bool, momentum: float, dtype: Any, name: str) -> nn.BatchNorm:
  """A BatchNorm with Keras's epsilon and the given momentum, batch statistics in training."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum,
                      epsilon=KERAS_BN_EPSILON, dtype=dtype, name=name)


class WideBlock(nn.Module):
  """Pre-activation wide residual block of the pMoE reference (Keras layout).

  Attributes:
    features: output channels.
    stride: stride of the first conv and of the shortcut.
    project: 1x1 conv shortcut on the block's input (the first block of every group).
    dtype: compute dtype.
    quant: None (float) or the quantization of the convs.
    bn_momentum: the BatchNorms' running-average momentum (epsilon: Keras's).
  """

  features: int
  stride: int = 1
  project: bool = True
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  bn_momentum: float = KERAS_BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, C] -> [B, H / stride, W / stride, features]."""
    bn = lambda name: keras_batchnorm(train, self.bn_momentum, self.dtype, name)
    conv = lambda k, s, name: qlayers.QuantConv(self.features, (k, k), s, "SAME",
                                                dtype=self.dtype, quant=self.quant,
                                                kernel_init=_GLOROT, name=name)
    out = conv(3, self.stride, "conv1")(nn.relu(bn("bn1")(x)))
    out = conv(3, 1, "conv2")(nn.relu(bn("bn2")(out)))
    shortcut = conv(1, self.stride, "shortcut")(x) if self.project else x
    return out + shortcut


class WRNMoE(nn.Module):
  """The pMoE WRN-MoE classifier for 32x32 images (see the module docstring).

  Attributes:
    num_classes: K.
    widen: k, channel multiplier (reference: 10).
    num_experts: E (reference: 4).
    capacity: l, positions per expert (reference: 16 of 64).
    normalize: gate normalization (reference code: "tokens").
    impl: dispatch implementation.
    mean: per-channel input mean (images in [0, 1]).
    std: per-channel input std.
    dtype: compute dtype.
    quant: None (float) or the quantization of every conv, router, expert and pooling input; the
      classifier is quantized only with `quant.quantize_head`.
    bn_momentum: every BatchNorm's running-average momentum (reference: Keras's 0.99).
  """

  num_classes: int
  widen: int = 10
  num_experts: int = 4
  capacity: int = 16
  normalize: str = "tokens"
  impl: str = routing.DEFAULT_IMPL
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  bn_momentum: float = KERAS_BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: f32[B, H, W, C] in [0, 1] -> logits f32[B, num_classes]."""
    k, q, m = self.widen, self.quant, self.bn_momentum
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = qlayers.QuantConv(16, (3, 3), padding="SAME", dtype=self.dtype, quant=q,
                          kernel_init=_GLOROT, name="conv1")(x)
    x = WideBlock(16 * k, 1, dtype=self.dtype, quant=q, bn_momentum=m, name="block1")(x, train)
    x = WideBlock(32 * k, 2, dtype=self.dtype, quant=q, bn_momentum=m, name="block2")(x, train)
    x = nn.relu(keras_batchnorm(train, m, self.dtype, "bn")(x))
    x = qlayers.QuantConv(64 * k, (3, 3), 2, "SAME", dtype=self.dtype, quant=q,
                          kernel_init=_GLOROT, name="conv2")(x)
    x = PatchMoE(self.num_experts, self.capacity, 16 * k, self.normalize, self.impl,
                 "bn_relu_conv", self.dtype, q, m, name="moe")(x, train)
    x = nn.relu(keras_batchnorm(train, m, self.dtype, "bn_moe")(x))
    x = jnp.mean(qlayers.QuantAct(q, name="avgpool")(x), axis=(1, 2))
    return common.classifier(self, x, kernel_init=_GLOROT)


def patchify(x: jax.Array, patch: int) -> jax.Array:
  """x: [B, H, W, C] -> [B, (H / p) * (W / p), p * p * C] non-overlapping patches, row-major."""
  b, h, w, c = x.shape
  if h % patch or w % patch:
    raise ValueError(f"a {h}x{w} image does not split into {patch}x{patch} patches")
  x = x.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ImagePatchMoE(nn.Module):
  """pMoE on raw image patches (see the module docstring).

  Attributes:
    num_classes: K.
    patch: p, patch side in pixels (patches are the routing units).
    num_experts: E.
    capacity: l, patches per expert.
    width: output channels of each expert.
    normalize: gate normalization (pMoE MNIST code: "selected").
    impl: dispatch implementation.
    mean: per-channel input mean.
    std: per-channel input std.
    dtype: compute dtype.
    quant: None (float) or the quantization of the router, the experts and the pooling input; the
      classifier is quantized only with `quant.quantize_head`.
  """

  num_classes: int
  patch: int = 4
  num_experts: int = 4
  capacity: int = 16
  width: int = 64
  normalize: str = "selected"
  impl: str = routing.DEFAULT_IMPL
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: f32[B, H, W, C] in [0, 1] -> logits f32[B, num_classes]."""
    b, h, w, _ = x.shape
    patches = patchify(common.normalize(x, self.mean, self.std, self.dtype), self.patch)
    grid = patches.reshape(b, h // self.patch, w // self.patch, patches.shape[-1])
    out = PatchMoE(self.num_experts, self.capacity, self.width, self.normalize, self.impl,
                   "conv_relu", self.dtype, self.quant, name="moe")(grid, train)
    x = jnp.mean(qlayers.QuantAct(self.quant, name="avgpool")(out), axis=(1, 2))
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn", **_BN)(x)
    return common.classifier(self, x)


def routing_grid(image_shape: Sequence[int]) -> tuple[int, int]:
  """The WRN-MoE routing grid of an (H, W, C) image: two "SAME" stride-2 convs."""
  h, w = image_shape[:2]
  return -(-(-(-h // 2)) // 2), -(-(-(-w // 2)) // 2)


def pmoe_config() -> ml_collections.ConfigDict:
  """The `model.pmoe` section (WRN-MoE; the reference's settings)."""
  return ml_collections.ConfigDict(dict(
      widen=10,  # k: channels 16k, 32k, 64k; experts 16k each (reference: 10)
      experts=4,  # E
      l=16,  # positions each expert takes, of the 8x8 = 64 of a 32x32 image
      normalize="tokens",  # tokens: softmax over all positions, then top-l (reference code);
      # selected: softmax over the l selected (paper)
      dispatch=routing.DEFAULT_IMPL,  # gather | einsum (gather: the faster on CPU)
      bn_momentum=KERAS_BN_MOMENTUM,  # running-average momentum of every BatchNorm (Keras's)
  ))


def pmoe_patch_config() -> ml_collections.ConfigDict:
  """The `model.pmoe_patch` section (image-patch pMoE)."""
  return ml_collections.ConfigDict(dict(
      patch=4,  # patch side in pixels
      experts=4,
      l=16,  # patches each expert takes
      width=64,  # channels of each expert
      normalize="selected",  # as pMoE's MNIST code
      dispatch=routing.DEFAULT_IMPL,
  ))


def _validate_common(config: ml_collections.ConfigDict, name: str) -> None:
  c = config.model[name]
  config_lib.check_range(config, f"model.{name}.experts", 1)
  config_lib.check_range(config, f"model.{name}.l", 1)
  config_lib.check_choice(c.normalize, f"model.{name}.normalize", routing.NORMALIZE[:2])
  config_lib.check_choice(c.dispatch, f"model.{name}.dispatch", routing.IMPLS)


def pmoe_validate(config: ml_collections.ConfigDict) -> None:
  """Checks `model.pmoe` (ConfigError on a bad value)."""
  _validate_common(config, "pmoe")
  config_lib.check_range(config, "model.pmoe.widen", 1)
  config_lib.check_range(config, "model.pmoe.bn_momentum", 0, 1)


def pmoe_patch_validate(config: ml_collections.ConfigDict) -> None:
  """Checks `model.pmoe_patch` (ConfigError on a bad value)."""
  _validate_common(config, "pmoe_patch")
  config_lib.check_range(config, "model.pmoe_patch.patch", 1)
  config_lib.check_range(config, "model.pmoe_patch.width", 1)


def pmoe_build(config, num_classes: int, mean, std) -> WRNMoE:
  """The WRN-MoE of `config.model.pmoe` with the given input normalization."""
  c = config.model.pmoe
  return WRNMoE(num_classes, c.widen, c.experts, c.l, c.normalize, c.dispatch, tuple(mean),
                tuple(std), common.DTYPES[config.model.dtype], bn_momentum=c.bn_momentum)


def pmoe_patch_build(config, num_classes: int, mean, std) -> ImagePatchMoE:
  """The image-patch pMoE of `config.model.pmoe_patch` with the given input normalization."""
  c = config.model.pmoe_patch
  return ImagePatchMoE(num_classes, c.patch, c.experts, c.l, c.width, c.normalize, c.dispatch,
                       tuple(mean), tuple(std), common.DTYPES[config.model.dtype])


def pmoe_cell(image_shape: Sequence[int]) -> int:
  """Pixels per WRN-MoE routing position along each side (4 on 32x32 images)."""
  return image_shape[0] // routing_grid(image_shape)[0]
