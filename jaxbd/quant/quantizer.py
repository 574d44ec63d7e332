"""Uniform quantizers as pure `jnp` functions: scales, rounding, integer codes, fake quantization.

A tensor x is mapped to integer codes q = clip(round(x / scale) + zero_point, qmin, qmax) and back
to x_q = (q - zero_point) * scale. The scheme follows the QB reference code (Wang et al. 2024,
arXiv 2412.01369, whose quantizer is micronet's IAO W8A8):

- weights: symmetric, one scale per output channel, scale = max|w| / ((qmax - qmin) / 2) with the
  narrow range [-(2^(b-1) - 1), 2^(b-1) - 1] (127 at 8 bits);
- activations: symmetric per tensor, scale = max|x| / ((qmax - qmin) / 2) with the full range
  [-2^(b-1), 2^(b-1) - 1] (max|x| / 127.5 at 8 bits), the range from an observer (the current
  batch, or micronet's moving average, which keeps EMAs of the batch min and max and takes
  max|x| = max(|EMA min|, |EMA max|): EMA(max|x|) for the non-negative inputs after a ReLU;
  for inputs of both signs, the first layer's normalized image, PreAct-ResNet18's pooled
  residual sum, the WRN-MoE's shortcut and router inputs, it can be below EMA(max|x|) when the
  batches' extremes alternate in sign, though an image's extremes recur in nearly every batch);
- asymmetric: scale = (max - min) / (2^b - 1) over a range widened to contain 0, codes in
  [0, 2^b - 1], zero_point = round(-min / scale);
- rounding half away from zero (micronet's `sign(x) * floor(|x| + 0.5)`); also half to even
  (`jnp.round`, PyTorch's fake-quant) and half up (`floor(x + 0.5)`, Qu-ANTI-zation's code).

Gradients use a straight-through estimator (STE): `plain` passes the gradient unchanged; `clipped`
zeroes it where x lies outside the observed range [lo, hi]. Scales and zero points carry no
gradient (they come from observers, as in the reference code).

The same `range_codes` function serves the fake-quantized forward pass (`ste_codes`) and the
integer deployment path (`kernel_codes`, `jaxbd.quant.deploy`), so the two agree up to float
accumulation order.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxbd import config as config_lib

ROUNDINGS = ("half_away", "half_even", "half_up")
GRANULARITIES = ("per_channel", "per_tensor")
OBSERVERS = ("ema", "batch")
STES = ("clipped", "plain")
MODES = ("fake", "integer")
MIN_BITS, MAX_BITS = 2, 8
_TINY_SCALE = 1e-12


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How a model is quantized; frozen and hashable, so it can be a Linen module attribute.

  Attributes:
    weight_bits: bits of weight codes, 2..8.
    act_bits: bits of activation codes (inputs of conv, dense and pooling layers), 2..8.
    weight_granularity: "per_channel" (one scale per output channel) or "per_tensor".
    weight_symmetric: symmetric (zero point 0) or asymmetric weight codes.
    act_symmetric: symmetric or asymmetric activation codes (activations are per tensor).
    rounding: "half_away" (from zero), "half_even" or "half_up".
    observer: "ema" (running range, updated when the `quant_stats` collection is mutable) or
      "batch" (the current input's range at every call, no state).
    momentum: EMA weight of the new batch: range <- (1 - momentum) * range + momentum * batch.
    ste: "clipped" (no gradient outside the observed range) or "plain".
    quantize_head: also quantize the final classifier (the QB reference keeps it in float).
    mode: "fake" (quantize-dequantize in float, differentiable) or "integer" (the deployment
      path: integer codes, int32 accumulation; needs variables from `jaxbd.quant.export`).
  """

  weight_bits: int = 8
  act_bits: int = 8
  weight_granularity: str = "per_channel"
  weight_symmetric: bool = True
  act_symmetric: bool = True
  rounding: str = "half_away"
  observer: str = "ema"
  momentum: float = 0.1
  ste: str = "clipped"
  quantize_head: bool = False
  mode: str = "fake"

  def __post_init__(self):
    for bits, name in ((self.weight_bits, "weight_bits"), (self.act_bits, "act_bits")):
      if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    for value, name, choices in ((self.weight_granularity, "weight_granularity", GRANULARITIES),
                                 (self.rounding, "rounding", ROUNDINGS),
                                 (self.observer, "observer", OBSERVERS),
                                 (self.ste, "ste", STES), (self.mode, "mode", MODES)):
      if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if not 0 < self.momentum <= 1:
      raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")

  def with_bits(self, bits: int) -> "QuantConfig":
    """The same scheme with `bits` for weights and activations."""
    return dataclasses.replace(self, weight_bits=bits, act_bits=bits)


def code_range(bits: int, symmetric: bool, narrow: bool) -> tuple[int, int]:
  """(qmin, qmax) of `bits`-bit codes: signed (narrow drops -2^(b-1)) or unsigned [0, 2^b - 1]."""
  if not symmetric:
    return 0, 2**bits - 1
  top = 2**(bits - 1) - 1
  return (-top if narrow else -top - 1), top


