"""Backdoor detection by trigger inversion: a suspicion score per model.

**Calibrated Trigger Inversion (CTI)**, Lukas & Kerschbaum, "Pick your Poison" (arXiv
2305.09671): repair a copy of the suspect model f_P with Pivotal Tuning (f_R; the caller passes
the repair, so another defense can stand in for it, `detection.cti.repair`), then for every
candidate target t optimize an additive full-image trigger delta_t (init U(0, 0.01), Adam lr 0.01,
betas (0.5, 0.9), 50 steps, batch 128) on trusted images of classes != t, as the reference's
infinite loader gives them (each pass over those images a fresh shuffle, without replacement;
here the passes run on into each other, so every batch is whole) and its batch-level
`RandomHorizontalFlip` flips them (the whole batch or none of it):

    loss = CE(f_P(clip(x + delta, 0, 1)), t) + 0.5 * CE(f_R(clip(x + delta, 0, 1)), y).

A trigger that fools the suspect but not its repaired copy reveals a backdoor:
`s_t = ASR_P(delta_t) - ASR_R(delta_t)`; the paper's model score is `-max_t s_t` (low = suspicious),
so `suspicion = max_t s_t`. The reference repairs and inverts on the trusted images and measures
s_t on test images, which neither step saw; a defense never sees test data, so here a random
`score_fraction` of the trusted images (classes != t) is held out from the repair and the
inversion to measure s_t (0: measure on the images the trigger was fitted to).

**Neural Cleanse (NC)**, Wang et al., S&P 2019 (the baseline): for every class t, find the
smallest mask m (H x W) and pattern p with `x' = (1 - m) x + m p` classified as t:
`CE(f(x'), t) + cost_t * |m|_1`, mask and pattern through tanh, Adam (lr 0.1, betas (0.5, 0.9)),
an epoch one shuffled pass over the trusted images (batch 32; all classes, the target's too).
As in the reference (`reset_cost_to_zero`), the cost starts at 0 and is set to 1e-3 once the
attack success has been >= 99% for `patience` epochs; from then on it is multiplied by 2 after
`patience` epochs at >= 99% and divided by 2^1.5 after `patience` epochs below. An epoch's mask is
kept when its attack success (mean over the epoch's batches) is >= 99% and its mean L1 over the
epoch's batches is the smallest so far; the class's norm is the L1 of that kept mask (a class
that never succeeds keeps its last mask's, as the reference does; `found` says which). The
model's score is the smallest norm (the reference's and SPEC's; `score="min_norm"`, suspicion
= -min); `score="anomaly_index"` makes the suspicion NC's own outlier test instead, the anomaly
index of the smallest norm, `(median - min) / (1.4826 * MAD)` (0 when the minimum is not below
the median; MAD is floored at 1e-12, so a minimum below a median that most norms share scores
about 1e12), which flags a model above 2. Both are reported. The reference's early
stop (`early_stop`): once a mask is kept, a class stops after `early_stop_patience` (25) epochs in
a row whose kept mean L1 is not below `early_stop_threshold` (1.0) times the smallest so far,
provided its cost has been both raised and lowered since it was started; its state is frozen
from then on, and the run ends when every class has stopped or after `epochs` epochs (100 by
default, the reference's 1,000 cut to a tenth: with the early stop most classes end well
before either).

Both optimize all K candidates at once with `jax.vmap` over classes inside one jitted program.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxbd import config as config_lib
from jaxbd import data as data_lib
from jaxbd.defenses import base
from jaxbd.errors import DataError
from jaxbd.poison.sig import AdditiveTrigger
from jaxbd.train import step as step_lib


def cti_config() -> ml_collections.ConfigDict:
  """CTI's trigger-inversion defaults (the repair uses the `defense.pt` section)."""
  return ml_collections.ConfigDict(dict(
      steps=50,  # Adam steps per candidate target
      batch_size=128,
      lr=0.01,
      init=0.01,  # delta starts as U(0, init)
      repair_weight=0.5,  # weight of the repaired model's cross-entropy on true labels
      score_fraction=0.5,  # trusted images held out from repair and inversion to measure s_t
      repair="pt",  # the defense that makes f_R (pt: the paper's; any of jaxbd.defenses)
  ))


