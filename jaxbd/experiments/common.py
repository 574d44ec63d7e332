"""What every experiment does before and around training: `prepare` and `train_classifier`.

`prepare(config, workdir)` validates the config, loads the dataset, builds the mesh, trigger, poison
plan and model, and only then creates the workdir (writing `config.json` and `poison_plan.npz`), so
bad input never leaves files behind. A workdir that holds a different config is refused: a rerun of
the same command resumes, a changed command needs a new workdir.

`train_classifier(run, phase, ...)` trains a fresh model on the (optionally poisoned) training set
on device and returns its variables and a summary; phases checkpoint under the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from jaxbd import config as config_lib
from jaxbd import data as data_lib
from jaxbd import attacks, defenses, fileio, host, metrics, models, poison
from jaxbd import train as train_lib
from jaxbd.errors import CheckpointError, ConfigError, first_line
from jaxbd.experiments import results


@dataclasses.dataclass
class Run:
  """Everything an experiment needs, built from its config before any work starts.

  Attributes:
    config: the validated config.
    workdir: the run directory (created by `prepare`).
    dataset: host dataset.
    mesh: device mesh.
    model: the classifier (normalizing with the dataset's mean/std).
    trigger: the attack's trigger, or None for `poison.name="none"`.
    plan: the poison plan (empty for a clean run).
    predict: a jitted Predictor of `model`.
    key: the root PRNG key, from `config.seed`.
  """

  config: ml_collections.ConfigDict
  workdir: str
  dataset: data_lib.Dataset
  mesh: jax.sharding.Mesh
  model: Any
  trigger: Optional[Any]
  plan: poison.PoisonPlan
  predict: train_lib.Predictor
  key: jax.Array

  def evaluate(self, variables, images: Optional[np.ndarray] = None,
               labels: Optional[np.ndarray] = None) -> dict[str, float]:
    """ACC, and ASR/RA on the attack's trigger, of model variables on the test set (or on
    uint8[M, H, W, C] `images` with int[M] `labels`, e.g. held-out training images)."""
    ds, p = self.dataset, self.config.poison
    if images is None:
      images, labels = ds.x_test, ds.y_test
    return train_lib.backdoor_metrics(self.predict, variables, images, labels, self.trigger,
                                      target=p.target, label_mode=p.label_mode,
                                      num_classes=ds.num_classes)

  def trusted(self, fraction: float) -> defenses.Trusted:
    """`fraction` of the training set as the defenses' trusted clean set, drawn at random with
    `config.seed` from the rows the attack did not touch, or from all rows
    (`defense.trusted_from`; `jaxbd.defenses.trusted_split`)."""
    ds = self.dataset
    return defenses.trusted_split(ds.x_train, ds.y_train, self.plan.kind, fraction,
                                  self.config.seed, self.config.defense.trusted_from)

  def defense_context(self, *, workdir: Optional[str] = None,
                      evaluate: Optional[Callable[[dict], dict]] = None,
                      progress: Optional[bool] = None) -> defenses.Context:
    """What a defense may know of this run (`jaxbd.defenses.Context`): model, mesh, data
    settings and class count; no workdir or progress evaluation unless given; progress output
    as `config.log.progress` unless given, train metrics every `config.log.every_steps`."""
    log = self.config.log
    return defenses.Context(self.model, self.mesh, self.config.data, self.dataset.num_classes,
                            workdir, evaluate, log.progress if progress is None else progress,
                            log.every_steps)


def channel_stats(config, images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean/std in [0, 1]: from the config, or computed from uint8[N, H, W, C]."""
  if config.data.mean:
    channels = images.shape[-1]
    if len(config.data.mean) != channels:
      raise ConfigError(f"data.mean has {len(config.data.mean)} values but the images have "
                        f"{channels} channels")
    return tuple(config.data.mean), tuple(config.data.std)
  # From each channel's histogram of the 256 pixel values: exact sums, in a fraction of the time
  # and memory of the images in float64 (1.1 GB for 45,000 CIFAR-10 images).
  pixels = images.reshape(-1, images.shape[-1])
  counts = np.stack([np.bincount(pixels[:, c], minlength=256) for c in range(pixels.shape[1])])
  values = np.arange(256) / 255.0
  mean = counts @ values / len(pixels)
  std = np.sqrt((counts * (values - mean[:, None]) ** 2).sum(1) / len(pixels))
  return tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std)


