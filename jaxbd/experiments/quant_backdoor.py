"""The quantization-backdoor experiment: attack, deploy in int8/6/4, defend, evaluate.

Phases:
1. `clean`: a clean model (`config.train`), the reference and, with `init="clean"`, the start;
   or, with `clean_from=DIR`, the clean model another run trained (its workdir's `clean` phase at
   its last epoch: one clean model for a sweep of attacks; its config must have the same `data`
   and `model` sections).
2. `attack_<name>`: QB, Qu-ANTI-zation or its indiscriminate variant (`jaxbd.attacks.quantization`)
   trains one parameter pytree through float and fake-quantized passes, from the clean model or
   from scratch. The released model is its float variables (params, BatchNorm statistics).
3. Defenses of `defense.names` (e.g. `ft`, fine-tuning in float on the trusted clean data) run on
   the released float model, as on any suspect model.

Every model (clean, attacked, each defense and stage) is evaluated in float and after
deployment at each of `eval_bits`: the victim calibrates fresh EMA observers on
`calibration_images` clean training images, exports int8 codes with scales and runs the integer
path (`jaxbd.quant.deploy`); "quantized" metrics are always those of this integer model. Metrics:
ACC; target rate (non-target clean test images predicted as the target); QB's ASR rule (float
right and quantized predicts the target, on the attack's inputs: triggered ones when the attack
has a trigger); with a trigger, the usual ASR/RA; and the fraction of test predictions where the
integer model agrees with the fake-quantized one. Writes `WORKDIR/results.json`, the attacked
model's exports `WORKDIR/deployed/backdoored_int<b>.npz`, and prints a table.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import metrics as metrics_lib
from jaxbd import host, models
from jaxbd import quant as quant_lib
from jaxbd import train as train_lib
from jaxbd.attacks import quantization as attacks
from jaxbd.experiments import common, results
from jaxbd.quant.layers import STATS

INITS = ("clean", "scratch")


def default_config() -> ml_collections.ConfigDict:
  """The `quant_backdoor` section: attack, start, deployed bit widths, calibration."""
  c = ml_collections.ConfigDict(dict(
      attack="qb",  # qb | quanti | quanti_indiscriminate
      init="clean",  # start the attack from the clean model, or from scratch
      clean_from="",  # workdir of a run whose finished `clean` phase is the clean model
      eval_bits=(8, 6, 4),  # deployed bit widths (W = A) every model is evaluated at
      calibration_images=2048,  # clean training images the victim calibrates observers with
      calibration_batch_size=128,
      save_exports=True,  # write the attacked model's integer exports to WORKDIR/deployed/
  ))
  c.update(attacks.default_config())
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the `quant_backdoor` section (ConfigError on a bad value)."""
  c = config.quant_backdoor
  config_lib.check_choice(c.attack, "quant_backdoor.attack", attacks.ATTACKS)
  config_lib.check_choice(c.init, "quant_backdoor.init", INITS)
  config_lib.check_bits(c.eval_bits, "quant_backdoor.eval_bits")
  config_lib.check_range(config, "quant_backdoor.calibration_images", 1)
  config_lib.check_range(config, "quant_backdoor.calibration_batch_size", 1)
  config_lib.require(config.model.name in models.QUANTIZABLE,
                     f"the quant_backdoor experiment needs a model with fake-quantization layers "
                     f"({', '.join(models.QUANTIZABLE)}); got model.name={config.model.name!r}")
  config_lib.require(config.poison.rate == 0,
                     "the quant_backdoor experiment does not poison the training set; set "
                     f"poison.rate=0 (got {config.poison.rate})")
  config_lib.require(config.poison.label_mode == "all2one",
                     "the quant_backdoor experiment's attacks send every input to poison.target; "
                     f"set poison.label_mode='all2one' (got {config.poison.label_mode!r})")
  config_lib.require(c.attack != "quanti" or config.poison.name != "none",
                     "the quanti attack needs an input trigger: set poison.name (e.g. badnets)")
  attacks.validate(config, "quant_backdoor")


