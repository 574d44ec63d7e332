"""The standard experiment: train a clean and a poisoned model, defend, evaluate, write results.

Phases: `clean` (optional, `standard.train_clean`) trains on the clean training set; `backdoored`
trains on the poisoned set of `config.poison` (with `poison.adversarial.eps` > 0 its rows first
get a PGD perturbation against the clean model, `jaxbd.poison.adversarial`, saved as
`WORKDIR/adversarial_rows.npz`; with `attack.name=latent` the trigger is first fitted to the
clean model's latent space, `jaxbd.attacks.latent`, saved as `WORKDIR/latent_trigger.npz`); then
each defense of `defense.names` runs on the backdoored model
with the trusted clean data. Every model is evaluated on ACC and, with the
attack's trigger, ASR and RA (the clean model's ASR is the trigger's baseline); defenses also get
DER. Writes `WORKDIR/results.json` and prints a table.

`run_population` runs several such experiments that differ only in `seed` with each phase's models
trained as one vmapped population (`python -m jaxbd.sweep --vmap_seeds`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np

from jaxbd import attacks
from jaxbd import config as config_lib
from jaxbd import fileio
from jaxbd import metrics as metrics_lib
from jaxbd import poison
from jaxbd import train as train_lib
from jaxbd.errors import CheckpointError, ConfigError, first_line
from jaxbd.experiments import common, population, report, results


def default_config() -> ml_collections.ConfigDict:
  """The `standard` section: whether a clean reference model is trained too."""
  return ml_collections.ConfigDict(dict(
      train_clean=True,  # also train a clean model of the same architecture as the reference
  ))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment and returns the results document (also written to the workdir)."""
  r = common.prepare(config, workdir)
  metrics, timing, attack_extra = {}, {}, {}
  variables: Optional[dict] = None
  for phase in phases(config):
    poisoned = phase == "backdoored" and config.poison.name != "none"
    if poisoned and poison.adversarial.enabled(config):
      r, rows = perturb_poisoned_rows(r, variables)  # the clean phase's model
      attack_extra["adversarial"] = {**config.poison.adversarial.to_dict(), **rows}
    if poisoned and config.attack.name == "latent":
      r, attack_extra["latent_trigger"] = fit_latent_trigger(r, variables)  # the teacher
      metrics["clean"] = r.evaluate(variables)  # the clean model's ASR on the fitted trigger
    variables, summary = common.train_classifier(r, phase, poisoned=poisoned)
    metrics[phase] = summary["eval"]
    timing[phase] = common.timing_section(summary)
  return finish(r, variables, metrics, timing, attack_extra)


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
  target = attacks.latent.mean_features(r.model, teacher, ds.x_train[is_target],
                                        c.eval.batch_size, put)
  others = ds.x_train[~is_target]
  path = os.path.join(r.workdir, "latent_trigger.npz")
  if os.path.exists(path):
    fitted = r.trigger.replace(pattern=saved_pattern(path, np.asarray(r.trigger.pattern)))
  else:
    fitted = attacks.latent.fit_trigger(r.model, teacher, r.trigger, others, target,
                                        c.attack.latent, common.phase_key(r, "latent"), put)
    if results.is_writer():
      with fileio.atomic_file(path, "wb") as f:
        np.savez(f, pattern=np.asarray(fitted.pattern), mask=np.asarray(fitted.mask))
  summary = attacks.latent.distances(r.model, teacher, {"before": r.trigger, "after": fitted},
                                     put(others[:c.attack.latent.trigger_batch]), target)
  return dataclasses.replace(r, trigger=fitted), {**summary, "file": "latent_trigger.npz"}


def saved_pattern(path: str, like: np.ndarray) -> np.ndarray:
  """The fitted pattern of `latent_trigger.npz`, f32 of `like`'s shape (CheckpointError
  otherwise)."""
  try:
    with fileio.load_npz(path) as z:
      pattern = z["pattern"]
  except fileio.NPZ_ERRORS as e:
    raise CheckpointError(f"{path} is unreadable ({first_line(e)}); delete it or use a new "
                          "--workdir") from None
  if pattern.shape != like.shape or pattern.dtype != like.dtype:
    raise CheckpointError(f"{path} holds a {pattern.dtype}{list(pattern.shape)} pattern, this "
                          f"run's trigger is {like.dtype}{list(like.shape)}; delete it or use a "
                          "new --workdir")
  return pattern


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
  path = os.path.join(r.workdir, "adversarial_rows.npz")
  if os.path.exists(path):
    perturbed = saved_rows(path, rows, original)
  else:
    perturbed = poison.adversarial.perturb(
        r.model, surrogate, original, labels, r.config.poison.adversarial,
        r.config.eval.batch_size, lambda x: train_lib.put_replicated(x, r.mesh))
    if results.is_writer():
      with fileio.atomic_file(path, "wb") as f:
        np.savez(f, indices=rows, images=perturbed)
  x_train = ds.x_train.copy()
  x_train[rows] = perturbed
  summary = {"surrogate_acc_before": metrics_lib.accuracy(r.predict(surrogate, original), labels),
             "surrogate_acc_after": metrics_lib.accuracy(r.predict(surrogate, perturbed), labels),
             "max_change": int(np.abs(perturbed.astype(int) - original).max(initial=0)),
             "rows": "adversarial_rows.npz"}
  return dataclasses.replace(r, dataset=dataclasses.replace(ds, x_train=x_train)), summary


