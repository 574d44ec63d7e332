"""The standard experiment: train a clean and a poisoned model, defend, evaluate, write results.

Phases: `clean` (optional, `standard.train_clean`) trains on the clean training set; `backdoored`
trains on the poisoned set of `config.poison`, after the attack's preparation with the clean model
where it has one (`jaxbd.experiments.preparation`: label-consistent PGD rows, the Latent Backdoor's
fitted trigger, Refool's reflection selection); then each defense of `defense.names` runs on the
backdoored model with the trusted clean data. Every model is evaluated on ACC and, with the attack's
trigger, ASR and RA (the clean model's ASR is the trigger's baseline); defenses also get DER. Writes
`WORKDIR/results.json` and prints a table.

With `standard.victim_from=DIR` the experiment trains nothing: it defends and evaluates the models
that the run in DIR trained (its phases' last checkpoints, its poison plan and prepared attack),
whose config must equal this one outside `defense` and `log`. A sweep over defense settings
(`python -m jaxbd.sweep`) sets it for every cell after the first of each victim.

`run_population` runs several such experiments that differ only in `seed` with each phase's models
trained as one vmapped population (`python -m jaxbd.sweep --vmap_seeds`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import host, poison
from jaxbd import train as train_lib
from jaxbd.errors import CheckpointError, ConfigError, DivergedError
from jaxbd.experiments import common, population, preparation, report, results


def default_config() -> ml_collections.ConfigDict:
  """The `standard` section: whether a clean reference model is trained too, and the run whose
  models to defend instead of training them."""
  return ml_collections.ConfigDict(dict(
      train_clean=True,  # also train a clean model of the same architecture as the reference
      victim_from="",  # workdir of a run with this config outside defense and log: defend its
                       # models instead of training them
  ))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment and returns the results document (also written to the workdir)."""
  r = common.build(config, workdir)
  selection = preparation.selection_inputs(r) if poison.refool.selects(config) else None
  victim = borrowed_victim(r, phases(config)) if config.standard.victim_from else None
  common.create_workdir(r)  # after every check: bad input leaves no files behind
  metrics, timing, attack_extra = {}, {}, {}
  variables: Optional[dict] = None
  for phase in phases(config):
    poisoned = phase == "backdoored" and config.poison.name != "none"
    if poisoned and preparation.prepares_attack(config):
      trigger = r.trigger
      r, attack_extra = preparation.prepare(r, variables, selection)  # the clean phase's model
      if "clean" in metrics and r.trigger is not trigger:  # its ASR on the prepared trigger
        metrics["clean"] = r.evaluate(variables)
    if victim is None:
      variables, summary = common.train_classifier(r, phase, poisoned=poisoned)
      metrics[phase] = summary["eval"]
      timing[phase] = common.timing_section(summary)
    else:
      variables = victim[phase]
      metrics[phase] = r.evaluate(variables)
  if victim is not None:
    attack_extra["victim_from"] = os.path.abspath(config.standard.victim_from)
  return finish(r, variables, metrics, timing, attack_extra)


def victim_part(config_dict: dict) -> dict:
  """The part of a standard experiment's config dict that decides its trained models: all but
  the `defense` and `log` sections and `standard.victim_from`."""
  return {k: v for k, v in common.unborrowed(config_dict).items() if k not in ("defense", "log")}


def borrowed_victim(r: common.Run, names: Sequence[str]) -> dict[str, dict]:
  """The models of `standard.victim_from` by phase (`names`), after checking that its run has
  this config outside `defense` and `log`, drew the same poison plan and trigger, and saved its
  attack's preparations (`jaxbd.experiments.preparation.saved_files`); only reads that folder.

  Raises:
    ConfigError: the folder holds no readable config.json, or another config.
    CheckpointError: its poison plan or a prepared file is missing, unreadable or another, or a
      phase has no final checkpoint.
  """
  source = r.config.standard.victim_from
  epochs = common.borrowed_epochs(r, "standard.victim_from", source,
                                  "config outside defense and log", victim_part)
  remedy = "train the victim again or point standard.victim_from elsewhere"
  r.plan.check(os.path.join(source, "poison_plan.npz"), r.trigger, remedy)
  for name in preparation.saved_files(r.config):
    if not os.path.isfile(os.path.join(source, name)):
      raise CheckpointError(f"standard.victim_from: {os.path.join(source, name)} is missing "
                            f"(the attack's preparation did not finish there); {remedy}")
  # The checkpoints last: the checks above read small files.
  variables = {phase: common.load_phase(r, phase, epochs, workdir=source) for phase in names}
  host.say(f"standard.victim_from: the models of {source} (phases {', '.join(variables)}); "
           "nothing is trained", err=True)
  return variables


