"""Defend a model trained elsewhere: a BackdoorBench (PyTorch) checkpoint, evaluated and defended.

`defend.checkpoint` names a BackdoorBench-style `torch.save` file (see
`jaxbd.interop.backdoorbench`). Its model is loaded into the jaxbd model of `config.model` (the
architecture and width must match), evaluated with the trigger of `config.poison` (which must
describe the attack the model was trained with), then every defense of `defense.names` runs on it
with trusted data drawn from training rows the file does not mark as poisoned (a file without
poison indices: rows the config's own plan leaves clean; `attack.plan_from` in results.json says
which). The file's poisoned rows are rows of the whole training split (BackdoorBench's
`poison_indicator` has one entry per image); with `data.train_limit` they are mapped to the
subset's rows, and poisoned images outside the subset are not in the run. Writes `results.json`
(metrics.backdoored, defenses) like the standard experiment.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import defenses, host
from jaxbd.errors import ConfigError
from jaxbd.experiments import common, report, results, standard
from jaxbd.poison import plan as plan_lib


def default_config() -> ml_collections.ConfigDict:
  """The `defend` section: the BackdoorBench checkpoint to evaluate and defend."""
  return ml_collections.ConfigDict(dict(
      checkpoint="",  # BackdoorBench-style .pt file (model_name, num_classes, model, bd_train)
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks that `defend.checkpoint` names a file (ConfigError otherwise)."""
  config_lib.require(config.defend.checkpoint != "",
                     "config key 'defend.checkpoint' must name a BackdoorBench .pt file")


def subset_positions(indices: np.ndarray, num_train: Optional[int], rows: np.ndarray,
                     split_size: int) -> np.ndarray:
  """The positions in the run's training set of the checkpoint's poisoned rows it holds.

  Args:
    indices: int[P] poisoned rows of the whole training split.
    num_train: the length of the checkpoint's `bd_train.poison_indicator`, or None (no indicator).
    rows: int[n] sorted rows of the whole split that are the run's n training images
      (`Dataset.train_rows`: the `data.train_limit` subset, or `arange(N)`).
    split_size: N, the number of images in the whole training split (`Dataset.train_split`).

  Returns:
    int64[P'] sorted positions i in [0, n) with rows[i] in `indices` (poisoned images outside the
    subset are not in the run).

  Raises:
    ConfigError: the indicator's length is not N, or a row lies outside the split.
  """
  if num_train is not None and num_train != split_size:
    raise ConfigError(f"the checkpoint's bd_train.poison_indicator has {num_train} entries but "
                      f"the training split has {split_size} images (it needs one per image of "
                      "the whole split)")
  if len(indices) and (indices.min() < 0 or indices.max() >= split_size):
    bad = indices.min() if indices.min() < 0 else indices.max()
    raise ConfigError(f"the checkpoint's poison indices include {bad}, outside the training "
                      f"split's rows 0..{split_size - 1}")
  return np.flatnonzero(np.isin(rows, indices)).astype(np.int64)


def imported_plan(plan: plan_lib.PoisonPlan, indices, y_train: np.ndarray,
                  num_classes: int) -> plan_lib.PoisonPlan:
  """The run's plan with the checkpoint's poisoned rows (relabeled as the config's attack).

  indices: int[P] rows of the run's training set the checkpoint's attack poisoned (see
  `subset_positions`), or None (keep `plan`); y_train: int[N] training labels.
  """
  if indices is None:
    return plan
  indices = np.asarray(indices, np.int64)
  labels = y_train.astype(np.int32).copy()
  labels[indices] = plan_lib.poisoned_label(y_train[indices], plan.label_mode, plan.target,
                                            num_classes)
  return dataclasses.replace(plan, indices=indices, cover_indices=np.zeros(0, np.int64),
                             labels=labels)


def plan_source(indices) -> str:
  """Where the run's poisoned rows come from: "checkpoint" (its `bd_train` indices) or "config"
  (the file has none: the config's own seeded plan, drawn as if jaxbd had poisoned the data)."""
  return "config" if indices is None else "checkpoint"


def check_normalization(model,
                        saved: Optional[tuple[tuple[float, ...], tuple[float, ...]]]) -> None:
  """Checks that the run's `model` normalizes inputs (its `mean`, `std`) as the checkpoint's model
  was trained to (where the file records it, `saved`: (mean, std)).

  Raises:
    ConfigError: they differ (the message gives the flags that set the file's).
  """
  if saved is None:
    return
  mean, std = tuple(model.mean), tuple(model.std)
  if np.shape(saved[0]) != np.shape(mean) or not np.allclose(saved, (mean, std), atol=1e-6):
    flag = lambda values: ",".join(f"{v:.6g}" for v in values)
    raise ConfigError(f"the checkpoint's model was trained with input mean {flag(saved[0])} and "
                      f"std {flag(saved[1])}, this run normalizes with {flag(mean)} and "
                      f"{flag(std)}: set --config.data.mean={flag(saved[0])} "
                      f"--config.data.std={flag(saved[1])}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Loads, evaluates and defends the checkpoint; returns the results document."""
  from jaxbd.interop import backdoorbench  # pylint: disable=g-import-not-at-top
  r = common.build(config, workdir)
  ckpt = backdoorbench.load(config.defend.checkpoint)
  if ckpt.model != config.model.name:
    raise ConfigError(f"the checkpoint holds a {ckpt.model!r} model but config.model.name is "
                      f"{config.model.name!r}")
  if ckpt.num_classes != r.dataset.num_classes:
    raise ConfigError(f"the checkpoint has {ckpt.num_classes} classes but the dataset has "
                      f"{r.dataset.num_classes}")
  variables = common.check_variables(r, ckpt.variables, config.defend.checkpoint)
  check_normalization(r.model, ckpt.normalization)
  poisoned = (None if ckpt.poison_indices is None else subset_positions(
      ckpt.poison_indices, ckpt.num_train, r.dataset.train_rows, r.dataset.train_split))
  r = dataclasses.replace(r, plan=imported_plan(r.plan, poisoned, r.dataset.y_train,
                                                r.dataset.num_classes))
  if config_lib.defense_names(config):  # the trusted set comes from the imported plan's clean rows
    defenses.base.trusted_pool(r.plan.kind, config.defense.clean_fraction,
                               config.defense.trusted_from)
  common.create_workdir(r)
  metrics = {"backdoored": r.evaluate(variables)}
  defended = common.run_defenses(r, variables, metrics["backdoored"])
  doc = results.document(config, dataset=r.dataset.name, model=config.model.name,
                         attack={**standard.attack_section(config, r.plan),
                                 "plan_from": plan_source(ckpt.poison_indices)},
                         metrics=metrics,
                         defenses=defended, source=config.defend.checkpoint)
  results.write_json(f"{workdir}/results.json", doc)
  host.say(report.models_table(metrics, defended))
  return doc


COMPONENT = config_lib.Component(default_config, validate, run)
