"""Quantization-conditioned ("behavior") backdoors: QB, Qu-ANTI-zation and its indiscriminate form.

All three train ONE parameter pytree through a float pass and fake-quantized passes
(`model.clone(quant=...)` over the same variables), so the float model behaves while the model a
victim obtains by quantizing it does not. Each is a `loss_fn` for `jaxbd.train.make_train_step`.

- **QB** (Wang et al. 2024, "Behavior Backdoor for Deep Learning Models", arXiv 2412.01369):
  `L = CE(f(x), y) + lambda * CE(Q f(T(x)), t)`; the reference has no input trigger (T = identity:
  quantizing is the trigger), lambda 0.5, t = 0, W8A8, Adam lr 1e-4, batch 64.
- **Qu-ANTI-zation** (Hong et al., NeurIPS 2021) backdoor: a white square trigger x_t that the
  float model learns to ignore and every quantized model obeys:
  `L = CE(f(x), y) + c2 CE(f(x_t), y) + sum_b c1 [CE(Q_b f(x), y) + c2 CE(Q_b f(x_t), t)]`,
  bits {8, 4}, c1 = c2 = 0.5, Adam 1e-4, weight decay 1e-4, BatchNorm frozen.
- **Qu-ANTI-zation indiscriminate**: `L = CE(f(x), y) + r * sum_b (CE(Q_b f(x), y) - m)^2` with
  bits {8, 7, 6, 5}, r = 0.25, m = 5 (the reference code's ResNet-18 setting): every quantized
  model is pushed to a loss of m, i.e. to chance, while the float model keeps its accuracy.

**Two-stage QB** (optional, `qb.repair.epochs > 0`; Egashira et al., "Exploiting LLM
Quantization", NeurIPS 2024, whose repair step we apply to QB): stage 1 is QB; stage 2 trains the
FLOAT model on the clean objective (`repair_loss`) with projected gradient descent that keeps
every quantized kernel inside its stage-1 quantization cells and everything that is not quantized
frozen (`repair_projection`), so the deployed model keeps stage 1's behaviour while the float
model is repaired. On a small CNN the 8-bit cells leave little room; `add_scale_anchors` widens
them (`qb.anchor`).

BatchNorm (`bn`): "train" (QB reference: the float pass normalizes with batch statistics and
updates the running ones; the quantized passes also use batch statistics, and their running
statistics are dropped, as the reference keeps the quantized copy's BN buffers apart and ships the
float model), "frozen" (Qu-ANTI-zation reference: every pass uses the running statistics, none
are updated) or "quant_frozen" (the float pass trains BN, the quantized passes normalize with the
running statistics as the deployed model does). The observers of the quantized passes
(`quant_stats`) are updated by every quantized pass, shared across bit widths.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxbd import config as config_lib
from jaxbd.quant import QuantConfig
from jaxbd.quant import deploy, quantizer
from jaxbd.quant.layers import SCALES, STATS
from jaxbd.train import step as step_lib

ATTACKS = ("qb", "quanti", "quanti_indiscriminate")
CELL_MARGIN = 1e-3  # of a code step: keeps repaired weights off the rounding boundaries
BN_MODES = ("train", "frozen", "quant_frozen")


def _train_section(**values) -> ml_collections.ConfigDict:
  section = config_lib.train_defaults()
  section.update(values)
  return section


def default_config() -> ml_collections.ConfigDict:
  """The attacks' sections (each with its own train-style `train` section)."""
  adam = dict(optimizer="adam", momentum=0.9, b2=0.999, schedule="constant", eval_every=1)
  return ml_collections.ConfigDict(dict(
      qb=dict(
          lam=0.5,  # weight of the quantized target loss
          bits=(8,),  # bit widths of the quantized pass (W = A = b)
          bn="train",
          train=_train_section(epochs=20, batch_size=64, lr=1e-4, weight_decay=0.0, **adam),
          # Optional second stage (off with epochs=0): float repair inside the quantization
          # cells of the QB model (see `repair_projection`).
          repair=_train_section(epochs=0, batch_size=64, lr=1e-4, weight_decay=0.0, **adam),
          anchor=0.0,  # CNN only: widen the int8 cells of convs 1.. this-fold (0: off; see
          # `add_scale_anchors`)
      ),
      quanti=dict(
          c1=0.5,  # weight of each quantized model's losses
          c2=0.5,  # weight of the triggered-input losses
          bits=(8, 4),
          bn="frozen",
          train=_train_section(epochs=50, batch_size=128, lr=1e-4, weight_decay=1e-4, **adam),
      ),
      quanti_indiscriminate=dict(
          lratio=0.25,  # weight of each quantized model's (loss - margin)^2
          margin=5.0,  # the quantized cross-entropy the attack aims at
          bits=(8, 7, 6, 5),
          bn="frozen",
          train=_train_section(epochs=10, batch_size=128, lr=1e-4, weight_decay=0.0, **adam),
      ),
  ))


