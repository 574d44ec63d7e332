"""A standard run's trained model as a BackdoorBench attack result (`python -m jaxbd.export`).

`export_run(workdir, phase, out)` reads the run's config.json and loads its dataset (for the rows
of the whole training split that its poison plan names), the final checkpoint of `phase`
(`backdoored` or `clean`) and `poison_plan.npz`, and writes with `torch.save` (atomically)
what `jaxbd.interop.backdoorbench.load` reads and BackdoorBench's model loads:
`{"model_name": "preactresnet18", "num_classes": K, "model": state_dict, "img_size": [H, W, C],
"normalization": {"mean": [C], "std": [C]}, "poison_indices": int64[P], "bd_train":
{"poison_indicator": int64[N]}}`, the last two over the N images of the whole training split
and only for the backdoored phase (the plan's poisoned rows; cover rows, which keep their
labels, are not marked). The state_dict loads into BackdoorBench's PreActResNet18
(`model.load_state_dict(blob["model"])`), which takes inputs normalized by BackdoorBench's
dataset mean/std; jaxbd models normalize with the run's `normalization` (its `data.mean`/
`data.std`, else computed from the training images), so normalize with those for the same
logits, or train with BackdoorBench's values (`--config.data.mean=... --config.data.std=...`).
The file holds the model and the poisoned rows only, not BackdoorBench's poisoned-dataset
containers. Only PreAct-ResNet18 runs of the standard experiment have a BackdoorBench twin.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from jaxbd import config as config_lib
from jaxbd import data, models, poison
from jaxbd.errors import ConfigError, DataError
from jaxbd.experiments import common, standard
from jaxbd.interop import backdoorbench


def check_out(out: str) -> None:
  """Checks that `out` can be written: a file name in an existing folder.

  Raises:
    ConfigError: no name given, a folder, or a file in a folder that does not exist.
  """
  config_lib.require(bool(out), "--out is required")
  config_lib.require(not os.path.isdir(out), f"--out {out} is a folder; name a .pt file")
  folder = os.path.dirname(os.path.abspath(out))
  config_lib.require(os.path.isdir(folder), f"--out {out}: the folder {folder} does not exist")


def export_run(workdir: str, phase: str, out: str) -> dict:
  """Writes phase `phase` of the standard run in `workdir` to `out` (see the module docstring)
  and returns a summary: model, classes, images, poisoned rows (None for the clean phase), file.

  Raises:
    ConfigError: the run is not a finished PreAct-ResNet18 standard run that trained `phase`,
      `out` cannot be written, or torch is not installed.
    DataError, CheckpointError: its data, checkpoint or poison plan is missing or unreadable.
  """
  check_out(out)
  config_lib.require(importlib.util.find_spec("torch") is not None,
                     "writing a BackdoorBench file needs torch: install the [torch] extra")
  config_lib.require(bool(workdir), "--workdir is required")
  saved, epochs = common.trained_run(workdir, "--workdir")
  config = ml_collections.ConfigDict(saved)
  try:
    config_lib.validate(config)
  except ConfigError as e:
    raise ConfigError(f"--workdir {workdir}: its config.json does not validate ({e})") from None
  twins = {name: bb_name for bb_name, (name, _) in backdoorbench.MODELS.items()}
  config_lib.require(config.experiment == "standard",
                     f"--workdir {workdir} holds a {config.experiment!r} run; only the standard "
                     "experiment's models can be exported")
  config_lib.require(config.model.name in twins,
                     f"--workdir {workdir}: model {config.model.name!r} has no BackdoorBench "
                     f"twin (exportable: {', '.join(sorted(twins))})")
  config_lib.require(phase in standard.phases(config),
                     f"--phase {phase}: the run in {workdir} trained "
                     f"{', '.join(standard.phases(config))} only")
  dataset = data.load(config.data)
  mean, std = common.channel_stats(config, dataset.x_train)
  model = models.create(config, dataset.num_classes, mean, std)
  variables = common.restore_phase(workdir, phase, epochs)
  common.check_fit(model, config.model.name, dataset.image_shape, variables,
                   f"checkpoint of phase {phase!r} in {workdir}")
  rows = None
  if phase == "backdoored":
    path = os.path.join(workdir, "poison_plan.npz")
    plan = poison.load_plan(path)
    if len(plan.labels) != len(dataset.y_train):
      raise DataError(f"poison plan {path}: it labels {len(plan.labels)} training images but "
                      f"the run's data has {len(dataset.y_train)}")
    rows = dataset.train_rows[plan.indices]
  backdoorbench.save(out, variables, num_classes=dataset.num_classes,
                     model_name=twins[config.model.name], poison_indices=rows,
                     num_train=dataset.train_split,
                     extra={"img_size": list(dataset.image_shape),
                            "normalization": {"mean": list(mean), "std": list(std)}})
  return {"model": twins[config.model.name], "num_classes": dataset.num_classes,
          "img_size": list(dataset.image_shape), "poisoned": None if rows is None else len(rows),
          "train_split": dataset.train_split, "out": out}
