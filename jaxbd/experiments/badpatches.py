"""The BadPatches experiment (arXiv 2505.01811): routing-aware backdoors on patch-routed MoE models.

Phases, all in one workdir (each checkpointed, so a rerun resumes):

1. `clean`: the victim architecture trained on clean data; its ASR on the trigger is the baseline.
2. Trigger guidance, when `poison.badpatches.position="router"` or `pattern="optimized"`: the
   guiding routers are the clean victim model's (`router="victim"`) or those of a `surrogate`
   the attacker trains with the assumed routing (`poison.badpatches.l`, and `.patch` for models
   whose routing cell is a patch size). The final trigger is saved as `trigger.npz`, which a
   rerun reads back instead of guiding again (its checkpoints were trained with that trigger).
3. `backdoored`: trained on the poisoned training set of `config.poison`.
4. Routing statistics of both models on test images of non-target classes, clean vs triggered
   (`jaxbd.metrics.routing_statistics` per MoE layer), with heatmaps.
5. The defenses of `defense.names` (the BadPatches setting runs `fine_pruning`: both stages and
   the prune-rate sweep).
6. Poison-rate sweep: for each rate of `badpatches.rates`, the attack of `config.poison` and each
   routing-agnostic baseline of `badpatches.baselines` (BadNets, Blend, WaNet) poison the same rows
   (same seed) of a fresh model, each plan drawn as the main run's (`common.poison_plan`, with
   the cover rows its trigger asks for); ASR against rate is plotted (`asr_vs_rate.png`).

Writes `results.json` (`results.document`'s schema plus `sweep` and `plots`) and the plots.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd import metrics as metrics_lib
from jaxbd import host, models, poison
from jaxbd.data.pipeline import to_unit
from jaxbd import train as train_lib
from jaxbd.experiments import common, plots, preparation, results, standard
from jaxbd.models import routing
from jaxbd.poison import badpatches

GUIDE_IMAGES = 2000  # clean training images the attacker runs through the guiding routers
OPTIMIZE_STREAM = zlib.crc32(b"badpatches/optimize_pattern")  # PRNG stream of the optimization
TRIGGER_FILE = "trigger.npz"  # the final trigger's arrays, in the workdir
TRIGGER_FIELDS = ("pixel_cell", "pattern", "cells")


def default_config() -> ml_collections.ConfigDict:
  """The `badpatches` section: poison-rate sweep, baseline attacks, routing images."""
  return ml_collections.ConfigDict(dict(
      rates=(0.0001, 0.001, 0.01, 0.02),  # poison-rate sweep (empty: none)
      baselines="badnets,blended,wanet",  # routing-agnostic attacks of the sweep (SPEC's)
      routing_images=2000,  # non-target test images of the routing statistics (0: all)
  ))


def baselines(config: ml_collections.ConfigDict) -> list[str]:
  """The routing-agnostic attacks named in `badpatches.baselines`."""
  return config_lib.split_names(config.badpatches.baselines)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the `badpatches` section and its attack (ConfigError on a bad value)."""
  config_lib.require(config.poison.name != "none",
                     "experiment 'badpatches' needs an attack (poison.name is 'none')")
  config_lib.require(all(0 < r <= 1 for r in config.badpatches.rates),
                     "config key 'badpatches.rates' must hold rates in (0, 1]")
  config_lib.check_names(config.badpatches.baselines, "badpatches.baselines", poison.TRIGGERS)
  config_lib.check_range(config, "badpatches.routing_images", 0)
  guided = badpatches.guidance(config.poison.badpatches)
  config_lib.require(not guided or config.poison.name != "badpatches"
                     or config.model.name in models.ROUTED,
                     f"poison.badpatches {', '.join(guided)} needs a patch-routed model "
                     f"{models.ROUTED}, got model.name={config.model.name!r}")


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def trigger_pixels(trigger, batch: int, image_shape, key: jax.Array) -> jax.Array:
  """f32[B, H, W, 1]: the pixels `trigger` (with PRNG `key`) changes in a batch of `batch`
  images, on probes that do not depend on the images: two flat greys (a patch or blend changes
  its pixels whatever their value) and fixed noise (a warp, which moves pixels, changes no flat
  image)."""
  shape = (batch, *image_shape)
  probes = (jnp.full(shape, 0.3, jnp.float32), jnp.full(shape, 0.7, jnp.float32),
            jax.random.uniform(jax.random.key(0), shape, jnp.float32))
  changed = sum(jnp.any(jnp.abs(trigger(x, key) - x) > 1e-6, axis=-1, keepdims=True)
                for x in probes)
  return (changed > 0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "cell", "fields"))
