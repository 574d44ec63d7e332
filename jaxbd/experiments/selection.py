"""Choosing a defense's hyper-parameters on held-out data, never on test data.

Pick your Poison's rule (Lukas & Kerschbaum, arXiv 2305.09671): among the settings whose held-out
ACC is at least the suspect model's held-out ACC minus `max_acc_drop` (3 points), take the one
with the lowest held-out ASR; ties go to the higher ACC. Without an eligible setting there is no
choice. The held-out images come from one of two places (`heldout_from`):

- `trusted` (the default, and the paper's): a random part (a third unless `heldout` is given) of
  the trusted set (`defense.clean_fraction`, drawn with `config.seed` from rows the attack did
  not touch, as `python -m jaxbd.main` draws it); the defense runs on the rest. No image beyond
  the defender's clean budget is used, and it works on the whole training split.
- `outside`: class-balanced training images outside the run's `data.train_limit` subset (the
  suspect never trained on them); the defense runs on the whole trusted set. This scores
  settings on more clean images than the budget (the CPU recipes' choices were made this way,
  with 5,000).

Neither is test data. `select` trains (or resumes) the config's backdoored model in the workdir
(or takes that of `standard.victim_from`), runs defense `name` once per grid cell on the same
trusted images with the same PRNG key, scores every defended model on the held-out images,
applies the rule, and writes `WORKDIR/selection.json`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import data as data_lib
from jaxbd import defenses, host
from jaxbd.data.dataset import balanced_indices
from jaxbd.errors import ConfigError
from jaxbd.experiments import common, preparation, results, standard


HELDOUT_FROM = ("trusted", "outside")
OUTSIDE_HELDOUT = 2000  # held-out images outside the subset unless `heldout` says otherwise


@dataclasses.dataclass(frozen=True)
class Heldout:
  """Held-out training images.

  Attributes:
    images: uint8[M, H, W, C].
    labels: int[M].
    indices: int64[M] their rows in the full training split (`outside`) or in the run's
      training set (`trusted`).
  """

  images: np.ndarray
  labels: np.ndarray
  indices: np.ndarray


def load_full(data_config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The dataset with the whole training split (`data.test_limit` still applies).

  Raises:
    ConfigError: the run trains on the whole training split (no image is held out).
  """
  if data_config.train_limit <= 0:
    raise ConfigError("--heldout_from=outside needs data.train_limit > 0 (the held-out images "
                      "are training images outside that subset); or hold out trusted images "
                      "with --heldout_from=trusted")
  full_config = ml_collections.ConfigDict(data_config.to_dict())
  full_config.train_limit = 0
  return data_lib.load(full_config)


def heldout_split(full: data_lib.Dataset, train_limit: int, size: int) -> Heldout:
  """`size` class-balanced training images of `full` outside its `train_limit` subset.

  Raises:
    ConfigError: too few images lie outside the subset.
  """
  outside = np.setdiff1d(np.arange(len(full.y_train)),
                         balanced_indices(full.y_train, train_limit))
  if not len(outside):
    raise ConfigError(f"data.train_limit {train_limit} takes all {len(full.y_train)} training "
                      "images, so none is left to hold out: lower it")
  if not 0 < size <= len(outside):
    raise ConfigError(f"--heldout {size} must be in [1, {len(outside)}] (training images "
                      "outside the subset)")
  rows = outside[balanced_indices(full.y_train[outside], size)]
  return Heldout(full.x_train[rows], full.y_train[rows], rows)


def trusted_heldout(trusted: defenses.Trusted, size: int,
                    key) -> tuple[defenses.Trusted, Heldout]:
  """(the trusted images a defense runs on, the `size` ones held out), split at random by `key`.

  Raises:
    ConfigError: `size` leaves either part empty.
  """
  m = len(trusted.labels)
  if not 0 < size < m:
    raise ConfigError(f"--heldout {size} must be in [1, {m - 1}] with --heldout_from=trusted "
                      f"(the {m} trusted images; defense.clean_fraction sets them)")
  kept, held = defenses.base.split_off(trusted, size, key)
  return kept, Heldout(held.images, held.labels, held.indices)


def keeps_accuracy(row: dict[str, float], reference_acc: float, max_acc_drop: float) -> bool:
  """Whether a setting's held-out ACC is at most `max_acc_drop` below the suspect model's (a loss
  of exactly `max_acc_drop` is kept: the comparison allows 1e-9 of float rounding)."""
  return row["acc"] >= reference_acc - max_acc_drop - 1e-9


def choose(reference_acc: float, rows: Sequence[dict[str, float]],
           max_acc_drop: float) -> Optional[int]:
  """The index of the chosen row (see the module docstring), or None.

  Args:
    reference_acc: the suspect model's held-out ACC.
    rows: held-out {"acc", "asr"} of each setting.
    max_acc_drop: the largest ACC loss allowed (0.03 = 3 points).
  """
  eligible = [i for i, r in enumerate(rows) if keeps_accuracy(r, reference_acc, max_acc_drop)]
  if not eligible:
    return None
  return min(eligible, key=lambda i: (rows[i]["asr"], -rows[i]["acc"]))


def defense_cells(config: ml_collections.ConfigDict, name: str,
                  cells: Sequence[dict[str, Any]]) -> list[ml_collections.ConfigDict]:
  """The config of each grid cell, validated; cells may set only `defense.<name>.*` fields.

  Raises:
    ConfigError: an unknown defense, a field outside its section, or an invalid value.
  """
  if name not in defenses.DEFENSES:
    raise ConfigError(f"--defense must be one of {sorted(defenses.DEFENSES)}, got {name!r}")
  prefix = f"defense.{name}."
  configs = []
  for cell in cells:
    outside = [path for path in cell if not path.startswith(prefix)]
    if outside:
      raise ConfigError(f"--grid may only set {prefix}* fields, got {outside[0]!r}")
    cell_config = config_lib.apply_cell(config, cell)
    config_lib.validate(cell_config)
    configs.append(cell_config)
  return configs