class QuantEvaluator:
  """Float and deployed-integer metrics of model variables (see the module docstring).

  Attributes:
    bits: the deployed bit widths.
  """

  def __init__(self, run: common.Run, quant: quant_lib.QuantConfig, bits, calibration: np.ndarray,
               calibration_batch_size: int):
    """calibration: uint8[M, H, W, C] clean images the victim calibrates the observers with."""
    c = run.config
    self.run, self.bits = run, tuple(int(b) for b in bits)
    self.calibration, self.calibration_batch_size = calibration, calibration_batch_size
    self.sharding = train_lib.batch_sharding(run.mesh)
    self.fake = {b: run.model.clone(quant=quant.with_bits(b)) for b in self.bits}
    predictor = lambda m: train_lib.Predictor(m, c.eval.batch_size, self.sharding)
    self.fake_predict = {b: predictor(m) for b, m in self.fake.items()}
    self.int_predict = {b: predictor(quant_lib.integer_model(m)) for b, m in self.fake.items()}

  def deploy(self, variables: dict, bits: int) -> tuple[dict, dict]:
    """(calibrated fake-quant variables, integer export) of float variables at `bits`."""
    model = self.fake[bits]
    calibrated = quant_lib.calibrate(model, variables, self.calibration,
                                     self.calibration_batch_size, self.sharding)
    return calibrated, quant_lib.export(model, calibrated, self.run.dataset.image_shape)

  def __call__(self, variables: dict, export_prefix: str = "") -> dict:
    """Float metrics plus `quantized[str(bits)]` metrics of the deployed integer model.

    Args:
      variables: float variables (any `quant_stats` are ignored: deployment recalibrates).
      export_prefix: if set, each export is saved to `<prefix>_int<bits>.npz`.
    """
    r, ds = self.run, self.run.dataset
    target, trigger = r.config.poison.target, r.trigger
    variables = _float(variables)
    y = ds.y_test
    fp_clean = r.predict(variables, ds.x_test)
    out = {"acc": metrics_lib.accuracy(fp_clean, y),
           "target_rate": metrics_lib.target_rate(fp_clean, y, target)}
    fp_attack = fp_clean
    if trigger is not None:
      fp_attack = r.predict(variables, ds.x_test, trigger)
      out.update(_trigger_metrics(fp_attack, y, target))
    out["quantized"] = {}
    for b in self.bits:
      calibrated, exported = self.deploy(variables, b)
      if export_prefix:
        quant_lib.save_export(f"{export_prefix}_int{b}.npz", exported, self.fake[b].quant)
      q_clean = self.int_predict[b](exported, ds.x_test)
      q = {"acc": metrics_lib.accuracy(q_clean, y),
           "target_rate": metrics_lib.target_rate(q_clean, y, target),
           "fake_quant_agreement": metrics_lib.accuracy(
               q_clean, self.fake_predict[b](calibrated, ds.x_test))}
      q_attack = q_clean
      if trigger is not None:
        q_attack = self.int_predict[b](exported, ds.x_test, trigger)
        q.update(_trigger_metrics(q_attack, y, target))
      q["asr_qb"] = metrics_lib.behavior_attack_success_rate(fp_attack, q_attack, y, target)
      out["quantized"][str(b)] = q
    return out


def quantized_der(backdoored: dict, defended: dict) -> float:
  """DER of a defended model's quantized metrics against the backdoored model's: on the
  deployed model's triggered-image ASR where the attack has a trigger (Qu-ANTI-zation: the
  attacker wins when the quantized model sends triggered images to the target, whatever the float
  model does), else on the QB rule's ASR (`asr_qb`)."""
  key = "asr" if "asr" in backdoored else "asr_qb"
  return metrics_lib.defense_effectiveness_rating(backdoored["acc"], backdoored[key],
                                                  defended["acc"], defended[key])


def _trigger_metrics(pred: np.ndarray, labels: np.ndarray, target: int) -> dict:
  """ASR and RA of predictions on triggered images (all-to-one)."""
  wanted = np.full_like(labels, target)
  return {"asr": metrics_lib.attack_success_rate(pred, labels, wanted),
          "ra": metrics_lib.robust_accuracy(pred, labels, wanted)}