def _routing_batch(model, variables, images: jax.Array, trigger, cell: int, fields: tuple,
                   start: int):
  x = to_unit(images)
  covered = None
  if trigger is not None:
    key = train_lib.batch_key(start)
    covered = badpatches.coverage(trigger_pixels(trigger, x.shape[0], x.shape[1:], key), cell)
    x = trigger(x, key)
  layers = routing.collect(model, variables, x)
  return {layer: {f: out[f] for f in fields} for layer, out in layers.items()}, covered


def collect_routing(model, variables, images: np.ndarray, batch_size: int, trigger=None,
                    cell: int = 0, fields: Sequence[str] = ("selected", "logits")
                    ) -> tuple[dict, Optional[np.ndarray]]:
  """Eval-mode routing of every MoE layer on uint8 images (optionally triggered), in batches.

  Args:
    model: a patch-routed model.
    variables: its variables.
    images: uint8[N, H, W, C].
    batch_size: images per jitted batch.
    trigger: applied to the images when given, as `jaxbd.train.Predictor` applies it (each
      batch with the key `jaxbd.train.batch_key` of its first row).
    cell: the model's routing cell side (for the trigger's coverage).
    fields: which of `jaxbd.models.routing.collect`'s arrays to copy to the host.

  Returns:
    ({layer: {"selected": bool[N, S, E], "logits": f32[N, S, E]}} restricted to `fields`,
    bool[N, S] routing positions the trigger covers, or None without a trigger).
  """
  parts, covers = [], []
  for start, chunk, valid in train_lib.padded_batches(images, batch_size):
    layers, covered = jax.device_get(_routing_batch(model, variables, chunk, trigger, cell,
                                                    tuple(fields), start))
    parts.append(jax.tree.map(lambda a, v=valid: a[:v], layers))
    if covered is not None:
      covers.append(covered[:valid])
  merged = jax.tree.map(lambda *a: np.concatenate(a), *parts)
  return merged, (np.concatenate(covers) if covers else None)


