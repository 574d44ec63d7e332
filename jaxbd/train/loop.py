"""The training loop: epochs of jitted steps, progress, JSON-lines metrics, checkpoints, resume.

`fit` runs one named phase (e.g. "clean", "backdoored", "d3"). With a workdir it checkpoints every
`checkpoint_every` epochs into `WORKDIR/checkpoints/<phase>`, and a rerun restores the latest
checkpoint and continues; a finished phase restores its final state and returns at once. Train
metrics are fetched from the device only every `log_every` steps; in between the loop keeps one
step queued behind the running one (`jaxbd.train.mesh.Throttle`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm

from jaxbd import fileio, host
from jaxbd.config import MAX_STEPS
from jaxbd.data.pipeline import epoch_indices
from jaxbd.errors import CheckpointError, ConfigError, DivergedError
from jaxbd.train.checkpoint import Checkpointer
from jaxbd.train.mesh import Throttle


def check_steps(what: str, epochs: int, size: int, batch_size: int) -> None:
  """Raises ConfigError (naming `what`) when `epochs` epochs over `size` examples in batches of
  `batch_size` are more steps than `MAX_STEPS`."""
  per_epoch = -(-size // batch_size)
  if epochs * per_epoch > MAX_STEPS:
    raise ConfigError(f"{what}: {epochs} epochs of {per_epoch} steps ({size} examples, batch "
                      f"{batch_size}) are {epochs * per_epoch} steps, more than a step count "
                      f"holds ({MAX_STEPS})")


@functools.partial(jax.jit, static_argnames=("size", "batch_size"))
def epoch_permutation(key: jax.Array, epoch: int, *, size: int, batch_size: int) -> jax.Array:
  """The rows of `epoch` as int32[steps, batch_size] (`epoch_indices` of `fold_in(key, epoch)`);
  a stacked key [P] (a population) gives each model its own, int32[P, steps, batch_size].
  Jitted once per shape for every phase, not once per `fit`."""
  perm = lambda k: epoch_indices(jax.random.fold_in(k, epoch), size, batch_size)
  return jax.vmap(perm)(key) if key.ndim else perm(key)


class StepCache:
  """The jitted train steps of a run, kept by the program they compile to.

  `jax.jit` keeps its compilations per Python function, and every phase builds its step function
  anew, so a phase that runs the same program again compiles it again: the repair of each member
  of a detection population, each member of a looped population. A `fit` given a cache runs the
  step of an earlier phase whose program is the same instead of its own: the same lowered program
  text, the same values of the arrays the step function closes over, and inputs with the same
  shardings. It saves the compilation, not the tracing (each phase traces its step once).
  """

  def __init__(self):
    self._steps: dict = {}

  def __len__(self) -> int:
    return len(self._steps)

  def step(self, jit_step, *args):
    """The step of an earlier phase with `jit_step`'s program for `args`, else `jit_step`."""
    traced = jit_step.trace(*args)
    digest = hashlib.sha256(traced.lower().as_text().encode())
    for const in traced.jaxpr.consts:
      digest.update(f"{const.shape} {const.dtype}".encode())
      if not getattr(const, "is_fully_addressable", True):
        # Spread over processes, so not readable here: the array itself must be the same (its id
        # stays unique while the cache keeps the step that closes over it).
        digest.update(f"array {id(const)}".encode())
        continue
      if jax.dtypes.issubdtype(const.dtype, jax.dtypes.prng_key):
        const = jax.random.key_data(const)
      digest.update(np.asarray(const).tobytes())
    key = (digest.hexdigest(), *(getattr(x, "sharding", None) for x in jax.tree.leaves(args)))
    return self._steps.setdefault(key, jit_step)


