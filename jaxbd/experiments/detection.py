"""The detection experiment: a population of clean and backdoored models, scored, ROC AUC.

Following "Pick your Poison" (Lukas & Kerschbaum), a detector is judged over a population: train
`num_clean` clean models and `num_backdoored` backdoored ones (the attacks of `attacks` in turn,
each member with its own seed: its own initialization, poisoned rows and seeded trigger pattern),
score every model with each detector of `scorers` (CTI, Neural Cleanse; see
`jaxbd.defenses.detection`) on trusted clean data, and report the ROC AUC of the suspicion scores
(positive = backdoored) with a ROC plot (`WORKDIR/roc.png`).

Members whose triggers share a pytree structure (BadNets and Blended are both mask triggers) are
trained together: their train states are stacked on a leading model axis and one jitted step runs
`jax.vmap` over it (`detection.vmap=True`, for accelerators); `vmap=False` trains them one after
another with the same per-member step. On CPU the loop is faster: XLA's CPU backend runs the
vmapped (batched) convolutions 2-3x slower (scripts/bench_population.py: 4 CNNs of width 8,
529 vs 1,523 images/s; 8 of width 16, 185 vs 424 images/s, 2 shared cores). The trusted set is drawn from the
training rows no member poisoned.
"""

from __future__ import annotations

import functools
import os
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import data as data_lib
from jaxbd import defenses, metrics, poison
from jaxbd import train as train_lib
from jaxbd.defenses import detection
from jaxbd.experiments import common, results


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_clean=4,
      num_backdoored=4,
      attacks="badnets,blended",  # triggers of the backdoored members, in turn
      vmap=True,  # train members with the same trigger structure together under jax.vmap
      scorers="cti,nc",
      cti=detection.cti_config(),
      nc=detection.nc_config(),
  ))


