"""Attack preparation: what the standard experiment does with trained models before it trains
the backdoored one, each saved in the workdir so that a rerun reuses it (a run that defends
another run's models, `standard.victim_from`, reads that run's instead).

- `perturb_poisoned_rows`: label-consistent poisoning (`poison.adversarial.eps` > 0) replaces
  the poisoned rows by PGD perturbations against the clean model (`adversarial_rows.npz`);
- `fit_latent_trigger`: the Latent Backdoor (`attack.name=latent`) fits its trigger to the
  target's mean features on the clean model (`latent_trigger.npz`);
- `select_reflections`: Refool's selection rounds (`poison.refool.select_rounds` > 0) choose
  its reflection pool (`refool_selection.npz`); `selection_inputs` makes what they need before
  the workdir exists.

Each returns the run with the prepared data or trigger and a summary for results.json's attack
section.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import analysis, attacks, fileio, host, poison
from jaxbd import metrics as metrics_lib
from jaxbd import train as train_lib
from jaxbd.errors import CheckpointError, ConfigError, first_line
from jaxbd.experiments import common


def prepares_attack(config: ml_collections.ConfigDict) -> bool:
  """Whether the experiment prepares the attack with trained models before the backdoored
  phase: label-consistent PGD rows, the Latent Backdoor's fitted trigger, Refool's selection."""
  return (poison.adversarial.enabled(config) or config.attack.name == "latent"
          or poison.refool.selects(config))


def saved_files(config: ml_collections.ConfigDict) -> list[str]:
  """The files the preparations of `config` save in the workdir, for a rerun to read back."""
  return ([name for name, used in (
      ("adversarial_rows.npz", poison.adversarial.enabled(config)),
      ("latent_trigger.npz", config.attack.name == "latent"),
      ("refool_selection.npz", poison.refool.selects(config))) if used])


def saved_path(r: common.Run, name: str) -> str:
  """Where preparation file `name` is read from, or written to where it is absent: the run's
  workdir, or that of the run whose models it defends (`standard.victim_from`), which prepared
  the same attack (`jaxbd.experiments.standard.borrowed_victim` checks that it is there)."""
  return os.path.join(r.config.standard.victim_from or r.workdir, name)


def prepare(r: common.Run, clean: Optional[dict],
            selection: Optional[tuple[np.ndarray, np.ndarray]]) -> tuple[common.Run, dict]:
  """Every preparation the run's config asks for, with the `clean` model's variables and
  Refool's `selection_inputs`: the prepared run and the entries for results.json's attack
  section."""
  c, extra = r.config, {}
  if poison.adversarial.enabled(c):
    r, rows = perturb_poisoned_rows(r, clean)
    extra["adversarial"] = {**c.poison.adversarial.to_dict(), **rows}
  if c.attack.name == "latent":
    r, extra["latent_trigger"] = fit_latent_trigger(r, clean)
  if poison.refool.selects(c):
    r, extra["refool_selection"] = select_reflections(r, *selection)
  return r, extra


def perturb_poisoned_rows(r: common.Run, surrogate: dict) -> tuple[common.Run, dict]:
  """The run with the poisoned training rows replaced by their PGD perturbations against the
  `surrogate` variables (`jaxbd.poison.adversarial`), and a summary for results.json: the
  surrogate's accuracy on those rows before and after, and the largest change in grey levels.
  The perturbed rows are saved with their indices in `WORKDIR/adversarial_rows.npz`, which a
  rerun (resuming the backdoored phase) reads back instead of perturbing again.

  Raises:
    CheckpointError: the saved file is unreadable or holds other rows.
  """
  ds, rows = r.dataset, r.plan.indices
  original, labels = ds.x_train[rows], ds.y_train[rows]
  path = saved_path(r, "adversarial_rows.npz")
  if os.path.exists(path):
    perturbed = saved_rows(path, rows, original)
  else:
    perturbed = poison.adversarial.perturb(
        r.model, surrogate, original, labels, r.config.poison.adversarial,
        r.config.eval.batch_size, lambda x: train_lib.put_replicated(x, r.mesh))
    if host.is_writer():
      with fileio.atomic_file(path, "wb") as f:
        np.savez(f, indices=rows, images=perturbed)
  x_train = ds.x_train.copy()
  x_train[rows] = perturbed
  summary = {"surrogate_acc_before": metrics_lib.accuracy(r.predict(surrogate, original), labels),
             "surrogate_acc_after": metrics_lib.accuracy(r.predict(surrogate, perturbed), labels),
             "max_change": int(np.abs(perturbed.astype(int) - original).max(initial=0)),
             "rows": os.path.relpath(path, r.workdir)}
  return dataclasses.replace(r, dataset=dataclasses.replace(ds, x_train=x_train)), summary


def saved_rows(path: str, rows: np.ndarray, original: np.ndarray) -> np.ndarray:
  """The perturbed images of `adversarial_rows.npz` if it holds the int[P] `rows`, as uint8
  images of `original`'s shape (CheckpointError otherwise)."""
  indices, images = read_saved(path, "indices", "images")
  check_saved(np.array_equal(indices, rows) and images.shape == original.shape
              and images.dtype == np.uint8, path, "holds other rows than this run's poison plan")
  return images