class MetricsLog:
  """Appends JSON lines `{"phase": ..., "epoch": ..., ...}` to `WORKDIR/metrics.jsonl`.

  In a multi-host run only process 0 writes.
  """

  def __init__(self, workdir: Optional[str]):
    self.path = os.path.join(workdir, "metrics.jsonl") if workdir and host.is_writer() else None

  def write(self, **record: Any) -> None:
    """Appends one record to the metrics file."""
    if self.path is None:
      return
    with open(self.path, "a") as f:
      f.write(fileio.dumps(record) + "\n")

  def truncate(self, phase: str, epoch: int) -> None:
    """Drops records of `phase` after `epoch` (left by a run killed after its last checkpoint, or
    before its first when `epoch` is 0), a last line cut short by a kill mid-write, and any line
    that is not a record (a JSON object; of `phase`, with a numeric epoch)."""
    if self.path is None or not os.path.exists(self.path):
      return
    keep = []
    with open(self.path, errors="replace") as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue
        if not isinstance(rec, dict):
          continue
        at = rec.get("epoch", 0)
        numeric = isinstance(at, (int, float)) and not isinstance(at, bool)
        if rec.get("phase") != phase or (numeric and at <= epoch):
          keep.append(line)
    with fileio.atomic_file(self.path) as f:
      f.writelines(keep)