def calibration_images(run: common.Run, count: int) -> np.ndarray:
  """uint8[min(count, N), H, W, C]: clean training images in a seeded random order (the
  victim's calibration data)."""
  n = len(run.dataset.y_train)
  idx = np.random.default_rng([run.config.seed, 11]).permutation(n)[:min(count, n)]
  return run.dataset.x_train[idx]


def train_attack(run: common.Run, variables, quant: quant_lib.QuantConfig,
                 evaluate=None) -> tuple[dict, dict, dict]:
  """Runs `config.quant_backdoor.attack` and returns the released float variables.

  With `qb.repair.epochs > 0` QB is the first of two stages: the float model is then repaired
  inside the QB model's quantization cells (`attacks.repair_projection`), and with `qb.anchor`
  the CNN's cells are first widened (`attacks.add_scale_anchors`).

  Args:
    run: the prepared run.
    variables: the start (a clean model's variables) or None to start from scratch.
    quant: the quantization scheme of the quantized passes.
    evaluate: `variables -> metrics` for progress logs (None: none).

  Returns:
    (released float variables, `{phase: fit summary}`, `{stage name: variables}` of the
    intermediate models: the QB model before repair).
  """
  c = run.config
  name = c.quant_backdoor.attack
  section = c.quant_backdoor[name]
  phase = f"attack_{name}"
  init_key, train_key = jax.random.split(common.phase_key(run, phase))
  shape = run.dataset.image_shape
  if variables is None:  # jitted: eager initialization is slow with several devices
    variables = jax.jit(lambda k: train_lib.init_variables(run.model, k, shape))(init_key)
  variables = _float(variables)
  if name == "qb" and section.anchor:
    variables["params"] = attacks.add_scale_anchors(variables["params"], section.anchor)
  stats = quant_lib.deploy.fresh_stats(run.model.clone(quant=quant), shape)
  if stats is not None:
    variables[STATS] = stats
  loss_fn = attacks.make_loss(name, section, run.model, quant, target=c.poison.target,
                              trigger=run.trigger)
  attacked, summary = _train_phase(run, phase, section.train, variables, loss_fn, train_key,
                                   evaluate)
  summaries, stages = {phase: summary}, {}
  if name == "qb" and section.repair.epochs:
    stages["qb_stage1"] = _float(attacked)
    project = attacks.repair_projection(run.model, quant, section.bits, shape)
    # The observers ride along unchanged (the repair runs the float model only).
    attacked, summaries["attack_qb_repair"] = _train_phase(
        run, "attack_qb_repair", section.repair, attacked, attacks.repair_loss(run.model),
        common.phase_key(run, "attack_qb_repair"), evaluate, post_update=project,
        context=attacked["params"])
  return _float(attacked), summaries, stages


def _float(variables: dict) -> dict:
  """The released float variables: without the attack's observers."""
  return {k: v for k, v in variables.items() if k != STATS}


def _train_phase(run: common.Run, phase: str, train_config: ml_collections.ConfigDict,
                 variables: dict, loss_fn, key: jax.Array, evaluate, post_update=None,
                 context=None) -> tuple[dict, dict]:
  """One training phase of the attack from `variables`: (final variables, fit summary)."""
  c = run.config
  return train_lib.tune(
      phase, run.model, run.dataset.x_train, run.dataset.y_train, variables,
      train_config=train_config, data_config=c.data, mesh=run.mesh, key=key,
      workdir=run.workdir, loss_fn=loss_fn, post_update=post_update, context=context,
      evaluate=evaluate, log_every=c.log.every_steps, progress=c.log.progress)


def borrowed_clean(run: common.Run) -> dict:
  """The clean model of `quant_backdoor.clean_from`: that run's `clean` phase after the epochs its
  config.json names, on this run's mesh (`common.borrowed_epochs`; its config must have this
  run's `data` and `model` sections)."""
  source = run.config.quant_backdoor.clean_from
  epochs = common.borrowed_epochs(run, "quant_backdoor.clean_from", source,
                                  "data or model section",
                                  lambda d: {k: d.get(k) for k in ("data", "model")})
  return common.load_phase(run, "clean", epochs, workdir=source)