def _check_workdir(workdir: str, config_dict: dict) -> None:
  """Refuses a workdir whose earlier run had another config, or whose config is lost.

  `standard.victim_from` may differ: every run it may name holds the same models (its config,
  poison plan and preparations are checked against this one's), so a sweep may move a cell's
  victim to another cell, or have it train its own, between runs.

  Raises:
    CheckpointError: config.json is unreadable or differs from `config_dict`, or is missing
      where checkpoints are.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
      raise CheckpointError(f"--workdir {workdir} holds checkpoints but no config.json, so "
                            "nothing says which config trained them; use a new --workdir")
    return
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f"a JSON {type(saved).__name__}, not an object")
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); use a new --workdir") from None
  first = first_difference(unborrowed(config_dict), unborrowed(saved))
  if first is not None:
    raise CheckpointError(f"--workdir {workdir} holds a run with a different config (first "
                          f"difference: {first}); use a new --workdir")


def unborrowed(config_dict: dict) -> dict:
  """A config dict without `standard.victim_from` (which of the runs that hold the same models
  a standard experiment defends)."""
  if "standard" not in config_dict:
    return config_dict
  standard = {k: v for k, v in config_dict["standard"].items() if k != "victim_from"}
  return {**config_dict, "standard": standard}


def first_difference(config_dict: dict, saved: dict) -> Optional[str]:
  """The first dotted key (sorted) where a config dict and a saved config.json differ, None if
  they agree; a key the saved one lacks is said to be from an older jaxbd."""
  if saved == json.loads(json.dumps(config_dict)):
    return None
  flat_new = config_lib.flatten(ml_collections.ConfigDict(config_dict))
  flat_old = config_lib.flatten(ml_collections.ConfigDict(saved))
  diff = sorted(k for k in set(flat_new) | set(flat_old)
                if json.dumps(flat_new.get(k)) != json.dumps(flat_old.get(k)))
  first = diff[0] if diff else "?"
  if first in flat_new and first not in flat_old:
    first += ", a key its config.json lacks (written by an older jaxbd)"
  return first


def build(config: ml_collections.ConfigDict, workdir: str,
          dataset: Optional[data_lib.Dataset] = None,
          defense_names: Optional[list[str]] = None) -> Run:
  """Validates the config and builds data, mesh, trigger, plan and model; writes nothing.

  Args:
    config: the experiment config.
    workdir: the run directory.
    dataset: `config.data` already loaded (default: load it).
    defense_names: the defenses the experiment will run, checked against the model
      (`check_components`; default: `defense.names`).

  Raises:
    JaxbdError: any bad input (config, data, workdir).
  """
  config_lib.validate(config)
  if dataset is None:
    dataset = data_lib.load(config.data)
  mean, std = channel_stats(config, dataset.x_train)
  mesh = train_lib.make_mesh(config.mesh.data, config.mesh.expert)
  train_lib.check_batch(config.train.batch_size, mesh)
  trigger = (poison.make_trigger(config, dataset.image_shape)
             if config.poison.name != "none" else None)
  plan = poison_plan(config, dataset, trigger)
  n = len(dataset.y_train)
  config_lib.require(config.train.batch_size <= n, f"config key 'train.batch_size' "
                     f"({config.train.batch_size}) exceeds the {n} training images")
  train_lib.check_steps("config key 'train.epochs'", config.train.epochs, n,
                        config.train.batch_size)
  config_lib.require(trigger is None or config.poison.rate == 0 or len(plan.indices) > 0,
                     f"poison.rate {config.poison.rate} poisons no image of the {n} training "
                     "images")
  if config.attack.name != "none":  # the in-loop attacks: their rows fit a batch
    attacks.batch.batch_rows(config, trigger)
  model = models.create(config, dataset.num_classes, mean, std)
  key = jax.random.key(config.seed)
  try:  # shape errors (an image too small for the model) surface here, before any file is made
    variables = abstract_variables(model, key, dataset.image_shape)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"model {config.model.name!r} cannot take {list(dataset.image_shape)} "
                      f"images ({str(e).splitlines()[0][:200]})") from None
  if defense_names is None:
    defense_names = config_lib.defense_names(config)
  check_components(config, model, variables, dataset, plan, defense_names)
  _check_workdir(workdir, config.to_dict())
  predict = train_lib.Predictor(model, config.eval.batch_size, train_lib.batch_sharding(mesh))
  return Run(config, workdir, dataset, mesh, model, trigger, plan, predict, key)


def check_components(config: ml_collections.ConfigDict, model, variables: dict,
                     dataset: data_lib.Dataset, plan: poison.PoisonPlan,
                     names: list[str]) -> None:
  """Checks, before anything is trained or written, what the defenses `names` and the
  training-time attack need of this model and data: their `check_model` (e.g. D3's layers) and
  the trusted set's size.

  Raises:
    ConfigError: naming the setting that does not fit.
  """
  components = [defenses.DEFENSES[n] for n in names]
  if config.attack.name != "none":
    components.append(attacks.ATTACKS[config.attack.name])
  for component in components:
    if component.check_model is not None:
      component.check_model(config, model, variables, dataset.image_shape, dataset.num_classes)
  if names:
    defenses.base.trusted_pool(plan.kind, config.defense.clean_fraction,
                               config.defense.trusted_from)


def poison_plan(config: ml_collections.ConfigDict, dataset: data_lib.Dataset, trigger,
                rate: Optional[float] = None) -> poison.PoisonPlan:
  """The poison plan of a run: `config.poison` on the training labels, seeded by `config.seed`.

  Args:
    config: the validated config.
    dataset: the run's dataset.
    trigger: the trigger the plan's rows get (None for a clean run); its `cover_ratio`, if any,
      sets the number of cover rows (kind 2).
    rate: the poisoning rate instead of `config.poison.rate` (a rate sweep).
  """
  if rate is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.poison.rate = rate
  return poison.plan_from_config(config, dataset.y_train, dataset.num_classes, trigger)


def create_workdir(run: Run) -> None:
  """Creates the workdir with `config.json` and `poison_plan.npz` (process 0 writes; a rerun
  checks, in every process, that its plan and trigger are the saved ones).

  Raises:
    ConfigError: the workdir cannot be created or written (e.g. it is a file).
    CheckpointError: the workdir's plan differs from this run's.
  """
  try:
    os.makedirs(run.workdir, exist_ok=True)
    run.plan.save_or_check(os.path.join(run.workdir, "poison_plan.npz"), run.trigger)
    results.write_json(os.path.join(run.workdir, "config.json"), run.config.to_dict())
  except OSError as e:
    raise ConfigError(f"--workdir {run.workdir} is not a writable folder: "
                      f"{e.strerror or e}") from e


def prepare(config: ml_collections.ConfigDict, workdir: str,
            dataset: Optional[data_lib.Dataset] = None,
            defense_names: Optional[list[str]] = None) -> Run:
  """`build`, then `create_workdir`: bad input never leaves files behind."""
  run = build(config, workdir, dataset, defense_names)
  create_workdir(run)
  return run


def abstract_variables(model, key: jax.Array, image_shape) -> dict:
  """Shapes and dtypes (`jax.ShapeDtypeStruct`) of `model`'s variables, without computing them."""
  return jax.eval_shape(lambda k: train_lib.init_variables(model, k, image_shape), key)


def check_fit(model, model_name: str, image_shape, variables: dict, source: str) -> None:
  """Checks that the tree and shapes of `variables` (from `source`, in words) fit `model`
  (config name `model_name`) on images of `image_shape`.

  Raises:
    CheckpointError: naming the first variable whose path or shape differs.
  """
  expected = traverse_util.flatten_dict(
      abstract_variables(model, jax.random.key(0), image_shape), sep="/")
  given = traverse_util.flatten_dict(dict(variables), sep="/")
  for name in sorted(set(expected) | set(given)):
    want = tuple(expected[name].shape) if name in expected else None
    got = tuple(np.shape(given[name])) if name in given else None
    if want != got:
      raise CheckpointError(f"{source} does not fit model {model_name!r}: variable "
                            f"{name} has shape {got}, the model expects {want}")


def check_variables(run: Run, variables: dict, source: str) -> dict:
  """Returns `variables` replicated on the run's mesh if they fit `run.model` (`check_fit`)."""
  check_fit(run.model, run.config.model.name, run.dataset.image_shape, variables, source)
  return train_lib.put_replicated(dict(variables), run.mesh)


def classifier_setup(model, images: np.ndarray, labels: np.ndarray, train_config, data_config,
                     mesh: jax.sharding.Mesh, key: jax.Array, kind: Optional[np.ndarray] = None,
                     trigger: Any = None) -> tuple[train_lib.Setup, jax.Array]:
  """The cross-entropy training phase of a fresh `model` whose phase key is `key`: (its
  `supervised_setup`, initialized from `split(key)[0]`, and the key of its training streams,
  `split(key)[1]`). With int8[N] `kind`, the rows it marks get `trigger`, drawn per row from
  `key` (`jaxbd.poison.phase_poison_fn`)."""
  init_key, train_key = jax.random.split(key)
  setup = train_lib.supervised_setup(
      model, images, labels, train_config=train_config, data_config=data_config, mesh=mesh,
      key=init_key, kind=kind,
      poison_fn=None if kind is None else poison.phase_poison_fn(
          trigger, key, kind, train_config.batch_size, train_lib.batch_shards(mesh)))
  return setup, train_key


def train_classifier(run: Run, phase: str, *, poisoned: bool,
                     train_config: Optional[ml_collections.ConfigDict] = None,
                     key: Optional[jax.Array] = None,
                     evaluate: Optional[Callable[[dict], dict]] = None) -> tuple[dict, dict]:
  """Trains a fresh `run.model` with cross-entropy on the training set.

  Args:
    run: the prepared run.
    phase: phase name (checkpoint folder and metrics records).
    poisoned: apply the poison plan (relabeled rows, on-device trigger) and the training-time
      attack of `config.attack`, or train clean.
    train_config: a `train`-style section (default `run.config.train`).
    key: PRNG key of the phase (default: derived from the run key and the phase name).
    evaluate: `variables -> metrics` of the evaluations during training (default
      `run.evaluate`, on the test set).

  Returns:
    (variables, summary of `jaxbd.train.fit` with the final evaluation).
  """
  evaluate = evaluate or run.evaluate
  c = run.config
  tc = train_config or c.train
  ds = run.dataset
  key = key if key is not None else phase_key(run, phase)
  poison_now = poisoned and run.trigger is not None
  setup, train_key = classifier_setup(
      run.model, ds.x_train, run.plan.labels if poisoned else ds.y_train, tc, c.data, run.mesh,
      key, kind=run.plan.kind if poison_now else None, trigger=run.trigger)
  step, context = setup.step, None
  if poison_now and c.attack.name != "none":
    # fold_in(key, 0 or 1) would repeat split(key)'s init and train keys; 3 is poison.row_key's
    step, context = attacks.ATTACKS[c.attack.name].build(
        c, run.model, run.trigger, setup, run.mesh, ds.num_classes, jax.random.fold_in(key, 2))
  state, summary = train_lib.fit(
      phase, setup.state, step, setup.arrays, epochs=tc.epochs, batch_size=tc.batch_size,
      key=train_key, workdir=run.workdir, context=context,
      eval_fn=lambda s: evaluate(train_lib.variables(s)), eval_every=tc.eval_every,
      checkpoint_every=tc.checkpoint_every, log_every=c.log.every_steps,
      progress=c.log.progress)
  return train_lib.variables(state), summary


def load_phase(run: Run, phase: str, epoch: int, workdir: Optional[str] = None) -> dict:
  """The variables a finished training phase saved after `epoch` epochs, in this run's workdir
  or in `workdir` (another run's, for a model trained once and used by several runs).

  Raises:
    CheckpointError: the phase has no such checkpoint (none, or it stopped before `epoch`: the
      run was killed), or it does not fit `run.model`.
  """
  workdir = workdir or run.workdir
  return check_variables(run, restore_phase(workdir, phase, epoch),
                         f"checkpoint of phase {phase!r} in {workdir}")


def restore_phase(workdir: str, phase: str, epoch: int) -> dict:
  """The variables (params and model state, as saved, on one device) of phase `phase` of the
  run in `workdir` after `epoch` epochs; see `load_phase`."""
  ckpt = train_lib.Checkpointer(os.path.join(workdir, "checkpoints", phase))
  try:
    latest = ckpt.latest_epoch()
    if latest is None:
      raise CheckpointError(f"no checkpoint of phase {phase!r} in {workdir}")
    if latest < epoch:
      raise CheckpointError(f"phase {phase!r} in {workdir} stopped at epoch {latest} of {epoch}:"
                            " rerun that run's command to finish it first")
    state = ckpt.restore(epoch)
  finally:
    ckpt.close()
  return {"params": state["params"], **state["model_state"]}


def borrowed_epochs(run: Run, setting: str, source: str, what: str,
                    compared: Callable[[dict], dict]) -> int:
  """Checks that the run in workdir `source` (named by config key `setting`, e.g.
  `standard.victim_from`), whose trained models this run uses (`load_phase(..., workdir=source)`),
  agrees with this run's config where it must, and returns the epochs its config.json names (its
  phases' last checkpoints). Only reads `source`.

  Args:
    run: this run.
    setting: the config key that names `source`, for error messages.
    source: the other run's workdir.
    what: the part of the configs that must agree, in words (e.g. "data or model section").
    compared: that part of a config dict.

  Raises:
    ConfigError: `source` holds no readable config.json, one whose `compared` part differs, or
      one of a run that borrowed its models too (they are in its `standard.victim_from`).
  """
  saved, epochs = trained_run(source, setting)
  first = first_difference(compared(run.config.to_dict()), compared(saved))
  if first is not None:
    raise ConfigError(f"{setting}: the run in {source} has another {what} (first difference: "
                      f"{first})")
  return epochs


def trained_run(source: str, setting: str) -> tuple[dict, int]:
  """(config dict, epochs) of the run in workdir `source` (named by `setting` in messages), whose
  phases' last checkpoints are after that many epochs; only reads its config.json.

  Raises:
    ConfigError: `source` holds no readable config.json, or one of a run that borrowed its
      models (they are in its `standard.victim_from`).
  """
  path = os.path.join(source, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
    epochs = int(saved["train"]["epochs"])
    lender = saved.get("standard", {}).get("victim_from")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError(f"{setting}: {path} is not a readable run config ({first_line(e)})"
                      ) from None
  if lender:
    raise ConfigError(f"{setting}: the run in {source} trained no models of its own (its "
                      f"standard.victim_from is {lender}); point {setting} there")
  return saved, epochs


def save_phase(run: Run, phase: str, epoch: int, state: dict) -> dict:
  """Saves a train state as phase `phase` of this run after `epoch` epochs (see `load_phase`),
  for a phase trained elsewhere (e.g. as a member of a population), and returns its variables;
  where the workdir already holds that checkpoint (an earlier run), keeps it and returns its
  variables instead, so that results always describe the saved model. `train_classifier`
  resumes from it as from its own checkpoints."""
  ckpt = train_lib.Checkpointer(os.path.join(run.workdir, "checkpoints", phase))
  try:
    if ckpt.latest_epoch() == epoch:
      return load_phase(run, phase, epoch)
    ckpt.save(epoch, state)
  finally:
    ckpt.close()
  return train_lib.variables(state)


def timing_section(summary: dict) -> dict:
  """A phase's entry of a results document's `timing` section, from `jaxbd.train.fit`'s summary."""
  return {k: summary[k] for k in ("seconds", "images_per_second", "steps", "resumed_from_epoch")}


def phase_key(run: Run, phase: str) -> jax.Array:
  """The PRNG key of a named phase of the run (the stream `train_classifier` uses by default)."""
  return jax.random.fold_in(run.key, _phase_id(phase))


def _phase_id(phase: str) -> int:
  """A stable 31-bit id of a phase name (PRNG stream separation)."""
  return zlib.crc32(phase.encode()) % (2**31 - 1)


def save_trusted(workdir: str, trusted: defenses.Trusted) -> None:
  """Saves the trusted set's training rows as `WORKDIR/trusted_indices.npy` (process 0)."""
  if host.is_writer():
    with fileio.atomic_file(os.path.join(workdir, "trusted_indices.npy"), "wb") as f:
      np.save(f, trusted.indices)


def run_defenses(run: Run, variables: dict, reference: dict[str, float],
                 evaluate: Optional[Callable[[dict], dict]] = None) -> dict:
  """Runs every defense of `config.defense.names` on `variables` and evaluates the results.

  The trusted set (`defense.clean_fraction` of the training set, from rows the attack did not
  touch or from all rows, `defense.trusted_from`) is drawn once and saved as
  `WORKDIR/trusted_indices.npy`; a class it lacks is named in a warning on stderr.

  Args:
    run: the prepared run.
    variables: the suspect (backdoored) model's variables.
    reference: its metrics (acc, asr), for DER.
    evaluate: `variables -> metrics` of every defended model and stage (default `run.evaluate`).

  Returns:
    `{name: {"acc", "asr", "ra", "der", "stages": {stage: metrics}, "seconds", ...}}`: `seconds`
    is the defense's wall time in this run, `train_seconds` (defenses that train) its training
    time, carried by its checkpoint (a rerun that restores a finished defense reports it too).
  """
  c = run.config
  evaluate = evaluate or run.evaluate
  names = config_lib.defense_names(c)
  if not names:
    return {}
  trusted = run.trusted(c.defense.clean_fraction)
  save_trusted(run.workdir, trusted)
  missing = sorted(set(range(run.dataset.num_classes)) - set(trusted.labels.tolist()))
  if missing:
    host.say(f"warning: the trusted set holds no image of class(es) {missing}" + (
        " (the attack touched every one; defense.trusted_from=all draws from every row in its "
        "clean form, as BackdoorBench does)" if c.defense.trusted_from == "untouched" else ""),
             err=True)
  ctx = dataclasses.replace(run.defense_context(workdir=run.workdir, evaluate=run.evaluate),
                            origin=train_lib.checkpoint.fingerprint(variables))
  out = {}
  for name in names:
    t0 = time.perf_counter()
    key = phase_key(run, f"defense/{name}")
    defended, report = defenses.DEFENSES[name].build(ctx, variables, trusted, c.defense[name], key)
    seconds = time.perf_counter() - t0
    stages = {stage: evaluate(v) for stage, v in report.pop("stages", {}).items()}
    m = evaluate(defended)
    if "asr" in m and "asr" in reference:
      m["der"] = metrics.defense_effectiveness_rating(reference["acc"], reference["asr"],
                                                      m["acc"], m["asr"])
    out[name] = {**m, "stages": stages, "seconds": seconds, "trusted_size": len(trusted.labels),
                 **report}
  return out
