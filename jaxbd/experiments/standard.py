"""The standard experiment: train a clean and a poisoned model, defend, evaluate, write results.

Phases: `clean` (optional, `standard.train_clean`) trains on the clean training set; `backdoored`
trains on the poisoned set of `config.poison`; then each defense of `defense.names` runs on the
backdoored model with the trusted clean data. Every model is evaluated on ACC and, with the
attack's trigger, ASR and RA (the clean model's ASR is the trigger's baseline); defenses also get
DER. Writes `WORKDIR/results.json` and prints a table.
"""

from __future__ import annotations

import ml_collections

from jaxbd import config as config_lib
from jaxbd.experiments import common, results


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      train_clean=True,  # also train a clean model of the same architecture as the reference
  ))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment and returns the results document (also written to the workdir)."""
  r = common.prepare(config, workdir)
  metrics, timing = {}, {}
  phases = (["clean"] if config.standard.train_clean else []) + ["backdoored"]
  for phase in phases:
    poisoned = phase == "backdoored" and config.poison.name != "none"
    variables, summary = common.train_classifier(r, phase, poisoned=poisoned)
    metrics[phase] = summary["eval"]
    timing[phase] = {k: summary[k] for k in ("seconds", "images_per_second", "steps",
                                             "resumed_from_epoch")}
  defended = common.run_defenses(r, variables, metrics["backdoored"])
  doc = results.document(
      config, dataset=r.dataset.name, model=config.model.name,
      attack=attack_section(config, r.plan), metrics=metrics, defenses=defended, timing=timing)
  results.write_json(f"{workdir}/results.json", doc)
  print_table(metrics, defended)
  return doc


def print_table(metrics: dict, defended: dict) -> None:
  """Prints models and defenses as a markdown table (ACC, ASR, RA, and DER for defenses)."""
  rows = [(k, m["acc"], m.get("asr"), m.get("ra"), None) for k, m in metrics.items()]
  rows += [(f"defense {k}", m["acc"], m.get("asr"), m.get("ra"), m.get("der"))
           for k, m in defended.items()]
  header = ["model", "ACC", "ASR", "RA", "DER"]
  if not defended:
    header, rows = header[:-1], [row[:-1] for row in rows]
  print(results.markdown_table(header, rows))


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