def nc_config() -> ml_collections.ConfigDict:
  """Neural Cleanse defaults (epochs reduced from the reference's 1,000; see the module
  docstring)."""
  return ml_collections.ConfigDict(dict(
      epochs=100,
      batch_size=32,
      lr=0.1,
      init_cost=1e-3,
      threshold=0.99,  # attack success that counts as a found trigger
      patience=5,  # epochs before the cost is changed
      cost_up=2.0,
      cost_down=2.0**1.5,
      reset_cost_to_zero=True,  # start at cost 0 until the attack succeeds (the reference's)
      early_stop=True,  # stop a class whose kept mask stopped shrinking (the reference's)
      early_stop_patience=25,  # epochs without a smaller kept mask (the reference: 5 patience)
      early_stop_threshold=1.0,  # "smaller": below this times the smallest so far
      score="min_norm",  # suspicion: min_norm (-min_t norm_t, the reference's) | anomaly_index
  ))


def validate_cti(config: ml_collections.ConfigDict, path: str) -> None:
  """Checks the CTI section at config path `path` (ConfigError on a bad value)."""
  for key in ("steps", "batch_size"):
    config_lib.check_range(config, f"{path}.{key}", 1)
  for key in ("lr", "init"):
    config_lib.check_range(config, f"{path}.{key}", 0, low_open=True)
  config_lib.check_range(config, f"{path}.repair_weight", 0)
  config_lib.check_range(config, f"{path}.score_fraction", 0, 0.9)


def validate_nc(config: ml_collections.ConfigDict, path: str) -> None:
  """Checks the Neural Cleanse section at config path `path` (ConfigError on a bad value)."""
  for key in ("epochs", "batch_size", "patience", "early_stop_patience"):
    config_lib.check_range(config, f"{path}.{key}", 1)
  for key in ("lr", "init_cost", "early_stop_threshold"):
    config_lib.check_range(config, f"{path}.{key}", 0, low_open=True)
  config_lib.check_range(config, f"{path}.threshold", 0, 1)
  for key in ("cost_up", "cost_down"):
    config_lib.check_range(config, f"{path}.{key}", 1, low_open=True)
  config_lib.check_choice(config[f"{path}.score"], f"{path}.score", NC_SCORES)


def _logits(model, variables, x: jax.Array) -> jax.Array:
  """Eval-mode logits f32[B, K] of images f32[B, H, W, C] in [0, 1]."""
  return model.apply(variables, x, train=False)


