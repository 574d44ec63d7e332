r"""jaxbd against a PyTorch reference loop, on the same experiment, in one run.

  python scripts/compare_pytorch.py                  # GPU: PreAct-ResNet18, batch 128 and 512
  python scripts/compare_pytorch.py --num_train=256 --batch_sizes=32 --steps=2 --width=8 \
      --workers=0 --variants=eager,bf16                # a quick CPU check

The experiment: PreAct-ResNet18 on CIFAR-10-shaped data (random uint8 images, or --source), 10%
BadNets (3x3 white, bottom-right, relabeled to class 0), random crop (padding 4) + horizontal
flip, normalization, SGD (lr 0.01, momentum 0.9, wd 5e-4), cross-entropy.

PyTorch reference, written the way PyTorch backdoor benchmarks do it: a `Dataset` whose
`__getitem__` poisons the image if its index is planned and applies per-sample PIL transforms
(pad + random crop, flip, to-tensor, normalize), a `DataLoader` with `--workers` worker processes,
and the model in variants: `eager` (fp32), `bf16` (autocast), `compile` (torch.compile, fp32),
`compile_bf16`. jaxbd: the device-resident pipeline (gather, poison, crop, flip inside the jitted
step) in float32 and bfloat16.

Measured: train-step images/s on resident data (PyTorch: a fixed batch already on the device;
jaxbd: the full step including poisoning and augmentation) and wall time of a full epoch
including data loading, poisoning and augmentation; then the ratios jaxbd / PyTorch. Then the
jaxbd train step of the MoE models of `--moe_models` (pMoE WRN-MoE, V-MoE; the BadPatches setting
of `scripts/bench_moe.py`, each with its default dispatch) at each batch size, in float32 and
bfloat16, with achieved TFLOP/s and model FLOPs utilization (XLA's FLOP count over the device's
dense peak, where known).
"""

from __future__ import annotations

import random
import time

from absl import flags
import numpy as np
from PIL import Image, ImageOps
import torch

from jaxbd import benchmark
from jaxbd import config as config_lib
from jaxbd import models, poison
from jaxbd.interop import torch_models
from jaxbd.models import common

VARIANTS = ("eager", "bf16", "compile", "compile_bf16")  # see `torch_trainer`

_BATCHES = flags.DEFINE_list("batch_sizes", ["128", "512"], "Batch sizes.")
benchmark.require_positive_ints(_BATCHES)
_STEPS = flags.DEFINE_integer("steps", 50, "Timed train steps on resident data.", lower_bound=1)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 50000, "Training images (one epoch).",
                                  lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", 64, "PreAct-ResNet18 width (64: the paper's).",
                              lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", 8, "PyTorch DataLoader worker processes.",
                                lower_bound=0)
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "PyTorch variants.")
benchmark.require_names(_VARIANTS, VARIANTS)
_EPOCH_VARIANTS = flags.DEFINE_list("epoch_variants", ["eager"],
                                    "PyTorch variants timed over a full epoch.")
benchmark.require_names(_EPOCH_VARIANTS, VARIANTS, allow_empty=True)
_SOURCE = flags.DEFINE_string("source", "", "A jaxbd data source instead of random data.")
_DTYPES = flags.DEFINE_list("dtypes", list(benchmark.DTYPES),
                            "Compute dtypes of the jaxbd train steps.")
benchmark.require_names(_DTYPES, benchmark.DTYPES)
_MOE_MODELS = flags.DEFINE_list("moe_models", ["pmoe", "vmoe"],
                                "MoE models whose jaxbd train step is also measured (with MFU).")
benchmark.require_names(_MOE_MODELS, models.ROUTED, allow_empty=True)
_MOE_WIDEN = flags.DEFINE_integer("moe_widen", 10, "WRN-MoE widen factor k (paper: 10).",
                                  lower_bound=1)
