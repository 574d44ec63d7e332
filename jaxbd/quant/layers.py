"""Quantizable Linen layers: `QuantConv`, `QuantDense` and `QuantAct` (pooling inputs).

`QuantConv` and `QuantDense` are drop-in replacements for `nn.Conv` / `nn.Dense` (the subset the
models use): the same parameter names, shapes and initializers, and with `quant=None` the same
computation, so one variables pytree (and every float checkpoint) drives the float, the
fake-quantized and (after `jaxbd.quant.export`) the integer forward pass:

    model.apply(variables, x)                                   # float
    model.clone(quant=QuantConfig()).apply(variables, x)         # fake-quantized (W8A8)

(the default `ema` observer reads the input ranges of `quant_stats`, which quantization-aware
training or `jaxbd.quant.calibrate` put into `variables`).

With `quant.mode == "fake"` the layer fake-quantizes its input (per tensor, range from an
observer) and its kernel (per output channel by default), with a straight-through gradient to the
shared float parameters. With `quant.mode == "integer"` the kernel in `params` holds int8 codes,
the input is turned into integer codes, and the product accumulates in int32
(`preferred_element_type=jnp.int32`) before one float rescale by input_scale * kernel_scale;
integer convolutions run as image patches times the kernel (an integer matmul on every backend).

Variable collections:
- `quant_stats/<layer>/{input_min, input_max, count}`: the EMA observer of the layer's input
  range. It is updated only when the collection is mutable (training, calibration), never at
  init; it does not exist with the `batch` observer, which reads the current input's range.
- `quant_scales/<layer>/{kernel_scale, kernel_zero_point, input_scale, input_zero_point}`: the
  deployment scales, written by a fake-quant pass with the collection mutable (see
  `jaxbd.quant.deploy.export`) and read by the integer pass.

A new model becomes quantizable by building its conv/dense layers with these classes, passing its
`quant` attribute, putting `QuantAct(quant)` before each pooling, and keeping its classifier's
`quant=quantizer.head_quant(quant)`; a model that vmaps experts adds `quant_stats` and
`quant_scales` to the vmap's `variable_axes`, and a layer of E experts with stacked kernels
[E, D, F] (the pMoE experts) calls `quantized_product(..., stacked=True)` for a weight scale per
expert and output channel.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear

from jaxbd.quant import quantizer
from jaxbd.quant.quantizer import QuantConfig

STATS = "quant_stats"
SCALES = "quant_scales"


def observed_range(module: nn.Module, x: jax.Array,
                   q: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """The per-tensor range (f32[] min, f32[] max) used to quantize the input x [..., C] of `module`.

  The `batch` observer returns x's own range. The `ema` observer keeps its range in
  `quant_stats` and, when that collection is mutable (and not at init), first folds x's range in
  with `quantizer.ema`; an observer that has seen no batch yet (count 0) gives x's own range, as
  its first update would.

  Raises:
    ValueError: the `ema` observer has no `quant_stats` to read (float variables: train or
      calibrate first, `jaxbd.quant.calibrate`, or use the `batch` observer).
  """
  if q.observer == "batch":
    return quantizer.tensor_range(x, per_channel=False)
  if not (module.has_variable(STATS, "input_min") or module.is_mutable_collection(STATS)):
    raise ValueError(f"{module.path}: the ema observer has no quant_stats to read; calibrate the "
                     "float variables first (jaxbd.quant.calibrate) or use observer='batch'")
  lo = module.variable(STATS, "input_min", jnp.zeros, (), jnp.float32)
  hi = module.variable(STATS, "input_max", jnp.zeros, (), jnp.float32)
  count = module.variable(STATS, "count", jnp.zeros, (), jnp.int32)
  if module.is_mutable_collection(STATS) and not module.is_initializing():
    batch_lo, batch_hi = quantizer.tensor_range(x, per_channel=False)
    lo.value = quantizer.ema(lo.value, batch_lo, count.value, q.momentum)
    hi.value = quantizer.ema(hi.value, batch_hi, count.value, q.momentum)
    count.value = count.value + 1
    return lo.value, hi.value
  batch_lo, batch_hi = quantizer.tensor_range(x, per_channel=False)
  seen = count.value > 0
  return jnp.where(seen, lo.value, batch_lo), jnp.where(seen, hi.value, batch_hi)


def _exporting(module: nn.Module) -> bool:
  return module.is_mutable_collection(SCALES) and not module.is_initializing()


def _storage_dtype(symmetric: bool):
  """int8 for signed codes, uint8 for unsigned (asymmetric) codes; 2..8 bits fit either."""
  return jnp.int8 if symmetric else jnp.uint8


def fake_input(module: nn.Module, x: jax.Array,
               q: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """Straight-through centered codes (x's shape) and f32[] scale of a layer input x
  (`quantizer.ste_codes`).

  With `quant_scales` mutable also records the input scale and zero point for deployment.
  """
  lo, hi = observed_range(module, x, q)
  if _exporting(module) and q.observer == "ema":
    scale, zero_point = quantizer.scale_and_zero_point(lo, hi, q.act_bits, q.act_symmetric,
                                                       narrow=False)
    module.put_variable(SCALES, "input_scale", scale)
    module.put_variable(SCALES, "input_zero_point", zero_point)
  return quantizer.activation_codes(x, lo, hi, q)


def integer_input(module: nn.Module, x: jax.Array,
                  q: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """(codes - zero_point as an integer array of x's shape, f32[] scale) of a layer input x in the
  integer pass.

  The scale is the exported one (`ema` observer) or x's own range (`batch` observer).
  """
  if q.observer == "batch":
    lo, hi = quantizer.tensor_range(x, per_channel=False)
    scale, zero_point = quantizer.scale_and_zero_point(lo, hi, q.act_bits, q.act_symmetric,
                                                       narrow=False)
  else:
    scale = module.get_variable(SCALES, "input_scale")
    zero_point = module.get_variable(SCALES, "input_zero_point")
    if scale is None:
      raise ValueError(f"{module.path}: no exported input scale; integer variables come from "
                       "jaxbd.quant.export")
  c = quantizer.codes(x.astype(jnp.float32), scale, zero_point, q.act_bits, q.act_symmetric,
                      False, q.rounding)
  return centered(c.astype(_storage_dtype(q.act_symmetric)), zero_point), scale


def centered(codes: jax.Array, zero_point: jax.Array) -> jax.Array:
  """codes - zero_point as integers (codes' shape): int8 codes stay int8, uint8 codes become
  int16."""
  if codes.dtype == jnp.int8:
    return codes
  return codes.astype(jnp.int16) - zero_point.astype(jnp.int16)


def _export_kernel(module: nn.Module, kernel: jax.Array, q: QuantConfig, stacked: bool) -> None:
  c, scale, zero_point = quantizer.kernel_codes(kernel, q, stacked)
  module.put_variable(SCALES, "kernel_codes", c.astype(_storage_dtype(q.weight_symmetric)))
  module.put_variable(SCALES, "kernel_scale", scale)
  module.put_variable(SCALES, "kernel_zero_point", zero_point)


def quantized_product(module: nn.Module, x: jax.Array, kernel: jax.Array,
                      op: Callable[..., jax.Array], q: Optional[QuantConfig],
                      dtype: Any, stacked: bool = False) -> jax.Array:
  """op(x, kernel) in float, fake-quantized or integer arithmetic (see the module docstring).

  Args:
    module: the calling layer (owner of the observer and scale variables).
    x: the layer input [..., C_in].
    kernel: the layer's `kernel` parameter [..., C_out]: float, or integer codes in the
      integer pass.
    op: `op(lhs, rhs, **kw)`, a lax convolution or dot_general taking
      `preferred_element_type`.
    q: the quantization (None: float).
    dtype: compute dtype of the float and fake-quantized passes.
    stacked: kernel is [E, D, C_out], E experts' kernels with a weight scale per expert (and
      channel), and op's output is [E, N, C_out] (a matmul batched over experts); the input
      [E, N, D] has one activation scale.
  """
  if q is None:
    return op(x.astype(dtype), kernel.astype(dtype))
  if q.mode == "fake":
    # The product of exact integer-valued codes, rescaled once: the integer path's arithmetic.
    # Codes of up to 8 bits are exact in bfloat16 and float16, but their sums are not (a 3x3x3
    # conv reaches 27 * 128 * 127, past float16's range): the product accumulates in float32.
    cx, x_scale = fake_input(module, x, q)
    ck, k_scale = quantizer.weight_codes(kernel, q, stacked)
    if _exporting(module):
      _export_kernel(module, kernel, q, stacked)
    acc = op(cx.astype(dtype), ck.astype(dtype), preferred_element_type=jnp.float32)
    return (acc * (x_scale * k_scale)).astype(dtype)
  cx, x_scale = integer_input(module, x, q)
  zero_point = module.get_variable(SCALES, "kernel_zero_point")
  k_scale = module.get_variable(SCALES, "kernel_scale")
  if zero_point is None or not jnp.issubdtype(kernel.dtype, jnp.integer):
    raise ValueError(f"{module.path}: the integer pass needs variables from "
                     "jaxbd.quant.export")
  ck = centered(kernel, zero_point)
  if cx.dtype != ck.dtype:  # lax needs one operand dtype; int16 holds both
    cx, ck = cx.astype(jnp.int16), ck.astype(jnp.int16)
  acc = op(cx, ck, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * (x_scale * k_scale)).astype(dtype)


class _QuantLinear(nn.Module, kw_only=True):
  """What `QuantConv` and `QuantDense` share: keyword attributes and the forward body.

  Attributes:
    use_bias: add a bias (kept in float).
    dtype: compute dtype (parameters are float32).
    quant: None (float) or the QuantConfig.
    kernel_init: as `nn.Conv` / `nn.Dense` (LeCun normal).
    bias_init: as `nn.Conv` / `nn.Dense` (zeros).
  """

  use_bias: bool = True
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  def _forward(self, x: jax.Array, kernel_shape: tuple[int, ...],
               op: Callable[..., jax.Array]) -> jax.Array:
    """Kernel (and bias) parameters, the (quantized) product, the bias."""
    kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
    y = quantized_product(self, x, kernel, op, self.quant, self.dtype)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(y.dtype)
    return y


class QuantConv(_QuantLinear):
  """2-D convolution (NHWC, HWIO kernel) with optional fake-quantized or integer arithmetic.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: an int or (sh, sw).
    padding: "SAME", "VALID" or ((top, bottom), (left, right)), as `nn.Conv`.
    (keyword) use_bias, dtype, quant, kernel_init, bias_init: see `_QuantLinear`.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: Any = "SAME"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H', W', features]."""
    if x.ndim != 4:
      raise ValueError(f"x.ndim must be 4 (NHWC), but it is {x.ndim}")
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    op = functools.partial(_conv_op, strides=strides,
                           padding=flax_linear.canonicalize_padding(self.padding, 2))
    return self._forward(x, (*self.kernel_size, x.shape[-1], self.features), op)


def image_patches(x: jax.Array, window: Sequence[int], strides: Sequence[int],
                  padding: Any) -> jax.Array:
  """The zero-padded windows of a convolution, by slicing (any dtype, exact).

  Args:
    x: [B, H, W, C].
    window: (kh, kw).
    strides: (sh, sw).
    padding: "SAME", "VALID" or ((top, bottom), (left, right)).

  Returns:
    [B, H', W', kh * kw * C], ordered as the rows of an HWIO kernel reshaped to [kh * kw * C, O].
  """
  (kh, kw), (sh, sw) = window, strides
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return jnp.concatenate([x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                          for i in range(kh) for j in range(kw)], axis=-1)


def _conv_op(lhs: jax.Array, rhs: jax.Array, *, strides: Sequence[int], padding: Any,
             preferred_element_type: Any = None) -> jax.Array:
  """NHWC x HWIO convolution. Integer operands run as image patches times the reshaped kernel,
  an integer matmul, which every backend compiles (XLA's GPU convolutions take int8 only, in
  cuDNN's layouts, and no int16); float operands run as `lax.conv_general_dilated`."""
  if jnp.issubdtype(lhs.dtype, jnp.integer):
    patches = image_patches(lhs, rhs.shape[:2], strides, padding)
    return _dense_op(patches, rhs.reshape(-1, rhs.shape[-1]),
                     preferred_element_type=preferred_element_type)
  return jax.lax.conv_general_dilated(lhs, rhs, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      preferred_element_type=preferred_element_type)


def _dense_op(lhs: jax.Array, rhs: jax.Array, **kwargs) -> jax.Array:
  return jax.lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())), **kwargs)


class QuantDense(_QuantLinear):
  """Dense layer [..., C_in] -> [..., features] with optional quantized arithmetic.

  Attributes:
    features: output features.
    (keyword) use_bias, dtype, quant, kernel_init, bias_init: see `_QuantLinear`.
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """f32[..., D] -> f32[..., features], with the kernel (and input) quantized as configured."""
    return self._forward(x, (x.shape[-1], self.features), _dense_op)


class QuantAct(nn.Module):
  """Quantizes a pooling layer's input (identity with `quant=None`).

  In the integer pass the input becomes integer codes and is dequantized with its scale, so the
  pooling that follows sees exactly the values of the fake-quantized pass.
  """

  quant: Optional[QuantConfig] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """f32[B, H, W, C] -> the same shape, on the quantization grid of its observed range."""
    q = self.quant
    if q is None:
      return x
    if q.mode == "fake":
      c, scale = fake_input(self, x, q)
    else:
      c, scale = integer_input(self, x, q)
    return (c.astype(jnp.float32) * scale).astype(x.dtype)