def select(config: ml_collections.ConfigDict, workdir: str, name: str,
           cells: Sequence[dict[str, Any]], *, heldout: Optional[int] = None,
           heldout_from: str = "trusted", max_acc_drop: float = 0.03) -> dict:
  """Runs defense `name` for each grid cell and chooses one on held-out images.

  Args:
    config: a standard-experiment config with a data-poisoning attack (and `data.train_limit`
      for `heldout_from="outside"`).
    workdir: run directory of the suspect model (resumed if it exists).
    name: the defense (a key of `jaxbd.defenses.DEFENSES`).
    cells: grid cells `{"defense.<name>.field": value}`.
    heldout: number of held-out images (None: a third of the trusted set for "trusted",
      `OUTSIDE_HELDOUT` for "outside").
    heldout_from: where they come from, "trusted" or "outside" (see the module docstring).
    max_acc_drop: the rule's ACC tolerance.

  Returns:
    The selection document (also written to `WORKDIR/selection.json`).

  Raises:
    JaxbdError: bad config, grid or data, before anything is trained.
  """
  if config.experiment != "standard" or config.poison.name == "none":
    raise ConfigError("held-out selection needs the standard experiment with a data-poisoning "
                      "attack")
  if preparation.prepares_attack(config):
    raise ConfigError("held-out selection trains the backdoored model only; it does not take "
                      "label-consistent poisoning (poison.adversarial.eps > 0), the latent "
                      "backdoor (attack.name=latent) or Refool's reflection selection, which "
                      "train models first")
  if not 0 <= max_acc_drop <= 1:
    raise ConfigError(f"--max_acc_drop must be in [0, 1], got {max_acc_drop}")
  if heldout_from not in HELDOUT_FROM:
    raise ConfigError(f"--heldout_from must be one of {list(HELDOUT_FROM)}, got {heldout_from!r}")
  configs = defense_cells(config, name, cells)
  if heldout_from == "outside":
    full = load_full(config.data)
    held = heldout_split(full, config.data.train_limit,
                         OUTSIDE_HELDOUT if heldout is None else heldout)
    dataset = data_lib.subset(full, config.data.train_limit)
  else:
    dataset = None
  # The defense is checked per cell (the base config's own section is never run) before the
  # suspect trains, e.g. a D3 layer the model lacks.
  run = common.build(config, workdir, dataset, [])
  trusted = run.trusted(config.defense.clean_fraction)
  if heldout_from == "trusted":
    size = (defenses.base.holdout_count(len(trusted.labels), 1 / 3, "the default held-out third")
            if heldout is None else heldout)
    trusted, held = trusted_heldout(trusted, size, common.phase_key(run, "selection/heldout"))
  shapes = common.abstract_variables(run.model, run.key, run.dataset.image_shape)
  for cell_config in configs:
    common.check_components(cell_config, run.model, shapes, run.dataset, run.plan, [name])
  victim = (standard.borrowed_victim(run, ["backdoored"]) if config.standard.victim_from
            else None)
  common.create_workdir(run)
  evaluate = lambda v: run.evaluate(v, held.images, held.labels)
  if victim is None:  # its evaluations during training are on the held-out images too
    variables, _ = common.train_classifier(run, "backdoored", poisoned=True, evaluate=evaluate)
  else:
    variables = victim["backdoored"]
  ctx = run.defense_context()
  key = common.phase_key(run, f"defense/{name}")
  reference = evaluate(variables)
  rows = []
  for i, (cell, cell_config) in enumerate(zip(cells, configs)):
    defended, _ = defenses.DEFENSES[name].build(ctx, variables, trusted,
                                               cell_config.defense[name], key)
    rows.append({"cell": dict(cell), **evaluate(defended)})
    measured = ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if k != "cell")
    host.say(f"selection: setting {i} ({i + 1}/{len(cells)}) {cell} -> {measured}")
  chosen = choose(reference["acc"], rows, max_acc_drop)
  doc = {"defense": name, "heldout": {"from": heldout_from, "size": int(len(held.labels)),
                                      "indices": held.indices.tolist()},
         "trusted_size": int(len(trusted.labels)), "max_acc_drop": max_acc_drop,
         "suspect": reference, "settings": rows, "chosen": chosen,
         "config": config.to_dict(), "versions": results.versions()}
  results.write_json(os.path.join(workdir, "selection.json"), doc)
  return doc


def table(doc: dict) -> str:
  """A markdown table of a selection document: one row per setting, the suspect model first."""
  fields = list(doc["settings"][0]["cell"]) if doc["settings"] else []
  rows = [["suspect"] + [""] * len(fields) +
          [doc["suspect"][k] for k in ("acc", "asr", "ra")] + ["", ""]]
  for i, r in enumerate(doc["settings"]):
    eligible = keeps_accuracy(r, doc["suspect"]["acc"], doc["max_acc_drop"])
    rows.append([str(i)] + [results.config_cell(r["cell"][f]) for f in fields]
                + [r[k] for k in ("acc", "asr", "ra")]
                + ["yes" if eligible else "no", "<-" if i == doc["chosen"] else ""])
  return results.markdown_table(["setting", *fields, "ACC", "ASR", "RA", "eligible", "chosen"],
                                rows)
