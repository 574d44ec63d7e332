"""Poison plans: which training rows are poisoned, their new labels, and the target.

A plan is computed once on the host from the config's seed and saved in the workdir
(`poison_plan.npz`, with the arrays of the trigger its rows get), so a run can be audited and
re-created exactly; a rerun in the same workdir checks that it draws the same plan and trigger.
Inside the jitted step the plan is only an int8 `kind` per example (0 clean, 1 poisoned, 2 cover)
and the relabeled labels; `poison_fn` turns a trigger into the per-batch transform that
`jaxbd.data.gather_batch` applies.

Label modes (BackdoorBench names):
- `all2one`: poisoned rows get label `target`; rows are drawn from non-target classes unless
  `exclude_target` is False.
- `all2all`: label y -> (y + 1) % K.
- `clean_label`: rows are drawn from the target class and keep their label (e.g. SIG).

The number of poisoned rows is `int(rate * N)` for N training images.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbd import fileio, host
from jaxbd.errors import CheckpointError, ConfigError, DataError, first_line

CLEAN, POISONED, COVER = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class PoisonPlan:
  """Which rows an attack poisons, and how.

  Attributes:
    target: target class (all2one and clean_label).
    label_mode: all2one | all2all | clean_label.
    indices: int64[P] sorted training rows that get the trigger (kind 1).
    cover_indices: int64[Q] sorted rows that get the cover transform and keep their label (kind 2).
    labels: int32[N] training labels after poisoning.
  """

  target: int
  label_mode: str
  indices: np.ndarray
  cover_indices: np.ndarray
  labels: np.ndarray

  @property
  def kind(self) -> np.ndarray:
    """int8[N]: 0 clean, 1 poisoned, 2 cover."""
    kind = np.zeros(len(self.labels), np.int8)
    kind[self.cover_indices] = COVER
    kind[self.indices] = POISONED
    return kind

  def records(self, trigger=None) -> dict[str, np.ndarray]:
    """The arrays a plan file holds: target, label_mode, indices, cover_indices, labels and,
    with a trigger, its array leaves by path (`trigger_arrays`)."""
    arrays = dict(target=self.target, label_mode=self.label_mode, indices=self.indices,
                  cover_indices=self.cover_indices, labels=self.labels)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return {**arrays, **(trigger_arrays(trigger) if trigger is not None else {})}

  def save(self, path: str, trigger=None) -> None:
    """Writes the plan, and the array leaves of the trigger its rows get, as .npz atomically
    (temp file + rename)."""
    with fileio.atomic_file(path, "wb") as f:
      np.savez_compressed(f, **self.records(trigger))

  def save_or_check(self, path: str, trigger=None) -> None:
    """Saves the plan at `path` (`save`; process 0 of a multi-host run), or, where an earlier run
    in the same workdir saved one, checks that it is this plan (`check`): a rerun resumes training
    on the rows and trigger the first run trained on, or refuses. Every process that sees the file
    checks it, so that all of a multi-host run's processes stop, not process 0 alone.

    Raises:
      CheckpointError: the saved plan is unreadable or differs.
    """
    if not os.path.exists(path):
      if host.is_writer():
        self.save(path, trigger)
      return
    self.check(path, trigger)

  def check(self, path: str, trigger=None, remedy: str = "use a new --workdir") -> None:
    """Checks that the plan file at `path` holds this plan and trigger.

    Raises:
      CheckpointError("... ; <remedy>"): the file is missing or unreadable, or holds another
        plan (the data changed, or the random numbers of another JAX version), naming the
        first array that differs.
    """
    try:
      with fileio.load_npz(path) as z:
        saved = {k: z[k] for k in z.files}
    except fileio.NPZ_ERRORS as e:
      raise CheckpointError(f"poison plan {path} is unreadable ({first_line(e)}); "
                            f"{remedy}") from None
    now = self.records(trigger)
    differ = [k for k in sorted(set(saved) | set(now))
              if k not in saved or k not in now or not same_array(saved[k], now[k])]
    if differ:
      first = differ[0]
      why = ("the data or the random numbers changed" if first in saved and first in now else
             f"the saved plan lacks {first}: an older jaxbd wrote it" if first in now else
             f"this run's plan has no {first}")
      raise CheckpointError(f"{path} holds another poison plan than this run draws (first "
                            f"difference: {first}; {why}); {remedy}")


def trigger_arrays(trigger) -> dict[str, np.ndarray]:
  """The array leaves of a trigger pytree by path, e.g. `{"trigger/mask": f32[H, W, 1],
  "trigger/pattern": f32[H, W, C]}` for BadNets (static fields are the config's); a PRNG key
  leaf (BadPatches' `key`) as its uint32 key data."""

  def host(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)

  leaves, _ = jax.tree_util.tree_flatten_with_path(trigger)
  return {"trigger/" + jax.tree_util.keystr(path, simple=True, separator="/"): host(leaf)
          for path, leaf in leaves}


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether two saved arrays agree: shape and dtype, integers and strings exactly, floats to
  1e-5 (a trigger computed on another device may differ in the last bits)."""
  if a.shape != b.shape or a.dtype != b.dtype:
    return False
  if np.issubdtype(a.dtype, np.floating):
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))
  return bool(np.array_equal(a, b))


def load_plan(path: str) -> PoisonPlan:
  """Reads a plan written by `PoisonPlan.save`.

  Raises:
    DataError: the file is unreadable, or its arrays are not a plan's: an integer target, a
      label mode, 1-D integer rows and labels, rows that index the labels.
  """
  try:
    with fileio.load_npz(path) as z:
      a = {k: z[k] for k in ("target", "label_mode", "indices", "cover_indices", "labels")}
  except fileio.NPZ_ERRORS as e:
    raise DataError(f"poison plan {path}: unreadable ({e})") from None
  for key, ndim in (("target", 0), ("indices", 1), ("cover_indices", 1), ("labels", 1)):
    if a[key].ndim != ndim or not np.issubdtype(a[key].dtype, np.integer):
      raise DataError(f"poison plan {path}: {key} is not a {ndim}-D integer array (dtype "
                      f"{a[key].dtype}, shape {list(a[key].shape)})")
  if a["label_mode"].ndim != 0 or a["label_mode"].dtype.kind != "U":
    raise DataError(f"poison plan {path}: label_mode is not a string")
  n = len(a["labels"])
  for key in ("indices", "cover_indices"):
    if a[key].size and (a[key].min() < 0 or a[key].max() >= n):
      raise DataError(f"poison plan {path}: {key} holds rows outside the plan's {n} labels")
  return PoisonPlan(int(a["target"]), str(a["label_mode"]), a["indices"], a["cover_indices"],
                    a["labels"])


def fraction_count(rate: float, n: int) -> int:
  """int(rate * n), rounded first so that float error (0.57 * 100 = 56.99...) does not drop one."""
  return int(round(rate * n, 6))


def poisoned_label(labels, label_mode: str, target: int, num_classes: int):
  """The label each example gets when poisoned.

  Args:
    labels: int[N] clean labels, a numpy array (host plans and metrics) or a jax array, traced
      inside jit too (the poisoned batches of `jaxbd.attacks.pcb`).
    label_mode: all2one | all2all | clean_label.
    target: target class.
    num_classes: K.

  Returns:
    int[N] of labels' dtype and array type (a new array).
  """
  xp = np if isinstance(labels, np.ndarray) else jnp
  if label_mode == "all2one":
    return xp.full_like(labels, target)
  if label_mode == "all2all":
    return (labels + 1) % num_classes
  if label_mode == "clean_label":
    return labels.copy()
  raise ConfigError(f"unknown label mode {label_mode!r}")


def make_plan(labels: np.ndarray, num_classes: int, *, rate: float, target: int,
              label_mode: str = "all2one", seed: int = 0, exclude_target: bool = True,
              cover_rate: float = 0.0) -> PoisonPlan:
  """Draws the poisoned (and cover) rows of a training set.

  Args:
    labels: int[N] clean training labels.
    num_classes: K.
    rate: fraction of N that is poisoned (`int(rate * N)` rows).
    target: target class.
    label_mode: all2one | all2all | clean_label.
    seed: seed of the draw (numpy Generator).
    exclude_target: all2one: draw only from non-target classes.
    cover_rate: fraction of N given the cover transform (labels kept), drawn from every row not
      poisoned, of any class (as Adaptive-Blend's and WaNet's reference code draw them), also
      under clean-label poisoning, whose cover rows must contradict the trigger.

  Raises:
    ConfigError: the target is not a class, the pool is smaller than the poisoned count, or the
      training set is smaller than the poisoned and cover counts together.
  """
  labels = np.asarray(labels)
  n = len(labels)
  if not 0 <= target < num_classes:
    raise ConfigError(f"poison.target {target} is not a class of this dataset "
                      f"(0..{num_classes - 1})")
  if label_mode == "clean_label":
    pool = np.flatnonzero(labels == target)
  elif label_mode == "all2one" and exclude_target:
    pool = np.flatnonzero(labels != target)
  else:
    pool = np.arange(n)
  count, cover_count = fraction_count(rate, n), fraction_count(cover_rate, n)
  if count > len(pool):
    raise ConfigError(f"poison.rate {rate} asks for {count} poisoned images but only "
                      f"{len(pool)} are eligible ({label_mode})")
  if count + cover_count > n:
    raise ConfigError(f"poison.rate {rate} asks for {count} poisoned and {cover_count} cover "
                      f"images but the training set has {n}")
  rng = np.random.default_rng(seed)
  indices = np.sort(rng.permutation(pool)[:count])
  cover = np.sort(rng.permutation(np.setdiff1d(np.arange(n), indices))[:cover_count])
  new_labels = labels.astype(np.int32).copy()
  new_labels[indices] = poisoned_label(labels[indices], label_mode, target, num_classes)
  return PoisonPlan(target, label_mode, indices.astype(np.int64), cover.astype(np.int64),
                    new_labels)


def row_key(phase_key: jax.Array) -> jax.Array:
  """The `row_key` of `poison_fn` for a training phase whose PRNG key is `phase_key` (its init and
  train keys are `split(phase_key)`, an in-loop attack's `fold_in(phase_key, 2)`)."""
  return jax.random.fold_in(phase_key, 3)


def marked_bound(kind: np.ndarray, batch_size: int, shards: int = 1) -> int:
  """A `max_marked` for `poison_fn`: a bound that a shard of `batch_size / shards` rows drawn
  without replacement from a plan with roles int8[N] `kind` rarely exceeds in marked (poisoned or
  cover) rows: mean + 3 standard deviations + 1, rounded up, at most the shard.

  With 10% marked rows and batch 128 it is 24 (mean 12.8; a batch exceeds it with probability
  about 1e-3, and such a batch takes the whole-batch path of `poison_fn`); on 4
  devices, 10 per 32-row shard."""
  rows = batch_size // shards
  share = float(np.mean(np.asarray(kind) != CLEAN)) if len(kind) else 0.0
  mean = rows * share
  return min(rows, math.ceil(mean + 3 * math.sqrt(mean * (1 - share)) + 1))


def poison_fn(trigger, row_key: Optional[jax.Array] = None, max_marked: Optional[int] = None,
              shards: int = 1):
  """The batch transform of a trigger: poisoned rows get `trigger`, cover rows `trigger.cover`.

  A trigger's random choices in training (Adaptive-Blend's and Adaptive-Patch's kept pieces,
  TSB's mark, random BadPatches cells, WaNet's noise mode) are drawn
  - with `row_key`, once per training row, from `fold_in(row_key, row)`: a row looks the same in
    every epoch, as in the references' poisoned training sets, which are built once before
    training (data poisoning with a plan);
  - without, anew at every step from the step's key (attacks that poison whichever rows a batch
    holds, in the loop).

  With `row_key` and `max_marked`, the batch is cut into `shards` consecutive shards (its
  devices' parts under data parallelism); where no shard has more than `max_marked` marked
  (poisoned or cover) rows, each shard runs the trigger on its marked rows only, gathered into
  `max_marked` slots and scattered back (Refool's filter costs 0.4 s per batch of 128 on 2 CPU
  cores, a tenth of it on its marked rows), else every row of the batch runs it (a `lax.cond`):
  the images are the same either way up to float rounding (each row's draw depends on its row
  alone, but XLA vectorizes the two paths differently: on CIFAR-10 with Refool, half of the
  marked rows differ by one unit in the last place, which moves a 3-epoch CPU victim's ACC and
  ASR by tenths of a point). Leave it None where the function is vmapped (a population): there
  the cond would run both branches. `marked_bound` gives a value.

  Returns:
    fn(images f32[B, H, W, C], kind int8[B], rows int32[B], key) -> images.
  """
  triggered = lambda x, k: trigger(x, k, train=True)

  def per_row(transform, images, keys):
    return jax.vmap(lambda x, k: transform(x[None], k)[0])(images, keys)

  def mix(images, kind, poisoned, covered):
    kind = kind[:, None, None, None]
    images = jnp.where(kind == POISONED, poisoned, images)
    return jnp.where(kind == COVER, covered, images)

  def by_row(images, kind, rows):
    keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(row_key, r)))(rows)
    return mix(images, kind, per_row(triggered, images, keys[:, 0]),
               per_row(trigger.cover, images, keys[:, 1]))

  def marked_only(images, kind, rows):
    slots = jnp.flatnonzero(kind != CLEAN, size=max_marked, fill_value=images.shape[0])
    take = lambda x: jnp.take(x, slots, axis=0, mode="clip")
    return images.at[slots].set(by_row(take(images), take(kind), take(rows)), mode="drop")

  def split(x):
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])

  def fn(images: jax.Array, kind: jax.Array, rows: jax.Array, key: jax.Array) -> jax.Array:
    if row_key is None:
      k_poison, k_cover = jax.random.split(key)
      return mix(images, kind, triggered(images, k_poison), trigger.cover(images, k_cover))
    if max_marked is None or max_marked >= images.shape[0] // shards:
      return by_row(images, kind, rows)
    fits = jnp.max(jnp.sum(split(kind) != CLEAN, axis=1)) <= max_marked
    sharded = lambda *a: jax.vmap(marked_only)(*map(split, a)).reshape(images.shape)
    return jax.lax.cond(fits, sharded, by_row, images, kind, rows)

  return fn


def phase_poison_fn(trigger, phase_key: jax.Array, kind: np.ndarray, batch_size: int,
                    shards: int = 1, marked_only: bool = True):
  """`poison_fn` of a training phase whose PRNG key is `phase_key` and whose plan has roles
  int8[N] `kind`: per-row draws from `row_key(phase_key)`, the trigger run on each of a batch's
  `shards` parts' marked rows (`marked_bound`), or on every row without `marked_only`."""
  bound = marked_bound(kind, batch_size, shards) if marked_only else None
  return poison_fn(trigger, row_key(phase_key), bound, shards)