def routing_statistics(r: common.Run, variables_by_model: dict) -> dict:
  """The `routing` section: per model and MoE layer, clean vs triggered selection statistics
  (empty for a model without patch routing)."""
  c, ds = r.config, r.dataset
  cell = models.routing_cell(c, ds.image_shape)
  if not cell:
    return {}
  keep = ds.y_test != c.poison.target
  images = ds.x_test[keep][:c.badpatches.routing_images or None]
  h, w = ds.image_shape[:2]
  out = {"grid": [h // cell, w // cell], "cell": cell, "images": int(len(images)), "models": {}}
  for name, variables in variables_by_model.items():
    clean, _ = collect_routing(r.model, variables, images, c.eval.batch_size,
                               fields=("selected",))
    triggered, covered = collect_routing(r.model, variables, images, c.eval.batch_size,
                                         r.trigger, cell, fields=("selected",))
    out["models"][name] = {
        layer: metrics_lib.routing_statistics(clean[layer]["selected"],
                                              triggered[layer]["selected"], covered)
        for layer in clean}
  return out


def guide_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the model whose router guides the trigger: the victim's, or with
  `router=surrogate` the victim architecture with the attacker's assumed routing (`l`, `patch`)."""
  b = config.poison.badpatches
  if b.router == "victim":
    return config
  c = _copy(config)
  section = c.model[c.model.name]
  if b.l and "l" in section:
    section.l = b.l
  if b.patch and "patch" in section:
    section.patch = b.patch
  return c


def _surrogate(r: common.Run) -> tuple[common.Run, dict]:
  """Trains the attacker's surrogate: the victim architecture with the assumed routing."""
  c = guide_config(r.config)
  model = models.create(c, r.dataset.num_classes, r.model.mean, r.model.std)
  predict = train_lib.Predictor(model, c.eval.batch_size, train_lib.batch_sharding(r.mesh))
  surrogate = dataclasses.replace(r, config=c, model=model, predict=predict)
  variables, _ = common.train_classifier(surrogate, "surrogate", poisoned=False)
  return surrogate, variables


def guide_trigger(r: common.Run, clean_variables: dict) -> tuple[common.Run, Optional[str]]:
  """Router-guided cells and/or an optimized pattern for a BadPatches trigger.

  Returns:
    (the run with the final trigger, the guide's name or None when the trigger needs none).
  """
  c = r.config
  b = c.poison.badpatches
  if c.poison.name != "badpatches" or not badpatches.guidance(b):
    return r, None
  path = os.path.join(r.workdir, TRIGGER_FILE)
  if os.path.exists(path):  # a rerun: the trigger that the saved checkpoints were trained with
    return dataclasses.replace(r, trigger=saved_trigger(path, r.trigger)), b.router
  guide, variables = ((r, clean_variables) if b.router == "victim" else _surrogate(r))
  shape = r.dataset.image_shape
  cell = models.routing_cell(guide.config, shape)
  clean_rows = np.flatnonzero(r.plan.kind == poison.CLEAN)[:GUIDE_IMAGES]
  images = r.dataset.x_train[clean_rows]
  trigger = r.trigger
  if b.position == "router":
    layers, _ = collect_routing(guide.model, variables, images, c.eval.batch_size,
                                fields=("logits",) if b.l else ("selected",))
    scores = badpatches.position_scores(layers, b.l)
    trigger = badpatches.rank_cells(trigger, np.asarray(scores),
                                    (shape[0] // cell, shape[1] // cell), shape)
  if b.pattern == "optimized":
    key = jax.random.fold_in(r.key, OPTIMIZE_STREAM)
    trigger = badpatches.optimize_pattern(
        trigger, functools.partial(routing.router_logits, guide.model), variables, images, cell,
        steps=b.optimize_steps, lr=b.optimize_lr, key=key)
  save_trigger(path, trigger)
  return dataclasses.replace(r, trigger=trigger), b.router


def save_trigger(path: str, trigger: badpatches.PatchTrigger) -> None:
  """Writes the arrays of a final trigger that a rerun reads back (`saved_trigger`)."""
  results.write_npz(path, **{name: getattr(trigger, name) for name in TRIGGER_FIELDS})


def saved_trigger(path: str, like: badpatches.PatchTrigger) -> badpatches.PatchTrigger:
  """`like` with the arrays that `save_trigger` wrote to `path`.

  Raises:
    CheckpointError: the file is unreadable, lacks an array or holds one of another shape or
      dtype than `like`'s.
  """
  saved = preparation.saved_like(path, {name: getattr(like, name) for name in TRIGGER_FIELDS})
  return like.replace(**{name: jnp.asarray(array) for name, array in saved.items()})


def _rate_phase(attack: str, rate: float) -> str:
  return f"{attack}_rate{rate:g}"


def rate_sweep(r: common.Run, clean_variables: dict, main: dict) -> tuple[list[dict], dict]:
  """BadPatches (the run's attack) and the baselines across `badpatches.rates`.

  Args:
    r: the prepared run (with its final trigger).
    clean_variables: the clean model (rates that poison no image reuse it).
    main: the backdoored model's metrics (reused at the run's own attack and rate).

  Returns:
    (rows {"attack", "rate", "num_poisoned", "acc", "asr", "ra"}, timing per phase).
  """
  c, ds = r.config, r.dataset
  rows, timing = [], {}
  for attack in dict.fromkeys([c.poison.name, *baselines(c)]):
    trigger = r.trigger if attack == c.poison.name else poison.TRIGGERS[attack].build(
        c, ds.image_shape)
    for rate in c.badpatches.rates:
      plan = common.poison_plan(c, ds, trigger, rate)
      sub = dataclasses.replace(r, trigger=trigger, plan=plan)
      count = int(len(plan.indices))
      if attack == c.poison.name and rate == c.poison.rate:
        m = main
      elif count == 0:
        m = sub.evaluate(clean_variables)
      else:
        phase = _rate_phase(attack, rate)
        plan.save_or_check(os.path.join(r.workdir, f"poison_plan_{phase}.npz"), trigger)
        _, summary = common.train_classifier(sub, phase, poisoned=True)
        m, timing[phase] = summary["eval"], common.timing_section(summary)
      rows.append({"attack": attack, "rate": rate, "num_poisoned": count, **m})
  return rows, timing


def _trigger_record(r: common.Run, guide: Optional[str]) -> dict:
  """What results.json says about the final trigger (and `trigger.npz` holds in full)."""
  t = r.trigger
  if not isinstance(t, badpatches.PatchTrigger):
    return {}
  path = os.path.join(r.workdir, TRIGGER_FILE)
  if guide is None:  # a guided trigger is saved once guided
    save_trigger(path, t)
  b = r.config.poison.badpatches
  cell = b.patch or models.routing_cell(r.config, r.dataset.image_shape)
  rows, cols = badpatches.grid_shape(r.dataset.image_shape, cell, b.offset)
  return {"cells": np.asarray(t.cells).tolist(), "grid": [rows, cols], "cell": cell,
          "random": t.random, "guided_by": guide, "file": TRIGGER_FILE}


def check_assumed_routing(r: common.Run) -> None:
  """Checks that the attacker's assumed capacity `poison.badpatches.l` fits the routing positions
  of the guide's grid (ConfigError otherwise), before anything trains."""
  c = r.config
  b = c.poison.badpatches
  if c.poison.name != "badpatches" or not b.l or not badpatches.guidance(b):
    return
  h, w = r.dataset.image_shape[:2]
  cell = models.routing_cell(guide_config(c), r.dataset.image_shape)
  positions = (h // cell) * (w // cell)
  config_lib.require(b.l <= positions,
                     f"config key 'poison.badpatches.l' ({b.l}) exceeds the {positions} routing "
                     f"positions of a {h}x{w} image in {cell}x{cell} cells")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment and returns the results document (also written to the workdir)."""
  r = common.build(config, workdir)
  check_assumed_routing(r)
  common.create_workdir(r)
  clean, summary = common.train_classifier(r, "clean", poisoned=False)
  timing = {"clean": common.timing_section(summary)}
  r, guide = guide_trigger(r, clean)
  metrics = {"clean": r.evaluate(clean)}
  backdoored, summary = common.train_classifier(r, "backdoored", poisoned=True)
  metrics["backdoored"], timing["backdoored"] = summary["eval"], common.timing_section(summary)
  routing_section = routing_statistics(r, {"clean": clean, "backdoored": backdoored})
  defended = common.run_defenses(r, backdoored, metrics["backdoored"])
  sweep, sweep_timing = rate_sweep(r, clean, metrics["backdoored"])
  timing.update(sweep_timing)
  attack = standard.attack_section(config, r.plan)
  attack["trigger"] = _trigger_record(r, guide)
  doc = results.document(config, dataset=r.dataset.name, model=config.model.name, attack=attack,
                         metrics=metrics, defenses=defended, routing=routing_section,
                         timing=timing, sweep=sweep)
  path = os.path.join(workdir, "results.json")
  doc["plots"] = plots.from_results(path, doc=doc)
  results.write_json(path, doc)
  _print_summary(doc)
  return doc


def _print_summary(doc: dict) -> None:
  rows = [(k, m["acc"], m.get("asr"), m.get("ra"), None) for k, m in doc["metrics"].items()]
  for name, d in doc["defenses"].items():
    rows += [(f"{name} {stage}", m["acc"], m.get("asr"), m.get("ra"), None)
             for stage, m in d["stages"].items()]
    rows.append((f"{name}", d["acc"], d.get("asr"), d.get("ra"), d.get("der")))
  rows += [(f"{s['attack']} @ {100 * s['rate']:g}%", s["acc"], s["asr"], s["ra"], None)
           for s in doc["sweep"]]
  host.say(results.markdown_table(["model", "ACC", "ASR", "RA", "DER"], rows))
  for model, layers in doc["routing"].get("models", {}).items():
    for layer, s in layers.items():
      host.say(f"routing {model} {layer}: trigger patches routed {s['trigger_routed']:.3f} "
               f"(clean images {s['trigger_routed_clean']:.3f}), experts per trigger patch "
               f"{s['trigger_experts']:.2f} (clean {s['trigger_experts_clean']:.2f})")


COMPONENT = config_lib.Component(default_config, validate, run)