def saved_epochs(config: ml_collections.ConfigDict, workdir: str) -> list[Optional[int]]:
  """The last saved epoch of each phase (`phases`) of the run of `config` in `workdir`; None where
  none is saved or the checkpoint folder is unreadable."""
  epochs = []
  for phase in phases(config):
    ckpt = train_lib.Checkpointer(os.path.join(workdir, "checkpoints", phase))
    try:
      epochs.append(ckpt.latest_epoch())
    except CheckpointError:
      epochs.append(None)
    finally:
      ckpt.close()
  return epochs


def victim_saved(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether the run of `config` in `workdir` saved the final checkpoint of every phase it trains
  (what `borrowed_victim` loads); an unreadable checkpoint folder counts as not saved."""
  return all(epoch == config.train.epochs for epoch in saved_epochs(config, workdir))


def phases(config: ml_collections.ConfigDict) -> list[str]:
  """The phases the experiment trains, in order: "clean" (if `standard.train_clean`), then
  "backdoored"."""
  return (["clean"] if config.standard.train_clean else []) + ["backdoored"]


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
  host.say(report.models_table(metrics, defended))
  return doc


def population_ready(config: ml_collections.ConfigDict) -> bool:
  """Whether runs of `config` can train as one population (`run_population`): the standard
  experiment with a data-poisoning attack, no training-time attack, nothing to prepare and no
  borrowed victim."""
  return (config.experiment == "standard" and config.poison.name != "none"
          and config.attack.name == "none" and not preparation.prepares_attack(config)
          and not config.standard.victim_from)


def run_population(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                   population_dir: str) -> list[dict]:
  """Runs standard experiments whose configs differ only in `seed`, each phase's models trained
  together under `jax.vmap` (`jaxbd.experiments.population`).

  Each member gets the keys, poison plan and trigger its own `run` would use, so its results
  match a run of its own up to floating-point reassociation; evaluation and defenses run per
  member. Every workdir ends up as `run` leaves it (config, poison plan, final checkpoint of each
  phase, results.json); `timing` holds the population's wall time (`population`: its size;
  `member_split`: [ways, copies] of `population.member_mesh`).
  The population's checkpoints live in `population_dir`, so a killed run resumes. A member whose
  workdir already holds a phase's final checkpoint (an earlier run) is evaluated and defended on
  that model, not the population's (`common.save_phase`).

  Returns:
    each member's results document; None for a member whose training diverged in some phase
    (its workdir holds the phases before that one; the others are unaffected).

  Raises:
    ConfigError: configs that differ in more than `seed` or are not `population_ready`.
    DivergedError: every member diverged in some phase.
  """
  base = [dict(c.to_dict(), seed=0) for c in configs]
  if any(b != base[0] for b in base) or not population_ready(configs[0]):
    raise ConfigError("a population needs standard-experiment configs with a data-poisoning "
                      "attack that differ only in seed")
  runs = [common.prepare(c, w) for c, w in zip(configs, workdirs)]
  os.makedirs(population_dir, exist_ok=True)
  r0, c = runs[0], configs[0]
  metrics, timing, failed = [{} for _ in runs], [{} for _ in runs], set()
  variables = [None] * len(runs)  # each member's model of the last phase
  for phase in phases(c):
    poisoned = phase == "backdoored"
    members = [dict(key=common.phase_key(r, phase), trigger=r.trigger,
                    labels=r.plan.labels if poisoned else r.dataset.y_train,
                    kind=r.plan.kind if poisoned else np.zeros_like(r.plan.kind)) for r in runs]
    states, summary = population.train_group(
        r0.model, r0.dataset.x_train, members, phase=phase, train_config=c.train,
        data_config=c.data, log_config=c.log, vmapped=True, workdir=population_dir, mesh=r0.mesh)
    failed |= set(summary["diverged"])
    if len(failed) == len(runs):
      raise DivergedError(f"every member of the population diverged (by training phase "
                          f"{phase!r}); lower the learning rate")
    for j, (r, state, m, t) in enumerate(zip(runs, states, metrics, timing)):
      if j not in failed:
        variables[j] = common.save_phase(r, phase, c.train.epochs, state)
        m[phase] = r.evaluate(variables[j])
        t[phase] = dict(common.timing_section(summary), population=len(runs),
                        member_split=summary["member_split"])
  return [None if j in failed else finish(r, v, m, t)
          for j, (r, v, m, t) in enumerate(zip(runs, variables, metrics, timing))]


def attack_section(config: ml_collections.ConfigDict, plan) -> dict:
  """The `attack` section of results.json: name, rate, target, mode, trigger parameters."""
  p = config.poison
  section = {"name": p.name, "poison_rate": poison.planned_rate(p), "target": p.target,
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
