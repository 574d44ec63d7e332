r"""Training throughput of jaxbd: the jitted train step and a full epoch, with poisoning and
augmentation.

  python scripts/bench_train.py                       # PreAct-ResNet18, batch 128 and 512
  python scripts/bench_train.py --num_train=1024 --steps=3          # CPU figures of the README
  python scripts/bench_train.py --dtype=bfloat16 --out=benchmarks/train_gpu_bf16.json   # GPU
  python scripts/bench_train.py --trigger=refool --every_row --batch_sizes=128 --noepoch

Data: CIFAR-10-shaped random uint8 images (N x 32 x 32 x 3, 10 classes), or a real dataset with
--source. Every step gathers its batch from the device-resident uint8 training set, applies the
trigger (`--trigger`, default BadNets) to the 10% planned rows, random-crops (padding 4) and
flips, normalizes and runs forward + backward + SGD, all inside one jitted function (see
jaxbd.benchmark).

- step: images/s of `--steps` consecutive train steps after 2 warm-up steps (compile excluded),
  with achieved TFLOP/s and MFU where XLA reports FLOPs and the device's peak is known.
- epoch: images/s of one whole epoch through `jaxbd.train.fit` (epoch permutation, all steps,
  final sync), after a warm-up epoch that compiles.
- with `--every_row`, the step again with the trigger run on every row of the batch instead of
  its marked rows only (`jaxbd.poison.poison_fn`), the reference for that saving.
"""

from __future__ import annotations

from absl import flags
import jax

from jaxbd import benchmark, models, poison
from jaxbd import config as config_lib

_MODEL = flags.DEFINE_enum("model", "preact_resnet18", list(models.MODELS), "Model name.")
_WIDTH = flags.DEFINE_integer("width", 64,
                              "Width of cnn / preact_resnet18 / resnet18 (64: the papers').",
                              lower_bound=1)
_BATCHES = flags.DEFINE_list("batch_sizes", ["128", "512"], "Batch sizes to measure.")
benchmark.require_positive_ints(_BATCHES)
_STEPS = flags.DEFINE_integer("steps", 50, "Timed train steps per batch size.", lower_bound=1)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 50000, "Training images.", lower_bound=1)
_SOURCE = flags.DEFINE_string("source", "", "A jaxbd data source instead of random data.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", benchmark.DTYPES, "Compute dtype.")
_TRIGGER = flags.DEFINE_enum("trigger", "badnets", sorted(set(poison.TRIGGERS) - {"badpatches"}),
                             "Trigger of the poisoned rows (its config defaults).")
_EPOCH = flags.DEFINE_bool("epoch", True, "Also time a full epoch.")
_EVERY_ROW = flags.DEFINE_bool(
    "every_row", False, "Also time the train step with the trigger run on every row of the batch "
    "(the reference for running it on the marked rows only).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
benchmark.require_writable(_OUT)


def main():
  """Measures each batch size, prints the table, writes --out."""
  config = config_lib.defaults()
  config.model.name = _MODEL.value
  config.model.dtype = _DTYPE.value
  if _MODEL.value in benchmark.CONV_MODELS:
    config.model[_MODEL.value].width = _WIDTH.value
  config.poison.name = _TRIGGER.value
  config_lib.validate(config)
  ds = benchmark.training_data(config.data, _SOURCE.value, _NUM_TRAIN.value)
  rows = []
  for b in map(int, _BATCHES.value):
    rows.append(benchmark.train_throughput(config, ds, b, steps=_STEPS.value, epoch=_EPOCH.value))
    if _EVERY_ROW.value:
      every = benchmark.train_throughput(config, ds, b, steps=_STEPS.value, epoch=False,
                                         marked_only=False)
      rows[-1]["every_row_step_images_per_second"] = every["step_images_per_second"]
  print(f"{_MODEL.value} width {_WIDTH.value} {_DTYPE.value}, {_TRIGGER.value} on 10% of "
        f"{len(ds.x_train)} train images, "
        f"{benchmark.device_name()}, jax {jax.__version__}")
  print("| batch | step images/s | step TFLOP/s | epoch images/s | epoch seconds | step images/s, "
        "trigger on every row |")
  print("|---|---|---|---|---|---|")
  nan = float("nan")
  for r in rows:
    print(f"| {r['batch_size']} | {r['step_images_per_second']:.1f} | "
          f"{r.get('step_tflops_per_second', nan):.3f} | "
          f"{r.get('epoch_images_per_second', nan):.1f} | {r.get('epoch_seconds', nan):.1f} | "
          f"{r.get('every_row_step_images_per_second', nan):.1f} |")
  benchmark.write_results(_OUT.value, rows, model=_MODEL.value, width=_WIDTH.value,
                          dtype=_DTYPE.value, trigger=_TRIGGER.value, num_train=len(ds.x_train))


if __name__ == "__main__":
  benchmark.run_script(main)
