"""The detection experiment: a population of clean and backdoored models, scored, ROC AUC.

Following "Pick your Poison" (Lukas & Kerschbaum), a detector is judged over a population: train
`num_clean` clean models and `num_backdoored` backdoored ones (the attacks of `attacks` in turn,
each member with its own seed: its own initialization, poisoned rows and seeded trigger pattern),
score every model with each detector of `scorers` (CTI, Neural Cleanse; see
`jaxbd.defenses.detection`) on trusted clean data, and report the ROC AUC of the suspicion scores
(positive = backdoored) with a ROC plot (`WORKDIR/roc.png`, `jaxbd.experiments.plots.roc_curves`;
`python -m jaxbd.report` draws it again from results.json).

Members whose triggers share a pytree structure (BadNets and Blended are both mask triggers) are
trained together as one population (`jaxbd.experiments.population`): their train states are
stacked on a leading model axis and one jitted step runs `jax.vmap` over it (`detection.vmap=True`,
for accelerators); `vmap=False` trains them one after another with the same per-member step, which
is faster on CPU (see `jaxbd.experiments.population`). The trusted set is drawn from the training
rows no member poisoned; its size is checked against them before any member trains. Each
backdoored member's plan and trigger are saved as `WORKDIR/poison_plan_member<index>.npz`, the
trusted rows as `WORKDIR/trusted_indices.npy`. Each member's metrics and scores are written to
`WORKDIR/scores/member<index>.json` as soon as it is scored, so that a rerun of a killed run (its
members restored from their checkpoints) scores only the members not yet scored.

A member whose training diverges (NaN or inf) is left out of the scores, with a line on stderr
and a record in results.json's `metrics.diverged`, and the others are scored; the run fails only
when no clean or no backdoored member is left. A member whose suspicion under a detector is not a
finite number is left out of that detector's ROC AUC and plot in the same way (`scorer_summary`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import defenses, host, metrics, poison
from jaxbd import train as train_lib
from jaxbd.defenses import detection
from jaxbd.errors import CheckpointError, DivergedError, first_line
from jaxbd.experiments import common, plots, population, report, results

# A member's NC draws from fold_in(key, NC_STREAM); fold_in(key, i) equals split(key, n)[i], and
# a large i keeps them apart from CTI's split(key, 4).
NC_STREAM = 1_000_003


def default_config() -> ml_collections.ConfigDict:
  """The `detection` section: population sizes, attacks, vmap, scorers."""
  return ml_collections.ConfigDict(dict(
      num_clean=4,
      num_backdoored=4,
      attacks="badnets,blended",  # triggers of the backdoored members, in turn
      vmap=True,  # train members with the same trigger structure together under jax.vmap
      scorers="cti,nc",
      cti=detection.cti_config(),
      nc=detection.nc_config(),
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the `detection` section (ConfigError on a bad value)."""
  c = config.detection
  config_lib.check_range(config, "detection.num_clean", 1)
  config_lib.check_range(config, "detection.num_backdoored", 1)
  config_lib.check_names(c.attacks, "detection.attacks", poison.TRIGGERS, required=True)
  config_lib.check_names(c.scorers, "detection.scorers", detection.SCORERS, required=True)
  config_lib.require(config.attack.name == "none", "the detection experiment trains data-"
                     f"poisoning attacks only; attack.name must be 'none', got "
                     f"{config.attack.name!r}")
  config_lib.require(config.poison.rate > 0, "the backdoored members of the detection "
                     "experiment poison poison.rate of the training set; set poison.rate > 0")
  detection.validate_cti(config, "detection.cti")
  detection.validate_nc(config, "detection.nc")
  config_lib.check_choice(c.cti.repair, "detection.cti.repair", defenses.DEFENSES)