def _host(metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_finite(phase: str, epoch: int, step: int, metrics: dict) -> None:
  """Raises DivergedError if the logged train loss is not finite (NaN or inf: every later step
  and metric would be meaningless, e.g. NaN logits send every image to class 0)."""
  loss = metrics.get("loss", 0.0)
  if not math.isfinite(loss):
    raise DivergedError(f"training phase {phase!r} diverged: its loss is {loss} at epoch {epoch}, "
                        f"step {step}; lower its learning rate")


def epoch_line(phase: str, epoch: int, epochs: int, metrics: dict, seconds: float) -> str:
  """The progress line of an epoch: the last train metrics, any evaluation, elapsed seconds."""
  shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
  return f"{phase} epoch {epoch}/{epochs}: {shown} ({seconds:.0f} s)"


def fit(phase: str, state: dict, step_fn: Callable, arrays: Any, *, epochs: int, batch_size: int,
        key: jax.Array, workdir: Optional[str] = None, context: Any = None,
        eval_fn: Optional[Callable[[dict], dict]] = None, eval_every: int = 1,
        checkpoint_every: int = 1, log_every: int = 50, progress: bool = True,
        max_steps: Optional[int] = None, step_cache: Optional[StepCache] = None,
        origin: Optional[str] = None) -> tuple[dict, dict]:
  """Trains `state` for `epochs` epochs over `arrays` (the last one cut at `max_steps`).

  Args:
    phase: name of this training phase (checkpoint folder, metrics records).
    state: initial train state (see jaxbd.train.step); replaced by a checkpoint if one exists.
    step_fn: an un-jitted `step(state, arrays, perm, i, key, context)`; jitted here with the
      state donated.
    arrays: the training set on device (`arrays.size` examples).
    epochs: total epochs of the phase.
    batch_size: examples per step.
    key: PRNG key of the phase (epoch permutations and per-step keys derive from it; a typed
      `jax.random.key` or a raw `jax.random.PRNGKey`); a stack of keys [M] trains a population
      of M models (see `jaxbd.experiments.population`): each model gets its own permutations
      (perm int32[M, steps, B]) and step keys, the ones its own key would give it alone.
    workdir: run directory for checkpoints and metrics.jsonl (None: neither).
    context: extra pytree passed to every step (see jaxbd.train.step).
    eval_fn: `state -> {name: float}` run every `eval_every` epochs and after the last.
    eval_every: epochs between evaluations (0: only after the last).
    checkpoint_every: epochs between checkpoints (0: only after the last).
    log_every: steps between train-metric records.
    progress: on stderr, a progress bar (on a terminal) and a line (`epoch_line`) after every
      evaluation, the last epoch and every `epochs // 10`-th.
    max_steps: stop after this many steps in all (None: whole epochs), for defenses that count
      steps (Pivotal Tuning); `epochs` must cover them.
    step_cache: a `StepCache` whose step runs in place of `step_fn` where it compiles to the same
      program (None: `step_fn` is compiled).
    origin: a name of what the phase starts from (`checkpoint.fingerprint` of the model a
      defense tunes), saved with every checkpoint; a checkpoint saved with another is refused.

  Returns:
    (final state, summary) where summary has epochs, steps, seconds (training time of the
    phase, summed over the runs that resumed it: the checkpoints carry it), images_per_second
    (steps * batch_size / seconds) and the last evaluation.

  Raises:
    CheckpointError: an existing checkpoint is unreadable, from a longer run, or from a phase
      that started from another `origin`.
    ConfigError: more steps than `MAX_STEPS`.
    DivergedError: the train loss became NaN or inf (checked where it is logged).
  """
  check_steps(f"training phase {phase!r}", epochs, arrays.size, batch_size)
  log = MetricsLog(workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", phase)) if workdir else None
  start, earlier = 0, 0.0  # earlier: training seconds of the runs this one resumes
  if ckpt is not None and (latest := ckpt.latest_epoch()) is not None:
    if latest > epochs:
      raise CheckpointError(f"checkpoint of phase {phase!r} has {latest} epochs but the config "
                            f"asks for {epochs}; use a new --workdir")
    info = ckpt.info(latest)
    if origin is not None and info.get("origin", origin) != origin:
      raise CheckpointError(f"checkpoint {ckpt.directory}/{latest} started from another model "
                            "than this run's (the model it tunes changed since); delete "
                            f"{ckpt.directory} or use a new --workdir")
    state = ckpt.restore(latest, state)
    start, earlier = latest, float(info.get("seconds", 0.0))
  log.truncate(phase, start)
  steps = -(-arrays.size // batch_size)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32[..., 2] key (`jax.random.PRNGKey`)
  population = key.ndim > 0  # one key per model of a stacked population: per-model epochs
  keys = (jax.vmap(jax.random.split) if population else jax.random.split)(key)
  perm_key, step_key = keys[..., 0], keys[..., 1]
  jit_step = jax.jit(step_fn, donate_argnums=(0,))
  total = epochs * steps if max_steps is None else min(max_steps, epochs * steps)
  summary = {"epochs": epochs, "steps": total, "resumed_from_epoch": start}
  last_eval: dict = {}
  t0 = time.perf_counter()
  throttle = Throttle()
  for epoch in range(start, epochs):
    perm = epoch_permutation(perm_key, epoch, size=arrays.size, batch_size=batch_size)
    epoch_steps = min(steps, total - epoch * steps)
    bar = tqdm.tqdm(total=epoch_steps, desc=f"{phase} {epoch + 1}/{epochs}", leave=False,
                    disable=None if progress and host.is_writer() else True,  # None: a terminal
                    file=sys.stderr, dynamic_ncols=True)
    if step_cache is not None and epoch == start:
      jit_step = step_cache.step(jit_step, state, arrays, perm, 0, step_key, context)
    for i in range(epoch_steps):
      state, metrics = jit_step(state, arrays, perm, i, step_key, context)
      throttle(metrics)  # not the state: the next step consumes (donates) it
      bar.update(1)
      if (i + 1) % log_every == 0 or i + 1 == epoch_steps:
        m = _host(metrics)
        check_finite(phase, epoch + 1, epoch * steps + i + 1, m)
        bar.set_postfix({k: f"{v:.3f}" for k, v in m.items()})
        log.write(phase=phase, epoch=epoch + 1, step=epoch * steps + i + 1, **m)
    bar.close()
    last = epoch + 1 == epochs
    evaluated = {}
    if eval_fn is not None and (last or (eval_every and (epoch + 1) % eval_every == 0)):
      last_eval = evaluated = eval_fn(state)
      log.write(phase=phase, epoch=epoch + 1, step=epoch * steps + epoch_steps, **last_eval)
    if progress and (evaluated or last or (epoch + 1) % max(1, epochs // 10) == 0):
      # about ten lines per phase, also where the bar is off (output to a file)
      host.say(epoch_line(phase, epoch + 1, epochs, {**m, **evaluated},
                          time.perf_counter() - t0), err=True)
    if ckpt is not None and (last or (checkpoint_every and (epoch + 1) % checkpoint_every == 0)):
      ckpt.save(epoch + 1, state, seconds=earlier + time.perf_counter() - t0,
                **({} if origin is None else {"origin": origin}))
  jax.block_until_ready(state)
  seconds = earlier + time.perf_counter() - t0
  if ckpt is not None:
    ckpt.close()
  if eval_fn is not None and not last_eval:
    last_eval = eval_fn(state)
  summary.update(seconds=seconds, eval=last_eval,
                 images_per_second=total * batch_size / seconds if seconds else 0.0)
  return state, summary
