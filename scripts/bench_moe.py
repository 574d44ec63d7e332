r"""Train-step throughput of the MoE models with both dispatch implementations (gather, einsum).

  python scripts/bench_moe.py                                   # pMoE WRN-MoE k=10, V-MoE
  python scripts/bench_moe.py --widen=1 --steps=5 --batch_size=64   # quick CPU figures
  python scripts/bench_moe.py --models=pmoe,pmoe_patch,vmoe --out=benchmarks/moe_cpu.json
  python scripts/bench_moe.py --expert=4    # expert parameters sharded over 4 devices

Data: CIFAR-10-shaped random uint8 images (32x32x3, 10 classes). Each step gathers its batch on
device, applies the BadPatches trigger to the 1% planned rows, runs forward + backward (router,
dispatch, experts, combine) and the SGD update, all in one jitted function (the BadPatches
training setting: no augmentation, SGD 0.1). Reported: images/s over `--steps` steps after 2
warm-up steps, achieved TFLOP/s and model FLOPs utilization (XLA's FLOP count over the device's
dense peak, where known), and the compile time of the first step. Models: `pmoe` is the WRN-MoE
(`--widen` is k; 10 is the paper's), `pmoe_patch` the image-patch pMoE, `vmoe` the V-MoE ViT
(patch 4, E = 8, K = 2, MoE every 2nd of 6 blocks, `--vmoe_hidden` wide).
"""

from __future__ import annotations

import sys

from absl import flags
import jax

from jaxbd import benchmark, models
from jaxbd.models import routing

_MODELS = flags.DEFINE_list("models", ["pmoe", "vmoe"], "MoE models to measure.")
benchmark.require_names(_MODELS, models.ROUTED)
_WIDEN = flags.DEFINE_integer("widen", 10, "WRN-MoE widen factor k (paper: 10).", lower_bound=1)
_VMOE_HIDDEN = flags.DEFINE_integer("vmoe_hidden", 128, "V-MoE token width.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.", lower_bound=1)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 2048, "Training images (random data).",
                                  lower_bound=1)
_EXPERT = flags.DEFINE_integer("expert", 1, "Devices on the mesh's expert axis.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", benchmark.DTYPES, "Compute dtype.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
benchmark.require_writable(_OUT)


def main():
  """Measures each model and dispatch, prints the table, writes --out."""
  configs = [benchmark.moe_config(name, impl, batch_size=_BATCH.value, widen=_WIDEN.value,
                                  vmoe_hidden=_VMOE_HIDDEN.value, dtype=_DTYPE.value,
                                  expert=_EXPERT.value)
             for name in _MODELS.value for impl in routing.IMPLS]  # all checked before timing
  ds = benchmark.random_dataset(_NUM_TRAIN.value)
  rows = [benchmark.moe_step_throughput(c, ds, _STEPS.value) for c in configs]
  print(f"MoE train step, batch {_BATCH.value}, {_DTYPE.value}, WRN-MoE k={_WIDEN.value}, "
        f"V-MoE width {_VMOE_HIDDEN.value}, expert axis {_EXPERT.value}, "
        f"{benchmark.device_name()}, jax {jax.__version__}")
  print(benchmark.moe_table(rows))
  benchmark.write_results(_OUT.value, rows, dtype=_DTYPE.value, widen=_WIDEN.value,
                          vmoe_hidden=_VMOE_HIDDEN.value, expert=_EXPERT.value)
  sys.stdout.flush()


if __name__ == "__main__":
  benchmark.run_script(main)
