"""BadPatches: trigger pixels on the grid, positions, partial knowledge, router guidance; and on
real CIFAR-10 (CPU recipe) the backdoor, the comparison with BadNets, the routing statistics."""

import dataclasses
import functools
import json
import os
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import data, experiments, metrics, poison
from jaxbd import train as train_lib
from jaxbd.errors import CheckpointError, ConfigError
from jaxbd.experiments import badpatches as experiment
from jaxbd.experiments import common, plots, results
from jaxbd.models import routing
from jaxbd.poison import badpatches

from conftest import load_config


def bp_config(model="pmoe_patch", **kw):
  c = config_lib.defaults()
  c.experiment = "badpatches"  # which sets up router-guided and optimized triggers
  c.model.name = model
  c.model.pmoe_patch.width = 8
  c.poison.name = "badpatches"
  for k, v in kw.items():
    c.poison.badpatches[k] = v
  config_lib.validate(c)
  return c


@functools.partial(jax.jit, static_argnums=1)
def _changed(trigger, batch, key):
  x = jnp.full((batch, 32, 32, 3), 0.5)
  return jnp.any(trigger(x, key) != x, axis=-1)


def changed(trigger, batch=2, key=None):
  """bool[B, 32, 32]: pixels the trigger changes in mid-gray images."""
  return np.asarray(_changed(trigger, batch, key))


def square(rows, cols):
  m = np.zeros((32, 32), bool)
  m[rows, cols] = True
  return m


@pytest.mark.parametrize("kw,rows,cols", [
    ({}, slice(28, 32), slice(28, 32)),  # one whole victim patch, bottom right
    (dict(cells=(0,)), slice(0, 4), slice(0, 4)),
    (dict(cells=(9,), size=2), slice(4, 6), slice(4, 6)),  # part of a patch, at its top-left
    (dict(patch=8, cells=(5,)), slice(8, 16), slice(8, 16)),  # the attacker assumes 8x8 patches
    (dict(offset=2, cells=(0,)), slice(2, 6), slice(2, 6)),  # grid shifted by 2 pixels
])
def test_trigger_covers_exactly_its_grid_cells(kw, rows, cols):
  trigger = poison.make_trigger(bp_config(**kw), (32, 32, 3))
  np.testing.assert_array_equal(changed(trigger)[0], square(rows, cols))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 32, 32, 3)), jnp.float32)
  out = np.asarray(trigger(x))
  inside = square(rows, cols)
  np.testing.assert_array_equal(out[:, ~inside], np.asarray(x)[:, ~inside])
  np.testing.assert_array_equal(out[:, inside], np.asarray(trigger.pattern)[inside][None]
                                .repeat(3, 0))


def test_patterns_and_count():
  t = poison.make_trigger(bp_config(count=3, pattern="solid", value=200), (32, 32, 3))
  hit = changed(t)[0]
  assert hit.sum() == 3 * 16 and hit[28:32, 20:32].all()  # the last 3 cells of the last row
  np.testing.assert_allclose(np.asarray(t.pattern)[hit], 200 / 255, rtol=1e-6)
  t = poison.make_trigger(bp_config(pattern="checkerboard"), (32, 32, 3))
  np.testing.assert_array_equal(np.asarray(t.pattern)[28:32, 28:32, 0],
                                np.indices((4, 4)).sum(0) % 2 == 0)


def test_random_positions_differ_per_image_and_are_reproducible():
  t = poison.make_trigger(bp_config(position="random", count=2), (32, 32, 3))
  masks = changed(t, batch=64, key=jax.random.key(1))
  cells = masks.reshape(64, 8, 4, 8, 4).any((2, 4)).reshape(64, 64)
  np.testing.assert_array_equal(cells.sum(1), 2)  # exactly k distinct whole cells per image
  np.testing.assert_array_equal(masks.sum((1, 2)), 2 * 16)
  assert len({tuple(np.flatnonzero(c)) for c in cells}) > 40
  np.testing.assert_array_equal(masks, changed(t, batch=64, key=jax.random.key(1)))
  np.testing.assert_array_equal(changed(t, 8), changed(t, 8))  # evaluation: the trigger's key