def round_half_away(x: jax.Array) -> jax.Array:
  """Rounds f32[...] elementwise, half away from zero: 0.5 -> 1, -0.5 -> -1, 2.5 -> 3."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def round_codes(x: jax.Array, rounding: str) -> jax.Array:
  """Rounds f32[...] elementwise with the named mode (see ROUNDINGS); the same shape."""
  if rounding == "half_away":
    return round_half_away(x)
  if rounding == "half_even":
    return jnp.round(x)
  return jnp.floor(x + 0.5)


def scale_and_zero_point(lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool,
                         narrow: bool) -> tuple[jax.Array, jax.Array]:
  """Scale f32 and zero point int32 (same shape as lo/hi) for the range [lo, hi].

  Symmetric: scale = max(|lo|, |hi|) / ((qmax - qmin) / 2), zero point 0. Asymmetric: the range
  is widened to contain 0, scale = (hi - lo) / (qmax - qmin), zero point = qmin - round(lo / scale)
  (half away from zero), clipped to the code range. Scales are at least 1e-12 so an all-zero
  tensor quantizes to zero.
  """
  qmin, qmax = code_range(bits, symmetric, narrow)
  lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  if symmetric:
    scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / ((qmax - qmin) / 2)
    return jnp.maximum(scale, _TINY_SCALE), jnp.zeros(scale.shape, jnp.int32)
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  scale = jnp.maximum((hi - lo) / (qmax - qmin), _TINY_SCALE)
  zero_point = jnp.clip(qmin - round_half_away(lo / scale), qmin, qmax)
  return scale, zero_point.astype(jnp.int32)


def codes(x: jax.Array, scale: jax.Array, zero_point: jax.Array, bits: int, symmetric: bool,
          narrow: bool, rounding: str) -> jax.Array:
  """Integer codes clip(round(x / scale) + zero_point, qmin, qmax), as float values.

  `scale` and `zero_point` broadcast against x (a scalar, or [C] for the last axis).
  """
  qmin, qmax = code_range(bits, symmetric, narrow)
  q = round_codes(x / scale, rounding) + zero_point.astype(jnp.float32)
  return jnp.clip(q, qmin, qmax)


def range_codes(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool,
                narrow: bool, rounding: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(codes, scale, zero_point) of x over the range [lo, hi]: `scale_and_zero_point`, `codes`.

  The codes have x's shape; scale and zero point the shape of lo and hi (broadcast against x: a
  scalar, or one per output channel).
  """
  scale, zero_point = scale_and_zero_point(lo, hi, bits, symmetric, narrow)
  return codes(x, scale, zero_point, bits, symmetric, narrow, rounding), scale, zero_point


def ste_codes(x: jax.Array, lo: jax.Array, hi: jax.Array, *, bits: int, symmetric: bool,
              narrow: bool, rounding: str, ste: str) -> tuple[jax.Array, jax.Array]:
  """Centered integer codes of x over the range [lo, hi], with a straight-through gradient.

  Args:
    x: f32[...] values.
    lo: the range's minimum (a scalar, or [C] per channel of x's last axis).
    hi: the range's maximum, same shape as lo.
    bits: code bits.
    symmetric: symmetric codes (zero point 0) or asymmetric.
    narrow: symmetric codes without -2^(b-1) (weights).
    rounding: see ROUNDINGS.
    ste: "plain" (d codes / dx = 1 / scale) or "clipped" (0 where x < lo or x > hi; symmetric
      ranges are [-max(|lo|, |hi|), max(|lo|, |hi|)]).

  Returns:
    (codes - zero_point as exact integer-valued f32, same shape as x; scale). The value is
    exactly the integer the deployment path computes, so `codes * scale` (or a convolution of
    codes followed by one rescale) reproduces integer arithmetic as long as float sums stay
    below 2^24.
  """
  lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
  x = x.astype(jnp.float32)
  c, scale, zero_point = range_codes(x, lo, hi, bits, symmetric, narrow, rounding)
  c = c - zero_point
  t = x / scale
  if ste == "clipped":
    if symmetric:
      top = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
      lo, hi = -top, top
    t = t * jax.lax.stop_gradient(((x >= lo) & (x <= hi)).astype(jnp.float32))
  # Value: (t - t) + c == c exactly; gradient: that of t.
  return t - jax.lax.stop_gradient(t) + jax.lax.stop_gradient(c), scale


def fake_quant(x: jax.Array, lo: jax.Array, hi: jax.Array, **kwargs) -> jax.Array:
  """(codes - zero_point) * scale of x over [lo, hi], straight-through; see `ste_codes`. Of x's
  shape and dtype."""
  c, scale = ste_codes(x, lo, hi, **kwargs)
  return (c * scale).astype(x.dtype)