def names(text: str) -> list[str]:
  return [n.strip() for n in text.split(",") if n.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
  c = config.detection
  config_lib.check_range(config, "detection.num_clean", 1)
  config_lib.check_range(config, "detection.num_backdoored", 1)
  attacks = names(c.attacks)
  config_lib.require(bool(attacks), "config key 'detection.attacks' names no attack")
  for name in attacks:
    config_lib.check_choice(name, "detection.attacks", poison.TRIGGERS)
    poison.TRIGGERS[name].validate(config)
  for name in names(c.scorers):
    config_lib.check_choice(name, "detection.scorers", detection.SCORERS)
  detection.validate_cti(config, "detection.cti")
  detection.validate_nc(config, "detection.nc")
  defenses.DEFENSES["pt"].validate(config)


@flax.struct.dataclass
class Population:
  """Training data of M models sharing one image array.

  Attributes:
    images: uint8[N, H, W, C].
    labels: int32[M, N] each member's (relabeled) training labels.
    kind: int8[M, N] each member's poisoning roles.
    triggers: the members' triggers stacked on a leading axis.
  """

  images: jax.Array
  labels: jax.Array
  kind: jax.Array
  triggers: object

  @property
  def size(self) -> int:
    return self.images.shape[0]

  def member(self, j: int) -> "Population":
    """Member j's data (labels int32[N], kind int8[N], its trigger), sharing the images."""
    pick = lambda tree: jax.tree.map(lambda x: x[j], tree)
    return self.replace(labels=self.labels[j], kind=self.kind[j], triggers=pick(self.triggers))


def member_config(config, attack: str, seed: int):
  """The config of one backdoored member: `attack` as poison.name and its own seed."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.poison.name, c.seed = attack, seed
  return c


def population_step(model, tx, data_config, vmapped: bool):
  """The train step of a stacked population (vmapped) or of one member (`vmapped=False`)."""

  def member(state, images, labels, kind, trigger, perm, i, key):
    batch_fn = functools.partial(data_lib.gather_batch, poison_fn=poison.poison_fn(trigger),
                                 crop_padding=data_config.crop_padding, flip=data_config.flip)
    step = train_lib.make_train_step(train_lib.classification_loss(model), tx, batch_fn)
    return step(state, data_lib.TrainArrays(images, labels, kind), perm, i, key)

  def step(state, arrays: Population, perm, i, key, context=None):
    del context
    if not vmapped:
      return member(state, arrays.images, arrays.labels, arrays.kind, arrays.triggers, perm, i,
                    key)
    keys = jax.random.split(key, arrays.labels.shape[0])
    state, m = jax.vmap(member, in_axes=(0, None, 0, 0, 0, None, None, 0))(
        state, arrays.images, arrays.labels, arrays.kind, arrays.triggers, perm, i, keys)
    return state, jax.tree.map(jnp.mean, m)

  return step


def train_group(r: common.Run, phase: str, members: list[dict], vmapped: bool) -> list[dict]:
  """Trains the members of one group; returns their variables in order."""
  c, ds = r.config, r.dataset
  tc = c.train
  steps = -(-len(ds.y_train) // tc.batch_size)
  tx = train_lib.make_optimizer(tc, steps)
  init = lambda k: train_lib.create_state(
      train_lib.init_variables(r.model, k, ds.image_shape), tx)
  stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  keys = [jax.random.key(m["seed"]) for m in members]
  population = Population(jnp.asarray(ds.x_train),
                          jnp.asarray(np.stack([m["labels"] for m in members])),
                          jnp.asarray(np.stack([m["kind"] for m in members])),
                          stack([m["trigger"] for m in members]))
  step = population_step(r.model, tx, c.data, vmapped)
  fit = functools.partial(train_lib.fit, epochs=tc.epochs, batch_size=tc.batch_size,
                          workdir=r.workdir, log_every=c.log.every_steps, progress=c.log.progress,
                          eval_every=0, checkpoint_every=tc.checkpoint_every)
  if vmapped:
    state, _ = fit(phase, jax.vmap(init)(jnp.stack(keys)), step, population,
                   key=jax.random.fold_in(keys[0], 1))
    return [train_lib.variables(jax.tree.map(lambda x, j=j: x[j], state))
            for j in range(len(members))]
  out = []
  for j, (m, k) in enumerate(zip(members, keys)):
    state, _ = fit(f"{phase}_{j}", init(k), step, population.member(j),
                   key=jax.random.fold_in(k, 1))
    out.append(train_lib.variables(state))
  return out


def build_members(r: common.Run) -> list[dict]:
  """Every member: attack (None: clean), seed, trigger, plan labels and kinds."""
  c, ds = r.config, r.dataset
  d = c.detection
  attacks = names(d.attacks)
  members = []
  for j in range(d.num_clean + d.num_backdoored):
    seed = c.seed + 1000 * (j + 1)
    attack = None if j < d.num_clean else attacks[(j - d.num_clean) % len(attacks)]
    mc = member_config(c, attack or attacks[0], seed)
    trigger = poison.make_trigger(mc, ds.image_shape)
    if attack is None:
      labels, kind = ds.y_train, np.zeros(len(ds.y_train), np.int8)
    else:
      plan = poison.plan_from_config(mc, ds.y_train, ds.num_classes, trigger)
      labels, kind = plan.labels, plan.kind
    members.append(dict(index=j, attack=attack, seed=seed, trigger=trigger, labels=labels,
                        kind=kind))
  return members


def groups(members: list[dict], vmapped: bool) -> list[list[dict]]:
  """Members that can share one vmapped step (same trigger structure); singletons otherwise."""
  if not vmapped:
    return [members]
  out: dict = {}
  for m in members:
    out.setdefault(jax.tree.structure(m["trigger"]), []).append(m)
  return list(out.values())


def roc_plot(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> None:
  """Writes the ROC curves {name: (fpr, tpr, auc)} as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4, 4))
  for name, (fpr, tpr, auc) in curves.items():
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{name} (AUC {auc:.3f})")
  ax.plot([0, 1], [0, 1], ":", color="gray")
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.legend(loc="lower right")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment and returns the results document (also written to the workdir)."""
  r = common.prepare(config, workdir)
  c, ds, d = r.config, r.dataset, config.detection
  members = build_members(r)
  t0 = time.perf_counter()
  variables = {}
  for g, group in enumerate(groups(members, d.vmap)):
    for m, v in zip(group, train_group(r, f"population{g}", group, d.vmap)):
      variables[m["index"]] = v
  train_seconds = time.perf_counter() - t0

  kind_any = np.max(np.stack([m["kind"] for m in members]), 0)
  trusted = defenses.trusted_split(ds.x_train, ds.y_train, kind_any, c.defense.clean_fraction,
                                   c.seed)
  ctx = defenses.Context(r.model, r.mesh, c.data, ds.num_classes, None, None, c.log.progress)
  rows, scores = [], {name: [] for name in names(d.scorers)}
  t0 = time.perf_counter()
  for m in members:
    v = variables[m["index"]]
    pm = train_lib.backdoor_metrics(r.predict, v, ds.x_test, ds.y_test, m["trigger"],
                                    target=c.poison.target, label_mode=c.poison.label_mode,
                                    num_classes=ds.num_classes)
    row = {"index": m["index"], "attack": m["attack"] or "none", "seed": m["seed"], **pm}
    key = jax.random.fold_in(r.key, m["index"])
    for name in scores:
      if name == "cti":
        s = detection.calibrated_trigger_inversion(ctx, v, trusted, d.cti, c.defense.pt, key)
      else:
        s = detection.neural_cleanse(ctx, v, trusted, d.nc, key)
      scores[name].append(s["suspicion"])
      row[name] = s
    rows.append(row)
  score_seconds = time.perf_counter() - t0

  positive = np.array([m["attack"] is not None for m in members])
  summary, curves = {}, {}
  for name, values in scores.items():
    auc = metrics.roc_auc(values, positive)
    curves[name] = (*metrics.roc_curve(values, positive), auc)
    summary[name] = {"auc": auc, "suspicion": values}
  roc_plot(os.path.join(workdir, "roc.png"), curves)
  doc = results.document(
      config, dataset=ds.name, model=config.model.name,
      attack={"names": names(d.attacks), "poison_rate": c.poison.rate, "target": c.poison.target,
              "label_mode": c.poison.label_mode},
      metrics={"members": rows}, detection=summary,
      timing={"train_seconds": train_seconds, "score_seconds": score_seconds,
              "vmap": d.vmap, "members": len(members)})
  results.write_json(os.path.join(workdir, "results.json"), doc)
  table = [(row["index"], row["attack"], row["acc"], row["asr"] if row["attack"] != "none"
            else None, *(row[n]["suspicion"] for n in scores)) for row in rows]
  print(results.markdown_table(["model", "attack", "ACC", "ASR", *scores], table))
  print(results.markdown_table(["detector", "ROC AUC"],
                               [(n, s["auc"]) for n, s in summary.items()]))
  return doc


COMPONENT = config_lib.Component(default_config, validate, run)