class CellProbe(nn.Module):
  """Logits f32[B, 64]: the mean pixel of each 4x4 cell of a 32x32 image (the brightest cell
  wins)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return x.mean(-1).reshape(-1, 8, 4, 8, 4).mean((2, 4)).reshape(-1, 64)


def test_evaluation_draws_random_positions_per_batch():
  """The Predictor gives each batch its own key: row r of one batch and row r of the next get
  independent cells, and a second evaluation repeats every draw."""
  t = poison.make_trigger(bp_config(position="random", pattern="solid"), (32, 32, 3))
  predict = train_lib.Predictor(CellProbe(), batch_size=100)
  black = np.zeros((300, 32, 32, 3), np.uint8)
  cells = predict({}, black, t)
  assert len(np.unique(cells)) > 50  # one random cell per image among 64
  by_batch = cells.reshape(3, 100)
  assert np.mean(by_batch[0] == by_batch[1]) < 0.2  # ~1/64 by chance; 1.0 with one shared key
  np.testing.assert_array_equal(cells, predict({}, black, t))


def test_coverage_of_victim_positions_under_partial_knowledge():
  cover = lambda **kw: np.asarray(badpatches.coverage(
      poison.make_trigger(bp_config(**kw), (32, 32, 3)).mask(1), 4))[0].reshape(8, 8)
  assert np.flatnonzero(cover()).tolist() == [63]
  assert np.flatnonzero(cover(offset=2, cells=(0,))).tolist() == [0, 1, 8, 9]  # straddles 4
  assert np.flatnonzero(cover(patch=2, cells=(18,))).tolist() == [1]  # a quarter of a patch


def test_bad_trigger_settings_are_one_line_errors():
  with pytest.raises(ConfigError, match="count 65 is more than the 64 cells of a 8x8 grid"):
    poison.make_trigger(bp_config(count=65), (32, 32, 3))
  with pytest.raises(ConfigError, match="size 5 is larger than the cell side 4"):
    poison.make_trigger(bp_config(size=5), (32, 32, 3))
  with pytest.raises(ConfigError, match="offset 4 must be smaller than the cell side 4"):
    poison.make_trigger(bp_config(offset=4), (32, 32, 3))
  with pytest.raises(ConfigError, match="cells .* are not all in the 64 cells"):
    poison.make_trigger(bp_config(cells=(64,)), (32, 32, 3))
  with pytest.raises(ConfigError, match="patch must be set .* the model has no patch grid"):
    poison.make_trigger(bp_config(model="cnn"), (32, 32, 3))
  assert poison.make_trigger(bp_config(model="cnn", patch=4), (32, 32, 3)).num_cells == 64
  with pytest.raises(ConfigError, match="'poison.badpatches.position' must be one of"):
    bp_config(position="corner")
  with pytest.raises(ConfigError, match="'poison.badpatches.cells' must list count=2 cells"):
    bp_config(cells=(1,), count=2)
  with pytest.raises(ConfigError, match=r"'poison.badpatches.cells' lists a cell twice: \(5, 5\)"):
    bp_config(cells=(5, 5), count=2)


def test_poisoning_pipeline_triggers_only_the_planned_rows():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 200, (32, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 4, 32)
  plan = poison.make_plan(labels, 4, rate=0.25, target=0, seed=0)
  trigger = poison.make_trigger(bp_config(), (32, 32, 3))
  arrays = data.train_arrays(images, plan.labels, plan.kind)
  x, _ = jax.jit(lambda a, k: data.gather_batch(a, jnp.arange(32), k,
                                                poison_fn=poison.poison_fn(trigger)))(
                                                    arrays, jax.random.key(0))
  hit = (np.abs(np.asarray(x) - images / 255.0) > 1e-6).any((1, 2, 3))
  np.testing.assert_array_equal(hit, np.isin(np.arange(32), plan.indices))


def test_router_guided_cells_are_the_best_scoring_cells():
  t = poison.make_trigger(bp_config(count=2), (32, 32, 3))
  scores = np.zeros(64)
  scores[[10, 45]] = [3.0, 2.0]
  scores[20] = 1.0
  guided = badpatches.rank_cells(t, scores, (8, 8), (32, 32, 3))
  assert np.asarray(guided.cells).tolist() == [10, 45]
  # A 4x4 attacker grid of 8-pixel cells: a cell scores the mean of its 4 victim positions.
  coarse = poison.make_trigger(bp_config(patch=8), (32, 32, 3))
  guided = badpatches.rank_cells(coarse, scores, (8, 8), (32, 32, 3))
  assert np.asarray(guided.cells).tolist() == [1]  # victim 2, 3, 10, 11: mean 0.75
  scores[44] = 2.5  # now cell 10 (victim 36, 37, 44, 45) has mean 1.125
  assert np.asarray(badpatches.rank_cells(coarse, scores, (8, 8), (32, 32, 3)).cells).tolist() \
      == [10]
  layers = {"moe": {"selected": np.zeros((2, 64, 4), bool), "logits": np.zeros((2, 64, 4))}}
  layers["moe"]["selected"][:, 7, :3] = True
  layers["moe"]["logits"][:, 12] = 1.0
  assert int(np.argmax(badpatches.position_scores(layers))) == 7  # the model's own routing
  assert int(np.argmax(badpatches.position_scores(layers, l=1))) == 12  # the attacker's l


def test_optimized_pattern_raises_the_router_margin_of_the_trigger(tiny_model):
  _, model, variables = tiny_model("pmoe_patch")
  params = variables["params"]
  router = {"dense": {"kernel": params["moe"]["router"]["dense"]["kernel"] * 1e3}}
  variables = {**variables, "params": {**params, "moe": {**params["moe"], "router": router}}}
  # (a router with a visible preference: the init is N(0, 1e-4))
  trigger = poison.make_trigger(bp_config(pattern="optimized"), (32, 32, 3))
  images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  logits = functools.partial(routing.router_logits, model)

  def margin(t):
    x = jnp.asarray(images, jnp.float32) / 255.0
    z = logits(variables, t(x))[0]
    z = z - z.mean(1, keepdims=True)
    return float(z[:, 63].mean())  # the trigger's position

  tuned = badpatches.optimize_pattern(trigger, logits, variables, images, 4, steps=10, lr=0.3,
                                      key=jax.random.key(1), batch_size=32)
  assert margin(tuned) > margin(trigger) + 0.05
  pattern = np.asarray(tuned.pattern)
  assert pattern.min() >= 0.0 and pattern.max() <= 1.0
  assert not np.any(pattern[~np.asarray(tuned.pixel_cell < tuned.num_cells)])


def test_pattern_optimization_compiles_no_images_or_weights_into_its_step():
  """The images, the router's weights and the trigger are arguments of the jitted step: lowering
  it captures no constant of 1 KiB or more (the images are 192 KiB, the kernel 3 KiB). The
  router is nonlinear, so the gradient needs the images."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  kernel = jnp.asarray(rng.normal(size=(48, 16)), jnp.float32)

  def router(w, x):  # f32[B, 32, 32, 3] -> [f32[B, 64, 16]]
    patches = x.reshape(-1, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 64, 48)
    return [jnp.tanh(patches @ w)]

  trigger = poison.make_trigger(bp_config(pattern="optimized"), (32, 32, 3))
  threshold = jax.config.jax_captured_constants_warn_bytes
  jax.config.update("jax_captured_constants_warn_bytes", 1024)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      tuned = badpatches.optimize_pattern(trigger, router, kernel, images, 4, steps=2, lr=0.3,
                                          key=jax.random.key(1), batch_size=8)
  finally:
    jax.config.update("jax_captured_constants_warn_bytes", threshold)
  captured = [str(w.message) for w in caught
              if re.search("constants were captured|Closed-over constant", str(w.message))]
  assert not captured, captured
  assert not np.array_equal(np.asarray(tuned.pattern), np.asarray(trigger.pattern))


