"""What every post-training defense receives: the context, trusted data, and train-style sections.

A defense is a pure function

    defense(ctx: Context, variables, trusted: Trusted, config, key) -> (variables, report)

over the suspect model's variables. `trusted` is the small clean set the defender holds (drawn by
`trusted_split` from training rows the attack did not touch); `config` is the defense's section
`config.defense.<name>`; `report` is a JSON-able dict. A defense never sees test data: to report
intermediate models (e.g. fine-pruning's pruned-only stage) it returns their variables under
`report["stages"][name]`, and the experiment evaluates them. `ctx.evaluate` exists only to log
progress; a defense must not use it to choose anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import train as train_lib
from jaxbd.errors import ConfigError
from jaxbd.poison import plan as plan_lib


@dataclasses.dataclass(frozen=True)
class Trusted:
  """The defender's clean data.

  Attributes:
    images: uint8[M, H, W, C].
    labels: int32[M] true labels.
    indices: int64[M] their rows in the training set (for the record).
  """

  images: np.ndarray
  labels: np.ndarray
  indices: np.ndarray


@dataclasses.dataclass(frozen=True)
class Context:
  """Everything about the run a defense may use besides the variables and data.

  Attributes:
    model: the suspect model's module.
    mesh: device mesh.
    data_config: the run's `data` section (augmentation settings).
    num_classes: K.
    workdir: run directory for the defense's checkpoints and metrics (None: none).
    evaluate: `variables -> metrics` for progress logs only (None: no logging).
    progress: show progress bars.
    log_every: steps between train-metric records in the defense's metrics.jsonl.
    step_cache: the compiled train steps of the defenses run in this context, so that running one
      again (a detection population's repairs) compiles nothing new (`jaxbd.train.StepCache`).
    origin: `jaxbd.train.checkpoint.fingerprint` of the suspect model, saved with the defenses'
      checkpoints in `workdir`: a rerun refuses those of another model (None: not checked).
  """

  model: Any
  mesh: jax.sharding.Mesh
  data_config: ml_collections.ConfigDict
  num_classes: int
  workdir: Optional[str] = None
  evaluate: Optional[Callable[[dict], dict]] = None
  progress: bool = True
  log_every: int = 50
  step_cache: train_lib.StepCache = dataclasses.field(default_factory=train_lib.StepCache)
  origin: Optional[str] = None


# Where the trusted set is drawn from (`defense.trusted_from`): the rows the attack left untouched
# (kind 0), or every row in its clean form (BackdoorBench's clean_train draw: a clean-label attack
# that triggers a whole class leaves none of it untouched).
TRUSTED_FROM = ("untouched", "all")


def trusted_pool(kind: np.ndarray, fraction: float,
                 source: str = "untouched") -> tuple[int, np.ndarray]:
  """(`round(fraction * N)`, the int[P] rows it is drawn from) for a trusted set of `fraction` of
  the N rows of the poison plan roles `kind`: those of kind 0, or all (`source`, see
  `TRUSTED_FROM`).

  Raises:
    ConfigError: fewer clean rows than requested, or none requested.
  """
  count = int(round(fraction * len(kind)))
  pool = np.arange(len(kind)) if source == "all" else np.flatnonzero(kind == plan_lib.CLEAN)
  if count < 1 or count > len(pool):
    raise ConfigError(f"defense.clean_fraction {fraction} asks for {count} trusted images; "
                      f"{len(pool)} clean training images are available")
  return count, pool


def trusted_split(images: np.ndarray, labels: np.ndarray, kind: np.ndarray, fraction: float,
                  seed: int, source: str = "untouched") -> Trusted:
  """Draws `round(fraction * N)` rows at random from the rows the attack left clean (kind 0), or
  from all rows (`source="all"`: their clean images and true labels).

  Args:
    images: uint8[N, H, W, C] clean training images.
    labels: int[N] true (clean) training labels.
    kind: int8[N] poison plan roles (0: untouched).
    fraction: size of the trusted set as a fraction of N (0.01 = 1%).
    seed: seed of the draw.
    source: "untouched" or "all" (`TRUSTED_FROM`).

  Raises:
    ConfigError: fewer clean rows than requested.
  """
  count, pool = trusted_pool(kind, fraction, source)
  idx = np.sort(np.random.default_rng([seed, 7]).choice(pool, count, replace=False))
  return Trusted(images[idx], np.asarray(labels)[idx].astype(np.int32), idx)


def holdout_count(size: int, fraction: float, name: str = "a held-out fraction") -> int:
  """`round(fraction * size)`, the held-out part of `size` trusted images.

  Raises:
    ConfigError: either part would be empty (the message names the setting `name`).
  """
  count = int(round(fraction * size))
  if not 0 < count < size:
    raise ConfigError(f"{name} {fraction} of {size} trusted images holds out {count}: one part "
                      "would be empty")
  return count


def holdout(trusted: Trusted, fraction: float, key: jax.Array,
            name: str = "a held-out fraction") -> tuple[Trusted, Trusted]:
  """Splits the trusted set at random into (kept, held out), `round(fraction * M)` held out.

  Raises:
    ConfigError: either part would be empty (see `holdout_count`).
  """
  return split_off(trusted, holdout_count(len(trusted.labels), fraction, name), key)


def split_off(trusted: Trusted, count: int, key: jax.Array) -> tuple[Trusted, Trusted]:
  """Splits the trusted set at random into (kept, `count` held out), each in row order."""
  order = np.asarray(jax.random.permutation(key, len(trusted.labels)))

  def part(rows):
    rows = np.sort(rows)
    return Trusted(trusted.images[rows], trusted.labels[rows], trusted.indices[rows])

  return part(order[count:]), part(order[:count])


def train_section(**values: Any) -> ml_collections.ConfigDict:
  """A train-style config section (see `jaxbd.config.train_defaults`) with a defense's defaults."""
  section = config_lib.train_defaults()
  for key, value in values.items():
    section[key] = value
  return section