def class_batches(key: jax.Array, labels: np.ndarray, num_classes: int, steps: int,
                  batch: int) -> np.ndarray:
  """int32[steps, K, B]: for each candidate t, `steps` batches of the rows whose label is not t,
  passes of fresh shuffles without replacement laid end to end.

  Raises:
    DataError: every trusted image has the same label (no image of another class for it).
  """
  labels = np.asarray(labels)
  out = np.empty((num_classes, steps * batch), np.int32)
  for t in range(num_classes):
    pool = np.flatnonzero(labels != t)
    if not len(pool):
      raise DataError(f"trigger inversion for class {t} needs trusted images of other classes; "
                      "every trusted image is of that class")
    passes = jax.random.split(jax.random.fold_in(key, t), -(-out.shape[1] // len(pool)))
    stream = jax.vmap(lambda k, pool=pool: jax.random.permutation(k, pool))(passes)
    out[t] = np.asarray(stream).reshape(-1)[:out.shape[1]]
  return out.reshape(num_classes, steps, batch).transpose(1, 0, 2)


def inversion_constants(config: ml_collections.ConfigDict) -> tuple:
  """The CTI section as `invert_additive`'s static `c`: (lr, init, repair_weight)."""
  return (config.lr, config.init, config.repair_weight)


@functools.partial(jax.jit, static_argnums=(0, 6))
def invert_additive(model, suspect, repaired, images, labels, batches: jax.Array, c: tuple,
                    key: jax.Array) -> jax.Array:
  """CTI's trigger inversion for every candidate target at once.

  Args:
    model: the classifier module.
    suspect: variables of f_P.
    repaired: variables of f_R.
    images: uint8[M, H, W, C] trusted images.
    labels: int32[M] their labels.
    batches: int32[steps, K, B] the rows of each step's batch per candidate (`class_batches`).
    c: (lr, init, repair_weight).
    key: PRNG key.

  Returns:
    deltas f32[K, H, W, C].
  """
  lr, init, repair_weight = c
  steps, num_classes = batches.shape[:2]
  tx = optax.adam(lr, b1=0.5, b2=0.9)
  k_init, k_loop = jax.random.split(key)
  deltas = jax.random.uniform(k_init, (num_classes, *images.shape[1:])) * init
  targets = jnp.arange(num_classes)

  def flip_batch(idx, k):
    x = data_lib.to_unit(images[idx])
    return jnp.where(jax.random.bernoulli(k), x[:, :, ::-1], x)

  def loss(delta, t, x, y):
    x = jnp.clip(x + delta, 0.0, 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels
    attack = ce(_logits(model, suspect, x), jnp.full_like(y, t)).mean()
    return attack + repair_weight * ce(_logits(model, repaired, x), y).mean()

  def step(carry, xs):
    deltas, opt_state = carry
    idx, k = xs
    x = jax.vmap(flip_batch)(idx, jax.random.split(k, num_classes))
    grads = jax.vmap(jax.grad(loss))(deltas, targets, x, labels[idx])
    updates, opt_state = tx.update(grads, opt_state, deltas)
    return (optax.apply_updates(deltas, updates), opt_state), None

  (deltas, _), _ = jax.lax.scan(step, (deltas, tx.init(deltas)),
                                (batches, jax.random.split(k_loop, steps)))
  return deltas


@functools.partial(jax.jit, static_argnums=0)
def trigger_success(model, variables, images, labels, deltas) -> jax.Array:
  """f32[K]: for each t, the fraction of images of classes != t that `clip(x + delta_t)` sends
  to t.  images: uint8[M, H, W, C]; labels: int32[M]; deltas: f32[K, H, W, C]. One class at a
  time (`lax.map`), so memory grows with M, not K * M."""

  def rate(t, delta):
    pred = jnp.argmax(_logits(model, variables, AdditiveTrigger(delta)(data_lib.to_unit(images))),
                      -1)
    keep = labels != t
    return jnp.sum((pred == t) & keep) / jnp.maximum(jnp.sum(keep), 1)

  return jax.lax.map(lambda td: rate(*td), (jnp.arange(deltas.shape[0]), deltas))


def calibrated_trigger_inversion(ctx: base.Context, variables: dict, trusted: base.Trusted,
                                 config: ml_collections.ConfigDict,
                                 repair: Callable[[dict, base.Trusted, jax.Array], dict],
                                 key: jax.Array) -> dict:
  """CTI: `{"suspicion": max_t s_t, "score": -max_t s_t, "target": argmax, "class_scores",
  "fit_size", "scored_size"}` (trusted images for repair and inversion / for s_t).

  `repair(variables, trusted, key) -> variables` makes f_R (the paper: Pivotal Tuning)."""
  k_split, k_repair, k_batches, k_invert = jax.random.split(key, 4)
  fit, scored = (base.holdout(trusted, config.score_fraction, k_split, "CTI's score_fraction")
                 if config.score_fraction else (trusted, trusted))
  repaired = repair(variables, fit, k_repair)
  batches = class_batches(k_batches, fit.labels, ctx.num_classes, config.steps, config.batch_size)
  deltas = invert_additive(ctx.model, variables, repaired, jnp.asarray(fit.images),
                           jnp.asarray(fit.labels), batches, inversion_constants(config),
                           k_invert)
  images, labels = jnp.asarray(scored.images), jnp.asarray(scored.labels)
  scores = (np.asarray(trigger_success(ctx.model, variables, images, labels, deltas))
            - np.asarray(trigger_success(ctx.model, repaired, images, labels, deltas)))
  best = int(np.argmax(scores))
  return {"suspicion": float(scores[best]), "score": -float(scores[best]), "target": best,
          "class_scores": scores.tolist(), "fit_size": len(fit.labels),
          "scored_size": len(scored.labels)}


def _squash(raw: jax.Array) -> jax.Array:
  """tanh parameterization of a value in [0, 1]."""
  return jnp.tanh(raw) / 2 + 0.5


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _nc_epoch(model, variables, images, state, num_classes: int, c: tuple, key: jax.Array):
  """One Neural Cleanse epoch for every class at once; returns the updated state.

  Args:
    model, variables: the suspect model.
    images: uint8[N, H, W, C] trusted images.
    state: per class (leading axis K): `raw` mask / pattern pre-images (see `nc_start`), their
      Adam state, `cost` f32[K], the counters `up`, `down` int32[K] (epochs in a row at / below
      the threshold) and `set` int32[K] (successful epochs in a row while the cost is 0),
      `best_reg` f32[K] (the kept epoch's mean mask L1), `best_norm` f32[K] (the kept mask's
      L1), `last_norm` f32[K]; for the early stop `raised`, `lowered` bool[K] (the cost moved
      since it was started), `stale` int32[K] (epochs without a smaller kept L1), `stopped`
      bool[K], `epochs` int32[K] (epochs run).
    num_classes: K.
    c: (batch, lr, threshold, patience, cost_up, cost_down, init_cost, early_stop_patience
      (0: never stop), early_stop_threshold).
    key: the epoch's shuffle key: one pass over the images in batches without replacement, the
      last batch completed from the start of the same shuffle (`epoch_indices`).
  """
  (batch, lr, threshold, patience, cost_up, cost_down, init_cost, stop_patience,
   stop_threshold) = c
  tx = optax.adam(lr, b1=0.5, b2=0.9)
  targets = jnp.arange(num_classes)

  def loss(raw, t, cost, x):
    mask, pattern = _squash(raw["mask"]), _squash(raw["pattern"])
    x = (1 - mask) * x + mask * pattern
    logits = _logits(model, variables, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full((x.shape[0],), t))
    reg = jnp.sum(jnp.abs(mask))
    return ce.mean() + cost * reg, (step_lib.batch_accuracy(logits, t), reg)

  def step(carry, idx):
    raw, opt_state = carry
    x = data_lib.to_unit(images[idx])
    grads, stats = jax.vmap(jax.grad(loss, has_aux=True), (0, 0, 0, None))(
        raw, targets, state["cost"], x)
    updates, opt_state = tx.update(grads, opt_state, raw)
    return (optax.apply_updates(raw, updates), opt_state), stats

  (raw, opt_state), (accs, regs) = jax.lax.scan(
      step, (state["raw"], state["opt_state"]),
      data_lib.pipeline.epoch_indices(key, images.shape[0], batch))
  acc, reg = accs.mean(0), regs.mean(0)
  norm = jnp.sum(jnp.abs(_squash(raw["mask"])), axis=(1, 2, 3))
  success = acc >= threshold
  better = success & (reg < state["best_reg"])
  best_reg = jnp.where(better, reg, state["best_reg"])
  # The reference's order: the kept mask, then the early stop (its smallest kept L1 so far is
  # the previous epoch's `best_reg`, which never grows), then the cost leaves 0 after `patience`
  # successes at 0, resetting the counters and flags; then the counters count this epoch and may
  # move the cost.
  stale = jnp.where(jnp.isfinite(best_reg),
                    jnp.where(best_reg >= stop_threshold * state["best_reg"],
                              state["stale"] + 1, 0), state["stale"])
  stop = (stop_patience > 0) & state["raised"] & state["lowered"] & (stale >= stop_patience)
  at_zero = (state["cost"] == 0) & success
  set_count = jnp.where(at_zero, state["set"] + 1, 0)
  start = at_zero & (set_count >= patience)
  cost = jnp.where(start, init_cost, state["cost"])
  up = jnp.where(success, jnp.where(start, 0, state["up"]) + 1, 0)
  down = jnp.where(success, 0, jnp.where(start, 0, state["down"]) + 1)
  cost = jnp.where(up >= patience, cost * cost_up, jnp.where(down >= patience, cost / cost_down,
                                                             cost))
  new = {"raw": raw, "opt_state": opt_state, "cost": cost, "set": set_count,
         "up": jnp.where(up >= patience, 0, up), "down": jnp.where(down >= patience, 0, down),
         "best_reg": best_reg, "best_norm": jnp.where(better, norm, state["best_norm"]),
         "last_norm": norm, "raised": ~start & state["raised"] | (up >= patience),
         "lowered": ~start & state["lowered"] | (down >= patience), "stale": stale,
         "stopped": stop, "epochs": state["epochs"] + 1}
  # A class that stopped at an earlier epoch keeps its state (the optimizer's shared step count
  # aside), as the reference leaves its loop.
  frozen = lambda old, now: now if jnp.ndim(now) == 0 else jnp.where(
      state["stopped"].reshape((-1,) + (1,) * (jnp.ndim(now) - 1)), old, now)
  return jax.tree.map(frozen, state, new)


def anomaly_index(norms: np.ndarray) -> float:
  """NC's anomaly index of the smallest of the f[K] mask norms: (median - min) / (1.4826 * MAD),
  >= 0."""
  norms = np.asarray(norms, np.float64)
  median = np.median(norms)
  mad = 1.4826 * np.median(np.abs(norms - median))
  return float(max(median - norms.min(), 0.0) / max(mad, 1e-12))


def nc_start(key: jax.Array, num_classes: int, shape: tuple) -> dict:
  """NC's random start, as tanh pre-images: `{"mask": f32[K, H, W, 1], "pattern": f32[K, H, W,
  C]}` with `_squash(raw)` uniform in [0, 1].  shape: (H, W, C)."""
  k_mask, k_pattern = jax.random.split(key)
  to_raw = lambda u: jnp.arctanh((u - 0.5) * (2 - 1e-6))
  return {"mask": to_raw(jax.random.uniform(k_mask, (num_classes, *shape[:2], 1))),
          "pattern": to_raw(jax.random.uniform(k_pattern, (num_classes, *shape)))}


def neural_cleanse(ctx: base.Context, variables: dict, trusted: base.Trusted,
                   config: ml_collections.ConfigDict, key: jax.Array) -> dict:
  """NC: `{"suspicion": -min_norm or anomaly_index (`config.score`), "score": min_norm (the
  reference's: low = suspicious), "min_norm", "anomaly_index", "target": argmin norm, "norms":
  f[K] the kept masks' L1 norms, "found": bool[K] which classes reached the threshold, "epochs":
  int[K] the epochs each class ran before its early stop}`."""
  k = ctx.num_classes
  k_init, k_loop = jax.random.split(key)
  raw = nc_start(k_init, k, trusted.images.shape[1:])
  tx = optax.adam(config.lr, b1=0.5, b2=0.9)
  zeros, no = jnp.zeros((k,), jnp.int32), jnp.zeros((k,), bool)
  # Strongly typed, as `_nc_epoch` returns them, so that its second epoch does not compile again.
  inf = jnp.full((k,), jnp.inf, jnp.float32)
  state = {"raw": raw, "opt_state": tx.init(raw),
           "cost": jnp.full((k,), 0.0 if config.reset_cost_to_zero else config.init_cost,
                            jnp.float32),
           "up": zeros, "down": zeros, "set": zeros, "best_reg": inf, "best_norm": inf,
           "last_norm": inf, "raised": no, "lowered": no, "stale": zeros,
           "stopped": no, "epochs": zeros}
  c = (config.batch_size, config.lr, config.threshold, config.patience, config.cost_up,
       config.cost_down, config.init_cost,
       config.early_stop_patience if config.early_stop else 0, config.early_stop_threshold)
  images = jnp.asarray(trusted.images)
  for epoch in range(config.epochs):
    state = _nc_epoch(ctx.model, variables, images, state, k, c, jax.random.fold_in(k_loop, epoch))
    if config.early_stop and bool(state["stopped"].all()):
      break
  best, last = np.asarray(state["best_norm"]), np.asarray(state["last_norm"])
  norms = np.where(np.isfinite(best), best, last)  # a class never reaching the threshold
  minimum, index = float(norms.min()), anomaly_index(norms)
  return {"suspicion": index if config.score == "anomaly_index" else -minimum, "score": minimum,
          "min_norm": minimum, "anomaly_index": index, "target": int(np.argmin(norms)),
          "norms": norms.tolist(), "found": np.isfinite(best).tolist(),
          "epochs": np.asarray(state["epochs"]).tolist()}


SCORERS = ("cti", "nc")
NC_SCORES = ("min_norm", "anomaly_index")