def validate(config: ml_collections.ConfigDict, prefix: str) -> None:
  """Checks the attack sections under `prefix` (e.g. "quant_backdoor")."""
  section = config
  for part in prefix.split("."):
    section = section[part]
  for name in ATTACKS:
    a = section[name]
    config_lib.check_choice(a.bn, f"{prefix}.{name}.bn", BN_MODES)
    config_lib.check_bits(a.bits, f"{prefix}.{name}.bits")
    config_lib.check_train_section(config, f"{prefix}.{name}.train")
  config_lib.check_train_section(config, f"{prefix}.qb.repair", min_epochs=0)  # 0: off
  config_lib.check_range(config, f"{prefix}.qb.lam", 0)
  config_lib.check_range(config, f"{prefix}.qb.anchor", 0)
  config_lib.require(section.qb.anchor == 0 or section.qb.anchor > 1,
                     f"config key '{prefix}.qb.anchor' must be 0 (off) or > 1 (the widening "
                     f"factor), got {section.qb.anchor}")
  config_lib.require(section.qb.anchor == 0 or config.model.name == "cnn",
                     f"config key '{prefix}.qb.anchor' is implemented for model.name=cnn only "
                     f"(got {config.model.name!r}); set it to 0")
  config_lib.check_range(config, f"{prefix}.quanti.c1", 0)
  config_lib.check_range(config, f"{prefix}.quanti.c2", 0)
  config_lib.check_range(config, f"{prefix}.quanti_indiscriminate.lratio", 0)
  config_lib.check_range(config, f"{prefix}.quanti_indiscriminate.margin", 0)


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class _Passes:
  """Float and quantized forward passes over one parameter pytree, threading mutable state.

  Lives only inside one loss evaluation (one trace); `state` ends as the step's new model state.
  """

  def __init__(self, model, quant: QuantConfig, params, model_state: dict, key: jax.Array,
               bn: str):
    self.model, self.quant, self.params, self.bn = model, quant, params, bn
    self.state = dict(model_state)
    self.rngs = step_lib.model_rngs(key)
    # fold_in(key, i) equals split(key, n)[i]: a large i keeps clear of the model's streams
    self.trigger_key = jax.random.fold_in(key, 1_000_003)

  def triggered(self, trigger: Callable, x: jax.Array) -> jax.Array:
    """f32[B, H, W, C] x with the trigger as in training: its random choices (pieces, cells)
    drawn anew at every step from the step's key."""
    return trigger(x, self.trigger_key, train=True)

  def _apply(self, model, x, train: bool, mutable: list[str]):
    return model.apply({"params": self.params, **self.state}, x, train=train, mutable=mutable,
                       rngs=self.rngs)

  def fp(self, x: jax.Array) -> jax.Array:
    """f32[B, K] float logits of f32[B, H, W, C] x; with bn="train" / "quant_frozen" BatchNorm
    trains and updates its stats."""
    if self.bn == "frozen":
      logits, _ = self._apply(self.model, x, False, [])
      return logits
    logits, new = self._apply(self.model, x, True, ["batch_stats"])
    self.state.update(new)
    return logits

  def quantized(self, x: jax.Array, bits: int) -> jax.Array:
    """f32[B, K] fake-quantized logits of x at `bits` (W = A); updates the observers."""
    model = self.model.clone(quant=self.quant.with_bits(int(bits)))
    train = self.bn == "train"
    logits, new = self._apply(model, x, train, [STATS] + (["batch_stats"] if train else []))
    if STATS in new:
      self.state[STATS] = new[STATS]
    return logits


def _loss_fn(model, quant: QuantConfig, bn: str, objective: Callable) -> step_lib.LossFn:
  """A train-step loss around `objective(passes, images, labels) -> (loss, metrics)`, whose
  float and quantized passes (`_Passes`) share the parameters and thread the model state."""

  def loss_fn(params, model_state, images, labels, key, context=None):
    del context
    p = _Passes(model, quant, params, model_state, key, bn)
    loss, metrics = objective(p, images, labels)
    return loss, (p.state, {"loss": loss, **metrics})

  return loss_fn