def test_routing_statistics_count_selections():
  clean = np.zeros((2, 4, 2), bool)
  clean[:, 0, 0] = True
  triggered = clean.copy()
  triggered[:, 3, :] = True
  covered = np.zeros((2, 4), bool)
  covered[:, 3] = True
  s = metrics.routing_statistics(clean, triggered, covered)
  assert s["trigger_routed"] == 1.0 and s["trigger_routed_clean"] == 0.0
  assert s["trigger_experts"] == 2.0 and s["trigger_per_expert"] == [1.0, 1.0]
  assert s["clean_rate"] == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
  assert s["triggered_rate"][1] == [0.0, 0.0, 0.0, 1.0]
  with pytest.raises(ValueError, match="do not match"):
    metrics.routing_statistics(clean, triggered, covered[:, :3])


# Real CIFAR-10, the CPU recipe of configs/badpatches.py (one run shared by these tests).


@pytest.mark.slow
def test_badpatches_backdoors_pmoe_at_one_percent(badpatches_cpu_run):
  """Measured (seed 0): clean ACC 0.398 / ASR 0.032; BadPatches 1% ACC 0.402, ASR 1.0."""
  doc = badpatches_cpu_run.doc
  clean, bd = doc["metrics"]["clean"], doc["metrics"]["backdoored"]
  assert doc["attack"]["num_poisoned"] == 50 and doc["model"] == "pmoe_patch"
  assert clean["acc"] >= 0.35, clean
  assert clean["asr"] <= 0.20, clean
  assert bd["asr"] >= 0.90, bd
  assert abs(clean["acc"] - bd["acc"]) <= 0.05, (clean, bd)


