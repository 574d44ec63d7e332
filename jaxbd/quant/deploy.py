"""Post-training deployment: calibrate the observers, export int8 codes with scales, run integers.

This is what a victim does with a released float model, and what "after quantization" means in
every jaxbd metric:

1. `calibrate(model_q, variables, images)`: fresh `ema` observers run over clean calibration
   images with BatchNorm in inference mode (the attacker's observer state, if any, is dropped).
2. `export(model_q, variables, image_shape)`: one fake-quant pass with the `quant_scales`
   collection mutable records, per quantized layer, the kernel's integer codes (int8; uint8 for
   asymmetric codes), per-channel kernel scales and zero points, and the input scale and zero
   point. The codes replace the float kernels in `params`; BatchNorm, biases and the float
   classifier stay float (the QB reference keeps BN and the classifier in float).
3. `integer_model(model_q)` runs those variables with integer codes, int32 accumulation and one
   float rescale per layer. It agrees with the fake-quant pass up to float accumulation order: the
   same predictions, logits within ~1e-4 relative (see tests/test_quant.py).

`save_export` / `load_export` store an export as one `.npz` (arrays under "/"-joined variable
paths, the QuantConfig as JSON), written atomically; an unreadable or mismatched file raises
`CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxbd import fileio
from jaxbd.data.pipeline import to_unit
from jaxbd.errors import CheckpointError
from jaxbd.quant.layers import SCALES, STATS
from jaxbd.quant.quantizer import QuantConfig
from jaxbd.train.evaluate import padded_batches
from jaxbd.train.mesh import Throttle

_CONFIG_KEY = "__quant_config__"


def _require_fake(model) -> QuantConfig:
  q = getattr(model, "quant", None)
  if q is None or q.mode != "fake":
    raise ValueError("expected a fake-quantized model: model.clone(quant=QuantConfig(...))")
  return q


def fresh_stats(model, image_shape) -> Optional[dict]:
  """Zero `quant_stats` (count 0: the first observation is taken as is) of a fake-quant model."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
  if STATS not in shapes:
    return None
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[STATS])


def calibrate(model, variables: dict, images: np.ndarray, batch_size: int,
              batch_sharding=None) -> dict:
  """Runs fresh EMA observers over calibration images; returns variables with `quant_stats`.

  Args:
    model: a fake-quantized model (`quant.observer == "ema"`; "batch" needs no calibration and
      returns `variables` without `quant_stats`).
    variables: float variables (params, batch_stats, ...); any `quant_stats` are replaced.
    images: uint8[M, H, W, C] clean calibration images, in order; the last batch is padded with
      repeats of its last image (the range is unchanged; the EMA weights that batch as one).
    batch_size: images per observer update.
    batch_sharding: optional sharding of the batch axis.
  """
  q = _require_fake(model)
  base = {k: v for k, v in variables.items() if k != STATS}
  if q.observer != "ema":
    return base
  stats = fresh_stats(model, images.shape[1:])
  throttle = Throttle()
  for _, chunk, _ in padded_batches(images, batch_size):
    stats = throttle(_observe(model, batch_sharding, base, stats, chunk))
  return {**base, STATS: stats}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _observe(model, batch_sharding, variables: dict, stats, batch: jax.Array):
  """One observer update on a uint8 batch (compiled once per model, sharding and shapes)."""
  x = to_unit(batch)
  if batch_sharding is not None:
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
  _, new = model.apply({**variables, STATS: stats}, x, train=False, mutable=[STATS])
  return new[STATS]


def export(model, variables: dict, image_shape) -> dict:
  """Integer variables of a calibrated fake-quant model (see the module docstring).

  Args:
    model: the fake-quantized model.
    variables: its variables, calibrated (`quant_stats`) for the `ema` observer.
    image_shape: (H, W, C) of its inputs.

  Returns:
    `{"params": params with integer kernels, "quant_scales": ..., other float collections}`
    for `integer_model(model)`.

  Raises:
    ValueError: the observers were never run (EMA count 0).
  """
  q = _require_fake(model)
  if q.observer == "ema":
    counts = [int(c) for path, c in _flat(variables.get(STATS, {})).items()
              if path.endswith("/count")]
    if not counts or min(counts) == 0:
      raise ValueError("the activation observers are not calibrated; run "
                       "jaxbd.quant.calibrate first")
  return _export(model, variables, image_shape)


def _export(model, variables: dict, image_shape) -> dict:
  scales = _flat(_scales_pass(model, tuple(image_shape), variables))
  params = _flat(variables["params"])
  for path in [p for p in scales if p.endswith("/kernel_codes")]:
    params[path[:-len("kernel_codes")] + "kernel"] = scales.pop(path)
  rest = {k: v for k, v in variables.items()
          if k not in ("params", "intermediates", STATS, SCALES)}
  return {**rest, "params": _unflat(params), SCALES: _unflat(scales)}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scales_pass(model, image_shape: tuple, variables: dict) -> dict:
  """The `quant_scales` a fake-quant pass records (the input values do not matter)."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  _, out = model.apply(variables, dummy, train=False, mutable=[SCALES])
  return out[SCALES]


def integer_model(model):
  """The integer-arithmetic twin of a fake-quantized model (runs `export`ed variables)."""
  q = _require_fake(model)
  return model.clone(quant=dataclasses.replace(q, mode="integer"))


def _flat(tree: Any) -> dict[str, Any]:
  tree = flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _unflat(flat: dict[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def save_export(path: str, exported: dict, quant: QuantConfig) -> None:
  """Writes an export and its QuantConfig to `path` (.npz) atomically (temp file + rename)."""
  arrays = {k: np.asarray(v) for k, v in _flat(exported).items()}
  arrays[_CONFIG_KEY] = np.asarray(json.dumps(dataclasses.asdict(quant)))
  with fileio.atomic_file(path, "wb") as f:
    np.savez(f, **arrays)


def load_export(path: str, model=None, image_shape=None) -> tuple[dict, QuantConfig]:
  """Reads a file written by `save_export`: (integer variables, QuantConfig).

  With `model` (the fake-quantized model) and `image_shape`, also checks that the file holds
  exactly the variables that model's export has, with the same shapes and dtypes.

  Raises:
    CheckpointError: the file is missing, corrupt, or does not fit the model.
  """
  try:
    with fileio.load_npz(path) as z:
      arrays = {k: z[k] for k in z.files}
    quant = QuantConfig(**json.loads(str(arrays.pop(_CONFIG_KEY))))
  except (*fileio.NPZ_ERRORS, TypeError) as e:
    raise CheckpointError(f"quantized export {path} is unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
  if model is not None:
    expected = jax.eval_shape(lambda: export_structure(model, image_shape))
    want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in _flat(expected).items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}
    if want != got:
      diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
      raise CheckpointError(f"quantized export {path} does not fit this model (first "
                            f"difference: {diff[0]})")
  return _unflat(arrays), quant


def export_structure(model, image_shape) -> dict:
  """The export of freshly initialized, calibrated variables (shapes and dtypes reference)."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init(jax.random.key(0), dummy, train=False)
  variables = {k: v for k, v in variables.items() if k != "intermediates"}
  if STATS in variables:
    variables[STATS] = jax.tree.map(jnp.ones_like, variables[STATS])
  return _export(model, variables, image_shape)