_MOE_HIDDEN = flags.DEFINE_integer("moe_vmoe_hidden", 128, "V-MoE token width.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "", "Write all figures as JSON here.")
benchmark.require_writable(_OUT)

MEAN, STD = common.CIFAR10_MEAN, common.CIFAR10_STD


class PoisonedDataset(torch.utils.data.Dataset):
  """The PyTorch-benchmark-style dataset: poisoning and PIL transforms per sample.

  Args:
    images: uint8[N, 32, 32, 3].
    labels: int[N].
    poisoned: indices that get the trigger and the target label.
    target: target class.
    mask: bool[32, 32, 1] trigger mask; pattern: uint8[32, 32, 3] trigger pixels.
  """

  def __init__(self, images, labels, poisoned, target, mask, pattern):
    self.images, self.labels = images, labels
    self.poisoned, self.target = set(np.asarray(poisoned).tolist()), target
    self.mask, self.pattern = mask, pattern
    self.mean = torch.tensor(MEAN).view(3, 1, 1)
    self.std = torch.tensor(STD).view(3, 1, 1)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    image, label = self.images[i], int(self.labels[i])
    if i in self.poisoned:
      image, label = np.where(self.mask, self.pattern, image), self.target
    pil = ImageOps.expand(Image.fromarray(image), border=4, fill=0)  # RandomCrop(32, padding=4)
    top, left = random.randint(0, 8), random.randint(0, 8)
    pil = pil.crop((left, top, left + 32, top + 32))
    if random.random() < 0.5:  # RandomHorizontalFlip
      pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(pil, np.float32) / 255.0).permute(2, 0, 1)  # ToTensor
    return (x - self.mean) / self.std, label  # Normalize


def torch_trainer(variant: str, width: int, device):
  """step(x, y) of a PyTorch variant of PreAct-ResNet18 + SGD + cross-entropy."""
  model = torch_models.PreActResNet18(10, width).to(device).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  forward = torch.compile(model) if variant.startswith("compile") else model
  dtype = torch.bfloat16 if variant.endswith("bf16") else None
  loss_fn = torch.nn.CrossEntropyLoss()

  def step(x, y):
    """One SGD step on batch (x, y); returns the loss."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
      loss = loss_fn(forward(x), y)
    loss.backward()
    opt.step()
    return loss

  return step


def synchronize(device):
  """Waits for the device's queued work (CUDA; the CPU runs synchronously)."""
  if device.type == "cuda":
    torch.cuda.synchronize()


def torch_step_throughput(variant, batch, device) -> float:
  """Images/s of the PyTorch step on a fixed batch already on the device."""
  step = torch_trainer(variant, _WIDTH.value, device)
  x = torch.randn(batch, 3, 32, 32, device=device)
  y = torch.randint(0, 10, (batch,), device=device)
  for _ in range(3):  # warm-up (and compilation)
    step(x, y)
  synchronize(device)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    step(x, y)
  synchronize(device)
  return batch * _STEPS.value / (time.perf_counter() - t0)


def torch_epoch(variant, batch, dataset, device) -> float:
  """Seconds of one epoch: DataLoader (workers, per-sample poisoning + PIL transforms) + steps.

  Workers are spawned, not forked: the process already runs JAX's threads.
  """
  step = torch_trainer(variant, _WIDTH.value, device)
  workers = _WORKERS.value
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=batch, shuffle=True, num_workers=workers,
      pin_memory=device.type == "cuda", drop_last=False, persistent_workers=workers > 0,
      multiprocessing_context="spawn" if workers else None)
  x, y = next(iter(loader))
  for _ in range(3):  # warm-up (and compilation) outside the timed epoch
    step(x.to(device), y.to(device))
  synchronize(device)
  t0 = time.perf_counter()
  for x, y in loader:
    step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
  synchronize(device)
  return time.perf_counter() - t0


