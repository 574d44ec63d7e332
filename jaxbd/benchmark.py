"""Throughput measurements of jaxbd's training, shared by the benchmark scripts.

`time_steps` compiles the jitted train step once (the whole device program: gather from the
device-resident uint8 training set, trigger on the planned rows, crop + flip, normalization,
forward, backward, optimizer), reads its FLOPs from XLA's cost analysis and times consecutive
steps; `train_throughput` adds a full epoch through `jaxbd.train.fit`. Achieved FLOP/s and model
FLOPs utilization (against the device's dense peak, where known) come with the step figures.

The scripts run their `main` through `run_script`, which gives them the error handling of jaxbd's
commands, and check their flags as absl parses them (`require_positive_ints`, `require_names`,
`require_writable`), so that a bad flag stops them before anything is measured.
"""

from __future__ import annotations

import json
import os
import time
import types
from typing import Callable, Iterable, Optional

from absl import flags
import jax
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import data, models, poison
from jaxbd import cli
from jaxbd import train as train_lib
from jaxbd.errors import DataError
from jaxbd.experiments import results

# Compute dtypes the scripts measure (PEAK_FLOPS knows both).
DTYPES = ("float32", "bfloat16")
# The convolutional classifiers without experts; their config sections have a `width`.
CONV_MODELS = ("cnn", "preact_resnet18", "resnet18")

# Dense peak FLOP/s per device (vendor figures) for model FLOPs utilization.
PEAK_FLOPS = types.MappingProxyType({
    ("NVIDIA H100 80GB HBM3", "float32"): 67e12, ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
    ("NVIDIA H200", "float32"): 67e12, ("NVIDIA H200", "bfloat16"): 989e12,
    ("NVIDIA A100-SXM4-80GB", "float32"): 19.5e12, ("NVIDIA A100-SXM4-80GB", "bfloat16"): 312e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12,
})


def random_dataset(num_train: int, image_shape=(32, 32, 3), num_classes: int = 10,
                   seed: int = 0) -> data.Dataset:
  """CIFAR-10-shaped random uint8 images and labels (for throughput only)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (num_train, *image_shape), dtype=np.uint8)
  y = rng.integers(0, num_classes, num_train)
  return data.make_dataset("random", x, y, x[:num_classes], y[:num_classes])


def training_data(data_config: ml_collections.ConfigDict, source: str,
                  num_train: int) -> data.Dataset:
  """The first `num_train` (class-balanced) images of a jaxbd source, or random data if empty.

  Raises:
    DataError: the source's images are not CIFAR-shaped (uint8[32, 32, 3]) or it has more than
      10 classes: the benchmarks' models and PyTorch loaders are those of CIFAR-10.
  """
  if not source:
    return random_dataset(num_train)
  c = data_config.copy_and_resolve_references()
  c.source, c.train_limit = source, num_train
  ds = data.load(c)
  if ds.image_shape != (32, 32, 3) or ds.num_classes > 10:
    raise DataError(f"{source}: the benchmarks train CIFAR-10's models on 32x32 RGB images of at "
                    f"most 10 classes, not {'x'.join(map(str, ds.image_shape))} images of "
                    f"{ds.num_classes} classes")
  return ds


def device_name() -> str:
  """The devices the benchmark ran on, e.g. '1 x NVIDIA H100 80GB HBM3'."""
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}"


def poisoned_setup(config: ml_collections.ConfigDict, ds: data.Dataset, rate: float,
                   marked_only: bool = True) -> train_lib.Setup:
  """The training phase of `config` (model, train, data, mesh sections) on `ds`, with
  `int(rate * N)` rows poisoned on device by the trigger of `config.poison.name`, run on each
  batch's marked rows as the experiments do (`marked_only`) or on every row."""
  mesh = train_lib.make_mesh(config.mesh.data, config.mesh.expert)
  model = models.create(config, ds.num_classes, (0.5,) * 3, (0.25,) * 3)
  plan = poison.make_plan(ds.y_train, ds.num_classes, rate=rate, target=0)
  trigger = poison.make_trigger(config, ds.image_shape)
  return train_lib.supervised_setup(
      model, ds.x_train, plan.labels, train_config=config.train, data_config=config.data,
      mesh=mesh, key=jax.random.key(0), kind=plan.kind,
      poison_fn=poison.phase_poison_fn(trigger, jax.random.key(0), plan.kind,
                                       config.train.batch_size, train_lib.batch_shards(mesh),
                                       marked_only))