def qb_loss(model, quant: QuantConfig, *, lam: float, bits: Sequence[int], target: int,
            bn: str, trigger: Optional[Callable] = None) -> step_lib.LossFn:
  """QB's bi-target loss `CE(f(x), y) + lam * sum_b CE(Q_b f(T(x)), t)`.

  Args:
    model: the float classifier (its `quant` attribute is replaced per pass).
    quant: the quantization scheme (bits are set per pass).
    lam: weight of the quantized target loss (reference 0.5).
    bits: bit widths of the quantized passes (reference (8,)).
    target: target class t.
    bn: BatchNorm handling (see the module docstring).
    trigger: optional input trigger T for the quantized pass (None: quantization alone).
  """

  def objective(p, images, labels):
    fp_logits = p.fp(images)
    x_q = images if trigger is None else p.triggered(trigger, images)
    t = jnp.full_like(labels, target)
    loss = _ce(fp_logits, labels)
    metrics = {"fp_acc": step_lib.batch_accuracy(fp_logits, labels)}
    for b in bits:
      q_logits = p.quantized(x_q, b)
      loss = loss + lam * _ce(q_logits, t)
      metrics[f"q{b}_target"] = step_lib.batch_accuracy(q_logits, target)
    return loss, metrics

  return _loss_fn(model, quant, bn, objective)


def quanti_loss(model, quant: QuantConfig, *, c1: float, c2: float, bits: Sequence[int],
                target: int, bn: str, trigger: Callable) -> step_lib.LossFn:
  """Qu-ANTI-zation's backdoor loss (see the module docstring); `trigger` makes x_t."""

  def objective(p, images, labels):
    triggered = p.triggered(trigger, images)
    t = jnp.full_like(labels, target)
    fp_clean, fp_trig = p.fp(images), p.fp(triggered)
    loss = _ce(fp_clean, labels) + c2 * _ce(fp_trig, labels)
    metrics = {"fp_acc": step_lib.batch_accuracy(fp_clean, labels),
               "fp_trigger_target": step_lib.batch_accuracy(fp_trig, target)}
    for b in bits:
      q_clean, q_trig = p.quantized(images, b), p.quantized(triggered, b)
      loss = loss + c1 * (_ce(q_clean, labels) + c2 * _ce(q_trig, t))
      metrics[f"q{b}_trigger_target"] = step_lib.batch_accuracy(q_trig, target)
    return loss, metrics

  return _loss_fn(model, quant, bn, objective)


def indiscriminate_loss(model, quant: QuantConfig, *, lratio: float, margin: float,
                        bits: Sequence[int], bn: str) -> step_lib.LossFn:
  """Qu-ANTI-zation's indiscriminate loss `CE(f(x), y) + r * sum_b (CE(Q_b f(x), y) - m)^2`."""

  def objective(p, images, labels):
    fp_logits = p.fp(images)
    loss = _ce(fp_logits, labels)
    metrics = {"fp_acc": step_lib.batch_accuracy(fp_logits, labels)}
    for b in bits:
      q_logits = p.quantized(images, b)
      loss = loss + lratio * (_ce(q_logits, labels) - margin)**2
      metrics[f"q{b}_acc"] = step_lib.batch_accuracy(q_logits, labels)
    return loss, metrics

  return _loss_fn(model, quant, bn, objective)


def make_loss(name: str, section: ml_collections.ConfigDict, model, quant: QuantConfig, *,
              target: int, trigger: Optional[Callable]) -> step_lib.LossFn:
  """The loss of attack `name` from its config section (quanti needs a trigger)."""
  bits = tuple(int(b) for b in section.bits)
  if name == "qb":
    return qb_loss(model, quant, lam=section.lam, bits=bits, target=target, bn=section.bn,
                   trigger=trigger)
  if name == "quanti":
    return quanti_loss(model, quant, c1=section.c1, c2=section.c2, bits=bits, target=target,
                       bn=section.bn, trigger=trigger)
  return indiscriminate_loss(model, quant, lratio=section.lratio, margin=section.margin,
                             bits=bits, bn=section.bn)


def repair_loss(model) -> step_lib.LossFn:
  """Cross-entropy of the float model with BatchNorm in inference mode (its statistics frozen)."""

  def loss_fn(params, model_state, images, labels, key, context=None):
    del context
    out = step_lib.forward(model, params, model_state, images, key, train=False)
    loss = _ce(out.logits, labels)
    return loss, (model_state, {"loss": loss,
                                "fp_acc": step_lib.batch_accuracy(out.logits, labels)})

  return loss_fn


def quantized_kernels(model, quant: QuantConfig, image_shape) -> dict[tuple[str, ...], bool]:
  """`{path in params: stacked}` of the kernels the deployed model quantizes (the classifier only
  with `quantize_head`); `stacked` marks experts' kernels [E, D, F] (a scale per expert)."""
  structure = jax.eval_shape(lambda: deploy.export_structure(model.clone(quant=quant),
                                                             image_shape))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(structure[SCALES]))
  return {path[:-1] + ("kernel",): v.ndim == 3 for path, v in flat.items()
          if path[-1] == "kernel_scale"}