def progress_metrics(run: common.Run, quant: quant_lib.QuantConfig):
  """`variables -> metrics` for training logs: float and fake-quantized (training observers)."""
  ds, target = run.dataset, run.config.poison.target
  fake = train_lib.Predictor(run.model.clone(quant=quant), run.config.eval.batch_size,
                             train_lib.batch_sharding(run.mesh))

  def evaluate(variables: dict) -> dict:
    out = {}
    for name, pred in (("fp", run.predict(variables, ds.x_test)),
                       (f"fake{quant.weight_bits}", fake(variables, ds.x_test))):
      out[f"{name}_acc"] = metrics_lib.accuracy(pred, ds.y_test)
      out[f"{name}_target_rate"] = metrics_lib.target_rate(pred, ds.y_test, target)
    return out

  return evaluate


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment and returns the results document (also written to the workdir)."""
  r = common.build(config, workdir)
  c = config.quant_backdoor
  section = c[c.attack]
  train_lib.check_batch(section.train.batch_size, r.mesh,
                        f"quant_backdoor.{c.attack}.train.batch_size")
  train_lib.check_batch(c.calibration_batch_size, r.mesh, "quant_backdoor.calibration_batch_size")
  clean = borrowed_clean(r) if c.clean_from else None
  common.create_workdir(r)  # every check above, before anything is written
  quant = quant_lib.from_config(config.quant, int(section.bits[0]))
  evaluator = QuantEvaluator(r, quant, c.eval_bits, calibration_images(r, c.calibration_images),
                             c.calibration_batch_size)
  timing = {}
  if clean is None:
    clean, summary = common.train_classifier(r, "clean", poisoned=False)
    timing["clean"] = common.timing_section(summary)
  attacked, summaries, stages = train_attack(r, clean if c.init == "clean" else None, quant,
                                             progress_metrics(r, quant))
  timing.update({phase: common.timing_section(summary) for phase, summary in summaries.items()})
  t0 = time.perf_counter()
  prefix = ""
  if c.save_exports:
    os.makedirs(os.path.join(workdir, "deployed"), exist_ok=True)
    prefix = os.path.join(workdir, "deployed", "backdoored")
  metrics = {"clean": evaluator(clean), **{k: evaluator(v) for k, v in stages.items()},
             "backdoored": evaluator(attacked, prefix)}
  timing["evaluation"] = {"seconds": time.perf_counter() - t0}
  defended = common.run_defenses(r, attacked, metrics["backdoored"], evaluate=evaluator)
  for m in defended.values():
    for b, q in m["quantized"].items():
      q["der"] = quantized_der(metrics["backdoored"]["quantized"][b], q)
  doc = results.document(
      config, dataset=r.dataset.name, model=config.model.name,
      attack={"name": c.attack, "target": config.poison.target, "init": c.init,
              "clean_from": os.path.abspath(c.clean_from) if c.clean_from else None,
              "bits": list(section.bits), "trigger": config.poison.name,
              "params": section.to_dict()},
      metrics=metrics, defenses=defended, timing=timing,
      quantization={"scheme": config.quant.to_dict(), "eval_bits": list(evaluator.bits),
                    "calibration_images": len(evaluator.calibration),
                    "deployment": "integer (int8 codes, int32 accumulation)"})
  results.write_json(os.path.join(workdir, "results.json"), doc)
  host.say(table(doc))
  return doc


def table(doc: dict) -> str:
  """A markdown table of a results document: one row per model and precision."""
  models = [(k, m) for k, m in doc["metrics"].items()]
  models += [(f"defense {k}", m) for k, m in doc["defenses"].items()]
  rows = []
  for name, m in models:
    rows.append((name, "float", m["acc"], m["target_rate"], None, m.get("asr"), None))
    for b, q in m["quantized"].items():
      rows.append((name, f"int{b}", q["acc"], q["target_rate"], q["asr_qb"], q.get("asr"),
                   q.get("der")))
  return results.markdown_table(
      ["model", "precision", "ACC", "target rate", "ASR (QB rule)", "ASR (trigger)", "DER"], rows)


COMPONENT = config_lib.Component(default_config, validate, run)