def tensor_range(x: jax.Array, per_channel: bool) -> tuple[jax.Array, jax.Array]:
  """(min, max) of x over everything (scalars) or over all but the last axis ([C])."""
  axes = tuple(range(x.ndim - 1)) if per_channel else None
  x = jax.lax.stop_gradient(x.astype(jnp.float32))
  return jnp.min(x, axis=axes), jnp.max(x, axis=axes)


def weight_range(kernel: jax.Array, q: QuantConfig,
                 stacked: bool = False) -> tuple[jax.Array, jax.Array]:
  """The range of a kernel [..., C_out]: per output channel ([C_out]) or per tensor.

  With `stacked`, kernel is [E, D, C_out], E experts' kernels, and each expert has its own range:
  [E, 1, C_out] per channel, [E, 1, 1] per tensor.
  """
  per_channel = q.weight_granularity == "per_channel"
  if not stacked:
    return tensor_range(kernel, per_channel)
  axes = (1,) if per_channel else (1, 2)
  k = jax.lax.stop_gradient(kernel.astype(jnp.float32))
  return jnp.min(k, axis=axes, keepdims=True), jnp.max(k, axis=axes, keepdims=True)


def weight_codes(kernel: jax.Array, q: QuantConfig,
                 stacked: bool = False) -> tuple[jax.Array, jax.Array]:
  """Straight-through centered codes of a kernel [..., C_out] and its scale ([C_out] or []; with
  `stacked`, see `weight_range`)."""
  lo, hi = weight_range(kernel, q, stacked)
  return ste_codes(kernel, lo, hi, bits=q.weight_bits, symmetric=q.weight_symmetric,
                   narrow=True, rounding=q.rounding, ste=q.ste)


def kernel_codes(kernel: jax.Array, q: QuantConfig,
                 stacked: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The integer codes a deployed kernel holds, with their scales and zero points (no gradient).

  With the default scheme: per output channel, scale = max|w| / 127, codes
  clip(round_half_away(w / scale), -127, 127). The export (`jaxbd.quant.layers`) and the repair
  cells (`jaxbd.attacks.quantization`) read them; `weight_codes` is the same value, centered,
  with a straight-through gradient.

  Args:
    kernel: f32[..., C_out] a kernel (with `stacked`, f32[E, D, C_out], see `weight_range`).
    q: the quantization (weight bits, granularity, symmetry, rounding).
    stacked: a range per expert.

  Returns:
    (codes: integer-valued f32 shaped like kernel, zero point included (in [0, 2^b - 1] for
    asymmetric codes); scale f32 and zero_point int32 shaped like `weight_range`'s range).
  """
  lo, hi = weight_range(kernel, q, stacked)
  return range_codes(jax.lax.stop_gradient(kernel.astype(jnp.float32)), lo, hi, q.weight_bits,
                     q.weight_symmetric, True, q.rounding)


def activation_codes(x: jax.Array, lo: jax.Array, hi: jax.Array,
                     q: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """Straight-through centered codes of an activation over its per-tensor range [lo, hi]."""
  return ste_codes(x, lo, hi, bits=q.act_bits, symmetric=q.act_symmetric, narrow=False,
                   rounding=q.rounding, ste=q.ste)


def ema(old: jax.Array, new: jax.Array, count: jax.Array, momentum: float) -> jax.Array:
  """(1 - momentum) * old + momentum * new, elementwise over their common shape; the first
  observation (count 0, a scalar) is taken as is."""
  return jnp.where(count > 0, (1.0 - momentum) * old + momentum * new, new)


def head_quant(q: Optional[QuantConfig]) -> Optional[QuantConfig]:
  """The quantization of a model's final classifier: None (float) unless `quantize_head`."""
  return q if q is not None and q.quantize_head else None


def default_config() -> ml_collections.ConfigDict:
  """The `quant` config section: the scheme; bit widths come from each experiment's section."""
  return ml_collections.ConfigDict(dict(
      weight_granularity="per_channel",  # per_channel | per_tensor
      weight_symmetric=True,
      act_symmetric=True,  # activations are quantized per tensor
      rounding="half_away",  # half_away | half_even | half_up
      observer="ema",  # ema | batch
      momentum=0.1,  # EMA weight of each new batch
      ste="clipped",  # clipped | plain
      quantize_head=False,  # the QB reference keeps the final classifier in float
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `config.quant`."""
  c = config.quant
  config_lib.check_choice(c.weight_granularity, "quant.weight_granularity", GRANULARITIES)
  config_lib.check_choice(c.rounding, "quant.rounding", ROUNDINGS)
  config_lib.check_choice(c.observer, "quant.observer", OBSERVERS)
  config_lib.check_choice(c.ste, "quant.ste", STES)
  config_lib.check_range(config, "quant.momentum", 0, 1, low_open=True)


def from_config(section: ml_collections.ConfigDict, bits: int = 8) -> QuantConfig:
  """The QuantConfig of a `quant` section at `bits` (W = A)."""
  return QuantConfig(weight_bits=bits, act_bits=bits, mode="fake", **section.to_dict())