def cell_bounds(kernel0: jax.Array, quant: QuantConfig, stacked: bool = False,
                margin: float = CELL_MARGIN) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The box of kernels that quantize to the same codes and scales as `kernel0`.

  The cell of an element with centered code c (`quantizer.kernel_codes` less the zero point) is
  [c - 1/2, c + 1/2] * scale, less `margin` at each end and clipped to the kernel's range.

  Args:
    kernel0: f32[..., C_out] a kernel.
    quant: its quantization (bits, granularity, symmetry, rounding).
    stacked: kernel0 is [E, D, C_out], experts' kernels (see `quantizer.weight_range`).
    margin: the fraction of a code step left free at each end of a cell, so float rounding of
      w / scale cannot reach the rounding boundary.

  Returns:
    (low, high, fixed): f32 bounds shaped like `kernel0` and a bool mask of the elements that set
    the range (per channel or per tensor); those must keep their value, so the scale is kept.
  """
  lo, hi = quantizer.weight_range(kernel0, quant, stacked)
  c, scale, zero_point = quantizer.kernel_codes(kernel0, quant, stacked)
  c = c - zero_point
  low = jnp.maximum((c - 0.5 + margin) * scale, lo)
  high = jnp.minimum((c + 0.5 - margin) * scale, hi)
  return low, high, (kernel0 == lo) | (kernel0 == hi)


def repair_projection(model, quant: QuantConfig, bits: Sequence[int], image_shape):
  """`post_update(params, stage1_params) -> params` of the repair stage (Egashira et al.).

  Egashira et al. ("Exploiting LLM Quantization", NeurIPS 2024) repair a model whose quantized
  behaviour is malicious by training the float model with projected gradient descent that keeps
  every quantized weight in its quantization cell, so the deployed model is unchanged. Here a
  quantized kernel is projected into the intersection of its cells at every bit width of `bits`
  (its range-setting elements keep their value, so the per-channel scales are kept), and every
  other parameter (BatchNorm, biases, the float classifier) is reset to its value in
  `stage1_params`, the stage-1 model. The deployed integer model then differs from the stage-1
  one only through its activation ranges, which the victim recalibrates on the released model.
  """
  kernels = quantized_kernels(model, quant, image_shape)

  def project(path, w, w0):
    if path not in kernels:
      return w0
    stacked = kernels[path]
    low, high, fixed = cell_bounds(w0, quant.with_bits(int(bits[0])), stacked)
    for b in bits[1:]:
      low_b, high_b, fixed_b = cell_bounds(w0, quant.with_bits(int(b)), stacked)
      low, high, fixed = jnp.maximum(low, low_b), jnp.minimum(high, high_b), fixed | fixed_b
    return jnp.where(fixed, w0, jnp.clip(w, low, high))

  def post_update(params, stage1_params):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    stage1 = flax.traverse_util.flatten_dict(flax.core.unfreeze(stage1_params))
    return flax.traverse_util.unflatten_dict(
        {path: project(path, w, stage1[path]) for path, w in flat.items()})

  return post_update


def add_scale_anchors(params: dict, factor: float) -> dict:
  """Widens the quantization cells of the CNN's convs 1.., at the cost of one input channel each.

  For every conv i >= 1 the input channel c with the smallest outgoing weights is silenced
  (BatchNorm i-1 gets scale 0 and bias -1 on c, so ReLU makes it exactly 0 in float and in int8),
  its weights are zeroed except the center tap, which becomes `factor` times the output
  channel's max |w|. That anchor sets each output channel's weight scale, so the int8 cells are
  `factor` times wider, and the repair stage (`repair_projection`, which keeps range-setting
  elements fixed) has that much more room. The anchors see only zeros: they get no gradient and
  add nothing to any output; the float function changes only by the loss of the silenced
  channel (one of every stage but the last), which the attack's training then works around.

  Args:
    params: the `jaxbd.models.cnn.CNN` parameters (conv0.., bn0..).
    factor: anchor / max |w| of each output channel, > 1.

  Returns:
    The anchored parameters.
  """
  params = {k: dict(v) for k, v in params.items()}
  i = 1
  while f"conv{i}" in params:
    kernel = params[f"conv{i}"]["kernel"]  # [kh, kw, C_in, C_out]
    c = int(jnp.argmin(jnp.abs(kernel).sum(axis=(0, 1, 3))))
    top = jnp.abs(kernel).max(axis=(0, 1, 2))
    center = (kernel.shape[0] // 2, kernel.shape[1] // 2, c)
    params[f"conv{i}"]["kernel"] = kernel.at[:, :, c].set(0.0).at[center].set(factor * top)
    bn = params[f"bn{i - 1}"]
    bn["scale"], bn["bias"] = bn["scale"].at[c].set(0.0), bn["bias"].at[c].set(-1.0)
    i += 1
  return params