@pytest.mark.slow
def test_badpatches_beats_badnets_at_a_tenth_of_a_percent(badpatches_cpu_run):
  """5 poisoned images of 5,000. Measured: BadPatches ASR 0.987, BadNets (3x3) ASR 0.184."""
  rows = {(r["attack"], r["rate"]): r for r in badpatches_cpu_run.doc["sweep"]}
  bp, bn = rows[("badpatches", 0.001)], rows[("badnets", 0.001)]
  assert bp["num_poisoned"] == bn["num_poisoned"] == 5
  assert bp["asr"] >= 0.85, bp
  assert bp["asr"] >= bn["asr"] + 0.3, (bp, bn)


@pytest.mark.slow
def test_triggered_patches_are_routed_to_more_experts(badpatches_cpu_run):
  """Measured: on the backdoored model the trigger patch goes to 2.25 of 4 experts (routed in
  100% of triggered images) vs 0.95 at that position of clean images. The clean model already
  routes the high-contrast checkerboard patch more (1.44 experts, routed in 96%) than the
  natural patch there (0.93); poisoning raises it further."""
  routing_doc = badpatches_cpu_run.doc["routing"]
  assert routing_doc["grid"] == [8, 8] and routing_doc["images"] == 1000
  bd = routing_doc["models"]["backdoored"]["moe"]
  clean = routing_doc["models"]["clean"]["moe"]
  assert bd["trigger_routed"] >= 0.95
  assert bd["trigger_experts"] >= 2 * bd["trigger_experts_clean"]
  assert bd["trigger_experts"] >= 1.3 * clean["trigger_experts"]
  rates = np.asarray(bd["triggered_rate"])  # [E, S]
  assert rates.shape == (4, 64) and rates[:, 63].sum() == pytest.approx(bd["trigger_experts"])


@pytest.mark.slow
def test_results_files_and_router_guidance(badpatches_cpu_run, tmp_path):
  run = badpatches_cpu_run
  workdir = run.workdir
  doc = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert doc["attack"]["trigger"]["cells"] == [63] and doc["attack"]["trigger"]["cell"] == 4
  for name in doc["plots"] + ["trigger.npz", "poison_plan_badnets_rate0.001.npz"]:
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert set(doc["plots"]) == {"routing_clean_moe.png", "routing_backdoored_moe.png",
                               "asr_vs_rate.png", "fine_pruning_sweep.png"}
  saved = poison.load_plan(os.path.join(workdir, "poison_plan_badpatches_rate0.001.npz"))
  assert len(saved.indices) == 5
  # Router guidance from the trained clean victim: the cells its routers select most often.
  r, clean = run.prepared, run.variables("clean")
  config = ml_collections.ConfigDict(r.config.to_dict())
  config.poison.badpatches.position = "router"
  guided, guide = experiment.guide_trigger(  # in a workdir of its own, where it saves its trigger
      dataclasses.replace(r, config=config, workdir=str(tmp_path)), clean)
  guided = guided.trigger
  np.testing.assert_array_equal(np.load(tmp_path / "trigger.npz")["cells"], guided.cells)
  clean_rows = np.flatnonzero(r.plan.kind == poison.CLEAN)[:experiment.GUIDE_IMAGES]
  layers, _ = experiment.collect_routing(r.model, clean, r.dataset.x_train[clean_rows], 500)
  scores = np.asarray(badpatches.position_scores(layers))
  assert guide == "victim"
  assert np.asarray(guided.cells).tolist() == [int(np.argmax(scores))]