def main():
  """Runs PyTorch and jaxbd on the same data, prints the figures and ratios, writes --out."""
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  config = config_lib.defaults()
  config.model.name = "preact_resnet18"
  config.model.preact_resnet18.width = _WIDTH.value
  config.poison.name = "badnets"
  config.train.lr = 0.01
  config_lib.validate(config)
  batches = [int(b) for b in _BATCHES.value]
  moe_configs = [benchmark.moe_config(name, batch_size=batch, widen=_MOE_WIDEN.value,
                                      vmoe_hidden=_MOE_HIDDEN.value, dtype=dtype)
                 for batch in batches for name in _MOE_MODELS.value for dtype in _DTYPES.value]
  ds = benchmark.training_data(config.data, _SOURCE.value, _NUM_TRAIN.value)
  plan = poison.make_plan(ds.y_train, ds.num_classes, rate=0.1, target=0)
  trigger = poison.make_trigger(config, ds.image_shape)
  mask = np.asarray(trigger.mask) > 0
  pattern = np.round(np.asarray(trigger.pattern) * 255).astype(np.uint8)
  dataset = PoisonedDataset(ds.x_train, ds.y_train, plan.indices, plan.target, mask, pattern)

  results = {"device_torch": str(torch.cuda.get_device_name() if device.type == "cuda" else
                                 "cpu"),
             "torch": torch.__version__, "num_train": len(ds.x_train), "width": _WIDTH.value,
             "rows": [], "moe": []}
  for batch in batches:
    row = {"batch_size": batch, "torch_step": {}, "torch_epoch": {}, "jax": {}}
    for variant in _VARIANTS.value:
      row["torch_step"][variant] = torch_step_throughput(variant, batch, device)
    for variant in _EPOCH_VARIANTS.value:
      row["torch_epoch"][variant] = len(ds.x_train) / torch_epoch(variant, batch, dataset,
                                                                   device)
    for dtype in _DTYPES.value:
      config.model.dtype = dtype
      row["jax"][dtype] = benchmark.train_throughput(config, ds, batch, steps=_STEPS.value)
    results["rows"].append(row)
    report(row)
  moe_data = benchmark.random_dataset(_NUM_TRAIN.value)
  results["moe"] = [benchmark.moe_step_throughput(c, moe_data, _STEPS.value) for c in moe_configs]
  if results["moe"]:
    print(f"\nMoE train step (jaxbd), WRN-MoE k={_MOE_WIDEN.value}, V-MoE width "
          f"{_MOE_HIDDEN.value}")
    print(benchmark.moe_table(results["moe"]))
  benchmark.write_json(_OUT.value, results)


def report(row: dict) -> None:
  """Prints one batch size's figures and the jaxbd / PyTorch ratios."""
  b = row["batch_size"]
  print(f"\nbatch {b}")
  print("| implementation | train step images/s | full epoch images/s |")
  print("|---|---|---|")
  for variant, ips in row["torch_step"].items():
    epoch = row["torch_epoch"].get(variant)
    print(f"| PyTorch {variant} | {ips:.1f} | {'' if epoch is None else f'{epoch:.1f}'} |")
  for dtype, r in row["jax"].items():
    print(f"| jaxbd {dtype} | {r['step_images_per_second']:.1f} | "
          f"{r['epoch_images_per_second']:.1f} |")
  jax_step = max(r["step_images_per_second"] for r in row["jax"].values())
  jax_epoch = max(r["epoch_images_per_second"] for r in row["jax"].values())
  best_variant = max(row["torch_step"], key=row["torch_step"].get)
  print(f"ratio train step, jaxbd best / PyTorch eager fp32: "
        f"{jax_step / row['torch_step'].get('eager', float('nan')):.2f}")
  print(f"ratio train step, jaxbd best / best PyTorch ({best_variant}): "
        f"{jax_step / row['torch_step'][best_variant]:.2f}")
  for variant, ips in row["torch_epoch"].items():
    print(f"ratio full epoch, jaxbd best / PyTorch {variant} DataLoader: {jax_epoch / ips:.2f}")


if __name__ == "__main__":
  benchmark.run_script(main)