def member_config(config, attack: str, seed: int):
  """The config of one backdoored member: `attack` as poison.name and its own seed."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.poison.name, c.seed = attack, seed
  return c


def build_members(r: common.Run) -> list[dict]:
  """Every member: attack (None: clean), seed, trigger, plan (None: clean), plan labels and
  kinds."""
  c, ds = r.config, r.dataset
  d = c.detection
  attacks = config_lib.split_names(d.attacks)
  members = []
  for j in range(d.num_clean + d.num_backdoored):
    seed = c.seed + 1000 * (j + 1)
    attack = None if j < d.num_clean else attacks[(j - d.num_clean) % len(attacks)]
    mc = member_config(c, attack or attacks[0], seed)
    trigger = poison.make_trigger(mc, ds.image_shape)
    plan, labels, kind = None, ds.y_train, np.zeros(len(ds.y_train), np.int8)
    if attack is not None:
      plan = poison.plan_from_config(mc, ds.y_train, ds.num_classes, trigger)
      labels, kind = plan.labels, plan.kind
    members.append(dict(index=j, attack=attack, seed=seed, key=jax.random.key(seed),
                        trigger=trigger, plan=plan, labels=labels, kind=kind))
  return members


def save_plans(workdir: str, members: list[dict]) -> None:
  """Saves each backdoored member's plan and trigger as `WORKDIR/poison_plan_member<index>.npz`
  (process 0; a rerun checks them: `PoisonPlan.save_or_check`)."""
  for m in members:
    if m["plan"] is not None:
      m["plan"].save_or_check(os.path.join(workdir, f"poison_plan_member{m['index']}.npz"),
                              m["trigger"])


def groups(members: list[dict]) -> list[list[dict]]:
  """Members whose triggers have one pytree structure and leaf shapes and dtypes (so that they
  stack): they share a population (and a vmapped step when `detection.vmap`)."""
  out: dict = {}
  for m in members:
    leaves = tuple((np.shape(x), np.result_type(x)) for x in jax.tree.leaves(m["trigger"]))
    out.setdefault((jax.tree.structure(m["trigger"]), leaves), []).append(m)
  return list(out.values())


def train_members(r: common.Run, members: list[dict]) -> tuple[dict, list[dict], list]:
  """Trains every member, a group at a time: ({member index: variables} of the members that
  trained, `diverged_row`s of those that diverged, each vmapped group's [ways, copies] split
  over the devices (`population.member_mesh`; None for a group trained in a loop or diverged)).

  Raises:
    DivergedError: no clean or no backdoored member is left to score.
  """
  variables, diverged, splits = {}, [], []
  for g, group in enumerate(groups(members)):
    trained, summary = train_group(r, group, f"population{g}")
    variables.update((m["index"], train_lib.variables(s)) for m, s in zip(group, trained)
                     if s is not None)
    diverged += [diverged_row(group[j], reason, len(members))
                 for j, reason in summary["diverged"].items()]
    splits.append(summary.get("member_split"))
  for backdoored, kind in ((False, "clean"), (True, "backdoored")):
    if not any((m["attack"] is not None) == backdoored and m["index"] in variables
               for m in members):
      raise DivergedError(f"every {kind} member of the detection population diverged, so no "
                          f"ROC AUC can be measured (first: {diverged[0]['error']})")
  return variables, diverged, splits


def train_group(r: common.Run, group: list[dict], phase: str) -> tuple[list, dict]:
  """Trains one group of members (`jaxbd.experiments.population.train_group`): their train
  states (None where one diverged) and its summary, whose `diverged` is {position in the group:
  reason} of the diverged ones (all of them when the whole group diverged)."""
  c = r.config
  try:
    trained, summary = population.train_group(
        r.model, r.dataset.x_train, group, phase=phase, train_config=c.train,
        data_config=c.data, log_config=c.log, vmapped=c.detection.vmap, workdir=r.workdir,
        mesh=r.mesh)
  except DivergedError as e:
    return [None] * len(group), {"diverged": {j: str(e) for j in range(len(group))}}
  return trained, summary


def diverged_row(member: dict, reason: str, count: int) -> dict:
  """results.json's record of a member whose training diverged (left out of the scores), also
  printed on stderr."""
  row = {"index": member["index"], "attack": member["attack"] or "none", "seed": member["seed"],
         "error": reason}
  host.say(f"detection: member {row['index'] + 1}/{count} ({row['attack']}, seed {row['seed']}) "
           f"diverged and is left out of the scores: {reason}", err=True)
  return row


def saved_row(path: str, member: dict, scorers: list[str]) -> Optional[dict]:
  """The member's row as an earlier run in this workdir scored it (`WORKDIR/scores/
  member<index>.json`, written atomically after each member), or None where there is none.

  Raises:
    CheckpointError: the file is unreadable or holds another member or other scorers.
  """
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      row = json.load(f)
    same = (row["index"], row["seed"], row["attack"]) == (
        member["index"], member["seed"], member["attack"] or "none")
    scored = all("suspicion" in row[name] for name in scorers)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} is not a member's scores ({first_line(e)}); delete it or use "
                          "a new --workdir") from None
  if not (same and scored):
    raise CheckpointError(f"{path} holds the scores of another member; delete it or use a new "
                          "--workdir")
  return row


def scorer_summary(name: str, rows: list[dict], positive: np.ndarray) -> dict:
  """results.json's `detection[name]`: `{"auc", "suspicion": f[M] (None where not finite)}`,
  and `"left_out": [member index]` where a suspicion is not finite (NaN or inf, or None as
  written to a member's scores file): those members are left out of the AUC, with a line on
  stderr.  positive: bool[M] which of `rows` are backdoored.

  Raises:
    DivergedError: no finite suspicion of a clean or of a backdoored member is left.
  """
  values = metrics.as_scores([row[name]["suspicion"] for row in rows])
  finite = np.isfinite(values)
  out = {"suspicion": [float(v) if ok else None for v, ok in zip(values, finite)]}
  if not finite.all():
    out["left_out"] = [row["index"] for row, ok in zip(rows, finite) if not ok]
    host.say(f"detection: {name} scored members {[i + 1 for i in out['left_out']]} with a "
             "suspicion that is not a finite number; they are left out of its ROC AUC", err=True)
  if not (finite[positive].any() and finite[~positive].any()):
    raise DivergedError(f"{name} gave no finite suspicion for any clean or for any backdoored "
                        "member, so no ROC AUC can be measured")
  out["auc"] = metrics.roc_auc(*metrics.finite_part(out["suspicion"], positive))
  return out


def progress_line(row: dict, count: int, seconds: float) -> str:
  """One scored member, e.g. `detection: member 2/6 (badnets, seed 1): acc 0.5120 asr 0.9930,
  suspicion cti 0.0310 nc 2.4100 (95 s)`."""
  shown = " ".join(f"{k} {row[k]:.4f}" for k in ("acc", "asr") if k in row)
  scored = " ".join(f"{name} {metrics.as_scores([row[name]['suspicion']])[0]:.4f}"
                    for name in detection.SCORERS if name in row)
  return (f"detection: member {row['index'] + 1}/{count} ({row['attack']}, seed {row['seed']}): "
          f"{shown}, suspicion {scored} ({seconds:.0f} s)")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment and returns the results document (also written to the workdir)."""
  d = config.detection
  cti = "cti" in config_lib.split_names(d.scorers)
  r = common.build(config, workdir, defense_names=[d.cti.repair] if cti else [])
  c, ds = r.config, r.dataset
  members = build_members(r)
  kind_any = np.max(np.stack([m["kind"] for m in members]), 0)
  size, _ = defenses.base.trusted_pool(kind_any, c.defense.clean_fraction,  # before training
                                       c.defense.trusted_from)
  if cti and d.cti.score_fraction:
    defenses.base.holdout_count(size, d.cti.score_fraction,
                                "config key 'detection.cti.score_fraction'")
  common.create_workdir(r)
  save_plans(r.workdir, members)
  t0 = time.perf_counter()
  variables, diverged, splits = train_members(r, members)
  train_seconds = time.perf_counter() - t0
  count, members = len(members), [m for m in members if m["index"] in variables]

  trusted = defenses.trusted_split(ds.x_train, ds.y_train, kind_any, c.defense.clean_fraction,
                                   c.seed, c.defense.trusted_from)
  common.save_trusted(r.workdir, trusted)
  ctx = r.defense_context()
  repair = lambda v, t, k: defenses.DEFENSES[d.cti.repair].build(
      ctx, v, t, c.defense[d.cti.repair], k)[0]
  scorers = config_lib.split_names(d.scorers)
  rows = []
  t0 = time.perf_counter()
  for m in members:
    path = os.path.join(r.workdir, "scores", f"member{m['index']}.json")
    row = saved_row(path, m, scorers)
    if row is None:
      v = variables[m["index"]]
      row = {"index": m["index"], "attack": m["attack"] or "none", "seed": m["seed"],
             **train_lib.backdoor_metrics(r.predict, v, ds.x_test, ds.y_test, m["trigger"],
                                          target=c.poison.target, num_classes=ds.num_classes,
                                          label_mode=c.poison.label_mode)}
      key = jax.random.fold_in(r.key, m["index"])
      for name in scorers:
        row[name] = (
            detection.calibrated_trigger_inversion(ctx, v, trusted, d.cti, repair, key)
            if name == "cti" else
            detection.neural_cleanse(ctx, v, trusted, d.nc, jax.random.fold_in(key, NC_STREAM)))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      results.write_json(path, row)
    rows.append(row)
    if c.log.progress:
      host.say(progress_line(row, count, time.perf_counter() - t0), err=True)
  score_seconds = time.perf_counter() - t0
  positive = np.array([m["attack"] is not None for m in members])
  summary = {name: scorer_summary(name, rows, positive) for name in scorers}
  plots.roc_curves(summary, positive, os.path.join(workdir, "roc.png"))
  doc = results.document(
      config, dataset=ds.name, model=config.model.name,
      attack={"names": config_lib.split_names(d.attacks), "poison_rate": c.poison.rate,
              "target": c.poison.target, "label_mode": c.poison.label_mode},
      metrics={"members": rows, "diverged": diverged}, detection=summary,
      timing={"train_seconds": train_seconds, "score_seconds": score_seconds,
              "vmap": d.vmap, "members": len(members), "member_splits": splits})
  results.write_json(os.path.join(workdir, "results.json"), doc)
  host.say(report.detection_tables(doc))
  return doc


COMPONENT = config_lib.Component(default_config, validate, run)