def digits_config(arg):
  """configs/badpatches.py shrunk to scikit-learn's 8x8 digits: 2x2 patches, a 4x4 grid."""
  c = load_config(f"configs/badpatches.py:cpu,model=pmoe_patch,{arg}")
  c.data.source = "digits"
  c.data.update(dict(train_limit=0, test_limit=0))
  c.model.pmoe_patch.update(dict(patch=2, l=4, width=8))
  c.train.update(dict(epochs=1, batch_size=64))
  c.badpatches.update(dict(rates=(), routing_images=100))
  c.defense.names = ""
  c.poison.badpatches.optimize_steps = 5
  c.log.progress = False
  return c


def test_rate_sweep_plans_are_the_main_run_plans_at_each_rate(tmp_path, monkeypatch):
  """Triggers with cover rows (Adaptive-Blend, WaNet's noise mode) get them in the sweep too."""
  c = digits_config("knowledge=full")
  c.poison.name = "adaptive_blend"
  c.badpatches.update(dict(rates=(0.05, 0.2), baselines="wanet"))
  r = common.prepare(c, str(tmp_path / "run"))
  trained = {}

  def train_classifier(sub, phase, poisoned):
    assert poisoned
    trained[phase] = sub.plan
    summary = dict(seconds=0.0, images_per_second=0.0, steps=0, resumed_from_epoch=None)
    return None, {**summary, "eval": dict(acc=0.0, asr=0.0, ra=0.0)}

  monkeypatch.setattr(common, "train_classifier", train_classifier)
  rows, _ = experiment.rate_sweep(r, None, {})
  assert [(row["attack"], row["rate"]) for row in rows] == [
      ("adaptive_blend", 0.05), ("adaptive_blend", 0.2), ("wanet", 0.05), ("wanet", 0.2)]
  for row in rows:
    main = ml_collections.ConfigDict(c.to_dict())
    main.poison.update(dict(name=row["attack"], rate=row["rate"]))
    want = common.build(main, str(tmp_path / "main")).plan  # writes nothing
    got = trained[f"{row['attack']}_rate{row['rate']:g}"]
    ratio = 1.0 if row["attack"] == "adaptive_blend" else 2.0  # conservatism 0.5; cross ratio 2
    assert len(got.indices) == row["num_poisoned"] == int(row["rate"] * len(r.dataset.y_train))
    assert len(got.cover_indices) == int(ratio * row["rate"] * len(r.dataset.y_train)) > 0
    for field in ("indices", "cover_indices", "labels"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    saved = poison.load_plan(str(tmp_path / "run" / f"poison_plan_{row['attack']}_rate"
                                 f"{row['rate']:g}.npz"))
    np.testing.assert_array_equal(saved.cover_indices, want.cover_indices)


@pytest.mark.slow
def test_surrogate_guided_optimized_attack_runs_end_to_end(tmp_path, monkeypatch):
  """Router-guided cells from a surrogate with the attacker's assumed l, optimized pattern;
  results.json is written once, after the plots, which are drawn from the in-memory document
  exactly as from the file."""
  c = digits_config("position=router,pattern=optimized")
  c.poison.badpatches.router = "surrogate"
  c.poison.badpatches.l = 2
  written = []
  write_json = results.write_json
  monkeypatch.setattr(results, "write_json",
                      lambda path, obj: (written.append(os.path.basename(path)),
                                         write_json(path, obj)))
  doc = experiments.run(c, str(tmp_path))
  assert written.count("results.json") == 1
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["plots"] == doc["plots"] == ["routing_clean_moe.png", "routing_backdoored_moe.png"]
  redrawn = tmp_path / "redrawn"
  redrawn.mkdir()
  assert plots.from_results(str(tmp_path / "results.json"), str(redrawn)) == doc["plots"]
  for name in doc["plots"]:
    assert (redrawn / name).read_bytes() == (tmp_path / name).read_bytes()
  trigger = doc["attack"]["trigger"]
  assert trigger["guided_by"] == "surrogate" and trigger["grid"] == [4, 4]
  assert len(trigger["cells"]) == 1 and 0 <= trigger["cells"][0] < 16
  assert (tmp_path / "checkpoints" / "surrogate").is_dir()
  saved = np.load(tmp_path / "trigger.npz")
  pattern = saved["pattern"][saved["pixel_cell"] == trigger["cells"][0]]
  assert pattern.shape == (4, 1) and len(np.unique(pattern)) > 1  # optimized, not uniform
  assert set(doc["metrics"]) == {"clean", "backdoored"} and doc["sweep"] == []
  assert doc["routing"]["grid"] == [4, 4]
  # A rerun reads the trigger back (its checkpoints were trained with it): no guidance again.
  os.remove(tmp_path / "results.json")
  for name in ("rank_cells", "optimize_pattern"):
    monkeypatch.setattr(badpatches, name, lambda *a, **k: pytest.fail("guided again"))
  again = experiments.run(c, str(tmp_path))
  assert again["attack"]["trigger"] == trigger and again["metrics"] == doc["metrics"]
  np.savez(tmp_path / "trigger.npz", **{**saved, "pattern": saved["pattern"][:2]})
  with pytest.raises(CheckpointError, match=r"trigger.npz holds a float32\[2, 8, 1\] pattern, "
                     r"this run's trigger has float32\[8, 8, 1\]; delete it"):
    experiments.run(c, str(tmp_path))


def test_bad_badpatches_config_is_refused_before_the_workdir_exists(tmp_path):
  with pytest.raises(ConfigError, match="knowledge='psychic' is not one of full, patch"):
    load_config("configs/badpatches.py:knowledge=psychic")
  c = digits_config("knowledge=full")
  c.poison.badpatches.count = 17
  with pytest.raises(ConfigError, match="count 17 is more than the 16 cells of a 4x4 grid"):
    experiments.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  c = digits_config("knowledge=full")
  c.poison.badpatches.update(dict(position="router", l=17))  # the 4x4 grid has 16 positions
  with pytest.raises(ConfigError, match=r"'poison.badpatches.l' \(17\) exceeds the 16 routing "
                     "positions of a 8x8 image in 2x2 cells"):
    experiments.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  c = digits_config("knowledge=full")
  c.badpatches.baselines = "lira"
  with pytest.raises(ConfigError, match="'badpatches.baselines' must be one of"):
    experiments.run(c, str(tmp_path / "run"))


def test_trigger_pixels_find_a_patch_and_a_warp():
  """The routing statistics' covered pixels: BadNets' 3x3 corner patch exactly, and WaNet's warp,
  which changes no flat image, over most of the image (the noise probe)."""
  c = config_lib.defaults()
  c.poison.name = "badnets"
  c.poison.badnets.update(dict(size=3, corner="bottom_right"))
  patch = experiment.trigger_pixels(poison.make_trigger(c, (32, 32, 3)), 2, (32, 32, 3),
                                    jax.random.key(0))
  expected = np.zeros((2, 32, 32, 1), np.float32)
  expected[:, -3:, -3:] = 1
  np.testing.assert_array_equal(patch, expected)
  c.poison.name = "wanet"
  warp = experiment.trigger_pixels(poison.make_trigger(c, (32, 32, 3)), 2, (32, 32, 3),
                                   jax.random.key(0))
  assert float(jnp.mean(warp)) > 0.5