def fit_latent_trigger(r: common.Run, teacher: dict) -> tuple[common.Run, dict]:
  """The run with its trigger's pattern fitted to the target class's mean penultimate features
  on the clean `teacher` variables (`jaxbd.attacks.latent`), and a summary for results.json: the
  latent distance of the configured and of the fitted trigger. The fitted pattern is saved as
  `WORKDIR/latent_trigger.npz`, which a rerun reads back instead of fitting again.

  Raises:
    CheckpointError: the saved file is unreadable or does not fit the trigger.
  """
  c, ds = r.config, r.dataset
  put = lambda x: train_lib.put_replicated(x, r.mesh)
  is_target = ds.y_train == c.poison.target
  target = jnp.asarray(analysis.penultimate_features(
      r.model, teacher, ds.x_train[is_target], batch_size=c.eval.batch_size).mean(0))
  others = np.flatnonzero(~is_target)
  path = saved_path(r, "latent_trigger.npz")
  if os.path.exists(path):
    fitted = r.trigger.replace(pattern=saved_pattern(path, np.asarray(r.trigger.pattern)))
  else:
    fitted = attacks.latent.fit_trigger(r.model, teacher, r.trigger, ds.x_train[others], target,
                                        c.attack.latent, common.phase_key(r, "latent"), put)
    if host.is_writer():
      with fileio.atomic_file(path, "wb") as f:
        np.savez(f, pattern=np.asarray(fitted.pattern), mask=np.asarray(fitted.mask))
  summary = attacks.latent.distances(r.model, teacher, {"before": r.trigger, "after": fitted},
                                     put(ds.x_train[others[:c.attack.latent.trigger_batch]]),
                                     target)
  return dataclasses.replace(r, trigger=fitted), {**summary,
                                                  "file": os.path.relpath(path, r.workdir)}


def saved_pattern(path: str, like: np.ndarray) -> np.ndarray:
  """The fitted pattern of `latent_trigger.npz`, f32 of `like`'s shape (CheckpointError
  otherwise)."""
  return saved_like(path, {"pattern": like})["pattern"]


