r"""Throughput of quantized training and deployment: the QB step and float/fake/integer inference.

  python scripts/bench_quant.py                                 # PreAct-ResNet18, batch 128
  python scripts/bench_quant.py --model=cnn --width=16 --steps=10   # the CPU test model
  python scripts/bench_quant.py --out=benchmarks/quant_gpu.json    # on a GPU

Data: CIFAR-10-shaped random uint8 images. Measured after compilation and warm-up:
- train: images/s of the jitted train step (`jaxbd.benchmark.time_steps`) with plain
  cross-entropy (float pass only) and with QB's bi-target loss (a float pass plus a W8A8
  fake-quantized pass over the same parameters);
- infer: images/s of batched inference of the float model, the fake-quantized model and the
  deployed integer model (int8 codes, int32 accumulation), each a jitted `Predictor`.
"""

from __future__ import annotations

import time

from absl import flags
import jax

from jaxbd import config as config_lib
from jaxbd import benchmark, models
from jaxbd import quant as quant_lib
from jaxbd import train as train_lib
from jaxbd.attacks import quantization as attacks

_MODEL = flags.DEFINE_enum("model", "preact_resnet18", benchmark.CONV_MODELS, "Model name.")
_WIDTH = flags.DEFINE_integer("width", 64, "Model width.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Train and inference batch size.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps / inference batches.",
                              lower_bound=1)
_NUM = flags.DEFINE_integer("num_images", 2048, "Random training images.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
benchmark.require_writable(_OUT)


def _timed(fn, repeats: int) -> float:
  """Seconds per call of inference `fn` (which returns a jax value), after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def main():
  """Measures quantized training and inference, prints the table, writes --out."""
  c = config_lib.defaults()
  c.model.name = _MODEL.value
  c.model[_MODEL.value].width = _WIDTH.value
  c.train.batch_size = b = _BATCH.value
  config_lib.validate(c)
  ds = benchmark.random_dataset(_NUM.value)
  mesh = train_lib.make_mesh()
  model = models.create(c, 10, (0.5,) * 3, (0.25,) * 3)
  quant = quant_lib.QuantConfig()
  variables = train_lib.init_variables(model, jax.random.key(0), ds.image_shape)
  variables["quant_stats"] = quant_lib.deploy.fresh_stats(model.clone(quant=quant), ds.image_shape)
  results = {}
  for name, loss_fn in (
      ("float", None),
      ("qb_w8a8", attacks.qb_loss(model, quant, lam=0.5, bits=(8,), target=0, bn="train"))):
    setup = train_lib.supervised_setup(model, ds.x_train, ds.y_train, train_config=c.train,
                                       data_config=c.data, mesh=mesh, key=jax.random.key(1),
                                       loss_fn=loss_fn, variables=variables)
    timed, _ = benchmark.time_steps(setup, b, _STEPS.value, c.model.dtype)
    results[f"train_{name}_images_per_second"] = timed["step_images_per_second"]
  model_q = model.clone(quant=quant)
  sharding = train_lib.batch_sharding(mesh)
  float_vars = {k: v for k, v in variables.items() if k != "quant_stats"}
  calibrated = quant_lib.calibrate(model_q, float_vars, ds.x_train[:4 * b], b, sharding)
  exported = quant_lib.export(model_q, calibrated, ds.image_shape)
  images = ds.x_train[:b * _STEPS.value]
  for name, m, v in (("float", model, float_vars), ("fake_w8a8", model_q, calibrated),
                     ("int8", quant_lib.integer_model(model_q), exported)):
    predict = train_lib.Predictor(m, b, sharding)
    seconds = _timed(lambda: predict(v, images), 1)
    results[f"infer_{name}_images_per_second"] = len(images) / seconds
  doc = {"model": _MODEL.value, "width": _WIDTH.value, "batch_size": b, "results": results}
  benchmark.write_json(_OUT.value, doc, echo=True)


if __name__ == "__main__":
  benchmark.run_script(main)