def _flops(compiled) -> Optional[float]:
  """The FLOPs of one call of a compiled program over all its devices (XLA's cost analysis
  counts one device's share of a sharded program), or None where the backend gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends have no cost analysis
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops")
  devices = len(jax.tree.leaves(compiled.input_shardings)[0].device_set)
  return float(flops) * devices if flops else None


def time_steps(setup: train_lib.Setup, batch_size: int, steps: int,
               dtype: str = "float32") -> tuple[dict, dict]:
  """Compiles the train step once, then times `steps` steps after 2 warm-up steps.

  Returns:
    ({"step_images_per_second", "compile_seconds", and "step_tflops_per_second" / "mfu" where
    known}, the train state after the steps).
  """
  key = jax.random.key(1)
  perm = data.epoch_indices(key, setup.arrays.size, batch_size)
  rows = perm.shape[0]
  t0 = time.perf_counter()
  step = jax.jit(setup.step, donate_argnums=(0,)).lower(
      setup.state, setup.arrays, perm, 0, key).compile()
  out = {"compile_seconds": time.perf_counter() - t0}
  state = setup.state
  for i in range(2):
    state, metrics = step(state, setup.arrays, perm, i % rows, key)
  jax.block_until_ready(metrics)
  throttle = train_lib.Throttle()  # as `jaxbd.train.fit` dispatches
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, setup.arrays, perm, i % rows, key)
    throttle(metrics)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - t0) / steps
  out["step_images_per_second"] = batch_size / seconds
  if flops := _flops(step):
    out["step_tflops_per_second"] = flops / seconds / 1e12
    peak = PEAK_FLOPS.get((jax.devices()[0].device_kind, dtype))
    if peak:
      out["mfu"] = flops / seconds / (peak * jax.device_count())
  return out, state


def train_throughput(config: ml_collections.ConfigDict, ds: data.Dataset, batch_size: int, *,
                     steps: int, epoch: bool = True, poison_rate: float = 0.1,
                     marked_only: bool = True) -> dict:
  """Images/s of the train step and of a full epoch, with poisoning and augmentation.

  Args:
    config: a full config (model, dtype, data augmentation, train settings, `poison.name`).
    ds: the training data (its train split is used).
    batch_size: global batch size.
    steps: timed steps.
    epoch: also time a full epoch through `fit` (after a warm-up epoch that compiles).
    poison_rate: fraction of rows given the trigger.
    marked_only: run the trigger on each batch's marked rows (as experiments do), or on every row.

  Returns:
    batch_size, the `time_steps` figures, epoch_seconds and epoch_images_per_second.
  """
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch_size
  setup = poisoned_setup(config, ds, poison_rate, marked_only)
  timed, state = time_steps(setup, batch_size, steps, config.model.dtype)
  out = {"batch_size": batch_size, **timed}
  if epoch:
    key = jax.random.key(2)
    state, _ = train_lib.fit("bench", state, setup.step, setup.arrays, epochs=1,
                             batch_size=batch_size, key=key, progress=False)
    t0 = time.perf_counter()
    train_lib.fit("bench", state, setup.step, setup.arrays, epochs=1, batch_size=batch_size,
                  key=key, progress=False)
    out["epoch_seconds"] = time.perf_counter() - t0
    out["epoch_images_per_second"] = len(ds.x_train) / out["epoch_seconds"]
  return out


def moe_config(name: str, dispatch: str = "", *, batch_size: int = 128, widen: int = 10,
               vmoe_hidden: int = 128, dtype: str = "float32",
               expert: int = 1) -> ml_collections.ConfigDict:
  """The BadPatches training setting for MoE model `name` (pmoe, pmoe_patch, vmoe).

  SGD 0.1 without momentum, no augmentation, BadPatches trigger; `dispatch` (gather | einsum; empty:
  the model's default), WRN-MoE widen factor `widen`, V-MoE token width `vmoe_hidden` (MLP 2x),
  `expert` devices on the mesh's expert axis.
  """
  c = config_lib.defaults()
  c.model.name = name
  c.model.dtype = dtype
  if dispatch:
    c.model[name].dispatch = dispatch
  c.model.pmoe.widen = widen
  c.model.vmoe.hidden = vmoe_hidden
  c.model.vmoe.mlp_dim = 2 * vmoe_hidden
  c.poison.name = "badpatches"
  c.data.crop_padding = 0
  c.data.flip = False
  c.train.update(dict(batch_size=batch_size, lr=0.1, momentum=0.0, weight_decay=0.0,
                      schedule="constant"))
  c.mesh.expert = expert
  config_lib.validate(c)
  return c


def moe_step_throughput(config: ml_collections.ConfigDict, ds: data.Dataset,
                        steps: int) -> dict:
  """Train-step figures of `moe_config`'s model with 1% BadPatches rows (see `time_steps`)."""
  setup = poisoned_setup(config, ds, rate=0.01)
  timed, state = time_steps(setup, config.train.batch_size, steps, config.model.dtype)
  name = config.model.name
  return {"model": name, "dispatch": config.model[name].dispatch,
          "batch_size": config.train.batch_size, "dtype": config.model.dtype, **timed,
          "params": int(sum(np.size(p) for p in jax.tree.leaves(state["params"])))}


def moe_table(rows: list[dict]) -> str:
  """A markdown table of `moe_step_throughput` rows (TFLOP/s and MFU where known)."""
  def fmt(row, key, spec):
    return format(row[key], spec) if key in row else "n/a"
  lines = ["| model | params | dispatch | dtype | images/s | TFLOP/s | MFU | compile s |",
           "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['params']:,} | {r['dispatch']} | {r['dtype']} | "
            f"{r['step_images_per_second']:.1f} | {fmt(r, 'step_tflops_per_second', '.3f')} | "
            f"{fmt(r, 'mfu', '.1%')} | {r['compile_seconds']:.1f} |" for r in rows]
  return "\n".join(lines)


def write_json(path: str, doc: dict, echo: bool = False) -> None:
  """Writes `{**doc, "device", "jax", "date"}` as JSON to `path` atomically (if a path is given);
  `echo` also prints it."""
  doc = {**doc, "device": device_name(), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
  if echo:
    print(json.dumps(doc, indent=1))
  if path:
    results.write_json(path, doc)


def write_results(path: str, rows: list[dict], **meta) -> None:
  """Writes `{**meta, "device", "jax", "date", "results": rows}` as JSON to `path` (if given)."""
  write_json(path, {**meta, "results": rows})


def run_script(main: Callable[[], None]) -> None:
  """Runs a script's `main()` as jaxbd's commands run (`jaxbd.cli.run`): a bad flag, an
  unexpected argument, a jaxbd error (a config value, a data source) or a file system error is
  one line `jaxbd: error: ...` with exit status 2; Ctrl-C is `jaxbd: interrupted`, status 130."""
  cli.run(main, interrupted="interrupted")


def require_positive_ints(holder: flags.FlagHolder) -> None:
  """Makes a list flag (e.g. --batch_sizes=128,512) take only positive integers, at least one."""
  flags.register_validator(
      holder, lambda v: bool(v) and all(s.isdecimal() and int(s) > 0 for s in v),
      "expected positive integers, comma-separated")


def require_names(holder: flags.FlagHolder, choices: Iterable[str],
                  allow_empty: bool = False) -> None:
  """Makes a list flag take only names out of `choices`, and at least one unless `allow_empty`."""
  choices = tuple(choices)
  flags.register_validator(
      holder, lambda v: (allow_empty or bool(v)) and set(v) <= set(choices),
      f"expected {'zero' if allow_empty else 'one'} or more of {', '.join(choices)}, "
      "comma-separated")


def require_writable(holder: flags.FlagHolder) -> None:
  """Makes an output file flag (e.g. --out) refuse a path that cannot be written at the end of the
  run: a folder, or a file in a folder that does not exist or is not writable. Empty: no file."""

  def ok(path: str) -> bool:
    """Whether `path` is empty or names a file that can be written."""
    folder = os.path.dirname(os.path.abspath(path))
    return not path or (not os.path.isdir(path) and os.path.isdir(folder) and
                        os.access(folder, os.W_OK))

  flags.register_validator(holder, ok, "not a file in a writable folder")