def saved_like(path: str, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The arrays of `path` named as in `like`, each of its counterpart's shape and dtype.

  Raises:
    CheckpointError: the file is unreadable, lacks an array, or holds one of another shape or
      dtype.
  """
  saved = dict(zip(like, read_saved(path, *like)))
  for name, array in saved.items():
    want = np.asarray(like[name])
    check_saved(array.shape == want.shape and array.dtype == want.dtype, path,
                f"holds a {array.dtype}{list(array.shape)} {name}, this run's trigger has "
                f"{want.dtype}{list(want.shape)}")
  return saved


def selection_inputs(r: common.Run) -> tuple[np.ndarray, np.ndarray]:
  """Refool's selection candidates f32[N, H, W, C] and scoring images uint8[M, H, W, C]
  (`scoring_images`), made before the workdir so that a bad source or count leaves no files.

  Raises:
    DataError, ConfigError: the reflection source is unreadable or too small, or too few
      scoring images.
  """
  c = r.config.poison.refool
  candidates = poison.refool.reflection_pool(c, r.dataset.image_shape, r.config.seed,
                                             c.candidates)
  return candidates, scoring_images(r, c.select_images)


def select_reflections(r: common.Run, candidates: np.ndarray,
                       scoring: np.ndarray) -> tuple[common.Run, dict]:
  """The run with Refool's reflection pool chosen among f32[N, H, W, C] `candidates` by the
  paper's selection rounds (`jaxbd.poison.refool`; each round trains the victim for
  `select_epochs` on the poison plan as phase `refool_round_<i>` and scores the chosen
  reflections on uint8[M, H, W, C] `scoring` images), and a summary for results.json: per round,
  the mean share of the scoring images that a chosen reflection turns to the target. The chosen
  candidates are saved as `WORKDIR/refool_selection.npz`, which a rerun reads back instead of
  selecting again.

  Raises:
    CheckpointError: the saved file is unreadable or does not fit the candidates.
  """
  c, target = r.config.poison.refool, r.config.poison.target
  path = saved_path(r, "refool_selection.npz")
  if os.path.exists(path):
    chosen, history = saved_selection(path, c)
  else:
    rounds = r.config.train.copy_and_resolve_references()
    rounds.update(epochs=c.select_epochs, eval_every=0, checkpoint_every=0)
    weights, history = np.ones(c.candidates), []
    for i in range(c.select_rounds):
      chosen = poison.refool.top_candidates(weights, c.count)
      trial = dataclasses.replace(r, trigger=r.trigger.replace(
          reflections=jnp.asarray(candidates[chosen])))
      variables, _ = common.train_classifier(trial, f"refool_round_{i}", poisoned=True,
                                             train_config=rounds)
      scores = poison.refool.effectiveness(r.predict, variables, trial.trigger, scoring, target)
      history.append(float(scores.mean() / len(scoring)))
      weights = poison.refool.update_weights(weights, chosen, scores)
    chosen = poison.refool.top_candidates(weights, c.count)
    if host.is_writer():
      with fileio.atomic_file(path, "wb") as f:
        np.savez(f, chosen=chosen, round_success=np.asarray(history))
  trigger = r.trigger.replace(reflections=jnp.asarray(candidates[chosen]))
  return dataclasses.replace(r, trigger=trigger), {
      "rounds": c.select_rounds, "candidates": c.candidates, "round_success": list(history),
      "file": os.path.relpath(path, r.workdir)}


def scoring_images(r: common.Run, count: int) -> np.ndarray:
  """uint8[count, H, W, C]: non-target training images the attack did not touch, drawn with the
  run's seed, on which selection rounds score reflections (never test images).

  Raises:
    ConfigError: fewer than `count` such images.
  """
  ds = r.dataset
  pool = np.flatnonzero((r.plan.kind == poison.CLEAN) & (ds.y_train != r.config.poison.target))
  if len(pool) < count:
    raise ConfigError(f"poison.refool.select_images {count} is more than the {len(pool)} "
                      "untouched non-target training images")
  rows = np.random.default_rng((r.config.seed, 0x5c0e)).permutation(pool)[:count]
  return ds.x_train[np.sort(rows)]


def saved_selection(path: str, c: ml_collections.ConfigDict) -> tuple[np.ndarray, list]:
  """The chosen candidates and per-round success of `refool_selection.npz` if they fit the
  section `c` (CheckpointError otherwise)."""
  chosen, history = read_saved(path, "chosen", "round_success")
  check_saved(chosen.shape == (c.count,) and len(history) == c.select_rounds
              and chosen.min(initial=0) >= 0 and chosen.max(initial=0) < c.candidates, path,
              f"does not hold a choice of {c.count} of {c.candidates} candidates over "
              f"{c.select_rounds} rounds")
  return chosen, history.tolist()


def read_saved(path: str, *keys: str) -> list[np.ndarray]:
  """The arrays `keys` of a file that an earlier run in this workdir saved to reuse.

  Raises:
    CheckpointError: the file is unreadable or lacks a key.
  """
  try:
    with fileio.load_npz(path) as z:
      return [z[k] for k in keys]
  except fileio.NPZ_ERRORS as e:
    raise CheckpointError(f"{path} is unreadable ({first_line(e)}); delete it or use a new "
                          "--workdir") from None


def check_saved(ok: bool, path: str, what: str) -> None:
  """Raises CheckpointError("<path> <what>; delete it or ...") unless `ok`."""
  if not ok:
    raise CheckpointError(f"{path} {what}; delete it or use a new --workdir")