def phases(config: ml_collections.ConfigDict) -> list[str]:
  """The phases the experiment trains, in order: "clean" (if `standard.train_clean`), then
  "backdoored"."""
  return (["clean"] if config.standard.train_clean else []) + ["backdoored"]


def saved_rows(path: str, rows: np.ndarray, original: np.ndarray) -> np.ndarray:
  """The perturbed images of `adversarial_rows.npz` if it holds the int[P] `rows`, as uint8
  images of `original`'s shape (CheckpointError otherwise)."""
  try:
    with fileio.load_npz(path) as z:
      indices, images = z["indices"], z["images"]
  except fileio.NPZ_ERRORS as e:
    raise CheckpointError(f"{path} is unreadable ({first_line(e)}); delete it or use a new "
                          "--workdir") from None
  if not (np.array_equal(indices, rows) and images.shape == original.shape
          and images.dtype == np.uint8):
    raise CheckpointError(f"{path} holds other rows than this run's poison plan; delete it or "
                          "use a new --workdir")
  return images


def finish(r: common.Run, variables: dict, metrics: dict, timing: dict,
           attack_extra: Optional[dict] = None) -> dict:
  """Defends the backdoored `variables`, writes `results.json` and prints the table
  (`attack_extra`: entries for the attack section, e.g. the summaries of
  `perturb_poisoned_rows` and `fit_latent_trigger`)."""
  defended = common.run_defenses(r, variables, metrics["backdoored"])
  attack = {**attack_section(r.config, r.plan), **(attack_extra or {})}
  doc = results.document(
      r.config, dataset=r.dataset.name, model=r.config.model.name,
      attack=attack, metrics=metrics, defenses=defended, timing=timing)
  results.write_json(f"{r.workdir}/results.json", doc)
  print(report.models_table(metrics, defended))
  return doc


def population_ready(config: ml_collections.ConfigDict) -> bool:
  """Whether runs of `config` can train as one population (`run_population`): the standard
  experiment with a data-poisoning attack, no training-time attack and no adversarial rows."""
  return (config.experiment == "standard" and config.poison.name != "none"
          and config.attack.name == "none" and not poison.adversarial.enabled(config))


def run_population(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                   population_dir: str) -> list[dict]:
  """Runs standard experiments whose configs differ only in `seed`, each phase's models trained
  together under `jax.vmap` (`jaxbd.experiments.population`).

  Each member gets the keys, poison plan and trigger its own `run` would use, so its results
  match a run of its own up to floating-point reassociation; evaluation and defenses run per
  member. Every workdir ends up as `run` leaves it (config, poison plan, final checkpoint of each
  phase, results.json); `timing` holds the population's wall time (`population`: its size).
  The population's checkpoints live in `population_dir`, so a killed run resumes.

  Raises:
    ConfigError: configs that differ in more than `seed` or are not `population_ready`.
  """
  base = [dict(c.to_dict(), seed=0) for c in configs]
  if any(b != base[0] for b in base) or not population_ready(configs[0]):
    raise ConfigError("a population needs standard-experiment configs with a data-poisoning "
                      "attack that differ only in seed")
  runs = [common.prepare(c, w) for c, w in zip(configs, workdirs)]
  os.makedirs(population_dir, exist_ok=True)
  r0, c = runs[0], configs[0]
  metrics, timing = [{} for _ in runs], [{} for _ in runs]
  for phase in phases(c):
    poisoned = phase == "backdoored"
    members = [dict(key=common.phase_key(r, phase), trigger=r.trigger,
                    labels=r.plan.labels if poisoned else r.dataset.y_train,
                    kind=r.plan.kind if poisoned else np.zeros_like(r.plan.kind)) for r in runs]
    states, summary = population.train_group(
        r0.model, r0.dataset.x_train, members, phase=phase, train_config=c.train,
        data_config=c.data, log_config=c.log, vmapped=True, workdir=population_dir)
    for r, state, m, t in zip(runs, states, metrics, timing):
      common.save_phase(r, phase, c.train.epochs, state)
      m[phase] = r.evaluate(train_lib.variables(state))
      t[phase] = dict(common.timing_section(summary), population=len(runs))
  return [finish(r, train_lib.variables(s), m, t)
          for r, s, m, t in zip(runs, states, metrics, timing)]


def attack_section(config: ml_collections.ConfigDict, plan) -> dict:
  """The `attack` section of results.json: name, rate, target, mode, trigger parameters."""
  p = config.poison
  section = {"name": p.name, "poison_rate": p.rate, "target": p.target,
             "label_mode": p.label_mode, "num_poisoned": int(len(plan.indices)),
             "plan": "poison_plan.npz"}
  if p.name != "none":
    section["params"] = p[p.name].to_dict()
    section["num_cover"] = int(len(plan.cover_indices))
  if config.attack.name != "none":
    section["training_attack"] = {"name": config.attack.name,
                                  **config.attack[config.attack.name].to_dict()}
  return section


COMPONENT = config_lib.Component(default_config, config_lib.no_checks, run)
