"""Training a population of M models of one architecture at once, under `jax.vmap`.

Many small models (the detection experiment's clean and backdoored members, the seeds of a sweep
cell) differ only in their initialization, labels, poisoned rows and trigger. Their train states
are stacked on a leading model axis and one jitted step runs `jax.vmap` over it; every member
keeps its own PRNG streams (`jaxbd.train.fit` with a stack of keys gives each member the epoch
permutations and step keys its key alone would give), so a vmapped member trains like the same
member trained alone, up to floating-point reassociation in the batched kernels.
`train_group(..., vmapped=False)` trains the members one after another instead, each as
`jaxbd.experiments.common.train_classifier` trains a run's model (data-parallel on the run's
mesh).

On a host with several devices a vmapped population is split over them (`member_mesh`: the
largest device count that divides M): each device runs the vmapped step on its own members
under `jax.shard_map`, with no communication but the logged means, and trains what one device
would (the same parameters in tests/test_population.py). A multi-host run splits it over every
process's devices, gcd(M, devices) ways, each part repeated on the other devices
(tests/test_multihost.py). With 2 CPU devices on 2 cores
(scripts/bench_population.py, 4 CNNs of width 16, batch 64, 2026-12-06) this took the vmapped
step from 670 to 1,031 images/s; the loop, data-parallel on the same 2 devices, ran 2,706 (1,636
when it trained each member on one device).

A member whose training diverges (its loss NaN or inf) does not stop the others: the members
share no arithmetic, a vmapped step logs the means over the members whose loss is finite (and
`diverged`, how many are not), and `train_group` returns None in place of a diverged member's
state, with the reason in its summary. Only a population whose every member diverges stops as one
run does (`jaxbd.errors.DivergedError`).

Whether vmap pays off depends on the backend and the length of the run. A vmapped step compiles
once for the whole population where a sweep compiles each cell's step anew, but XLA's CPU backend
runs the batched convolutions 2-3x slower per image (scripts/bench_population.py: 4 CNNs of width 8,
529 vs 1,523 images/s; 8 of width 16, 185 vs 424 images/s, 2 CPU cores). So on CPU short runs
gain and long runs lose; end to end (scripts/bench_sweep_seeds.py, 4 seeds, 2 CPU cores):
configs/quickstart.py (30 epochs on 8x8 digits) 60 s vmapped vs 73 s looped; configs/cifar10.py:cpu
at 2 epochs on 2,000 images 103 s vs 143 s; but the same recipe at its 10 epochs on 5,000 images
took 671 s looped, while the vmapped population had run 812 s and reached epoch 8 of 10 when it
was stopped. Accelerators were not measured here.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from jaxbd import data as data_lib
from jaxbd import host
from jaxbd import poison
from jaxbd import train as train_lib
from jaxbd.errors import DivergedError
from jaxbd.experiments import common

try:
  from jax import shard_map
except ImportError:  # jax < 0.7
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top

MEMBERS = "members"  # the mesh axis a vmapped population's members are split over
REPLICAS = "replicas"  # the mesh axis over which each part of them is repeated (multi-host)


@flax.struct.dataclass
class Population:
  """Training data of M models sharing one image array.

  Attributes:
    images: uint8[N, H, W, C].
    labels: int32[M, N] each member's (relabeled) training labels.
    kind: int8[M, N] each member's poisoning roles.
    triggers: the members' triggers stacked on a leading axis.
    row_keys: M keys of the members' per-row trigger draws (`jaxbd.poison.poison_fn`).
  """

  images: jax.Array
  labels: jax.Array
  kind: jax.Array
  triggers: object
  row_keys: jax.Array

  @property
  def size(self) -> int:
    """N, the number of training examples each member trains on (what `train.fit` batches)."""
    return self.images.shape[0]

  def split(self, mesh: Optional[jax.sharding.Mesh]) -> "Population":
    """The population on a `member_mesh` (unchanged without one): the per-member arrays split
    over it on their leading axis, the images replicated."""
    if mesh is None:
      return self
    labels, kind, triggers, row_keys = split_members(
        (self.labels, self.kind, self.triggers, self.row_keys), mesh)
    return Population(train_lib.put_replicated(self.images, mesh), labels, kind, triggers,
                      row_keys)


def split_members(tree, mesh: Optional[jax.sharding.Mesh]):
  """The arrays of `tree`, stacked over members, split over a `member_mesh` on their leading
  axis (unchanged without one)."""
  return tree if mesh is None else train_lib.put(tree, NamedSharding(mesh, P(MEMBERS)))


def gather_members(tree, mesh: Optional[jax.sharding.Mesh]):
  """`split_members` undone: every member's arrays on every device of the mesh, so that each
  process can read each member (unchanged without a mesh)."""
  if mesh is None:
    return tree
  return jax.jit(lambda t: t, out_shardings=train_lib.replicated(mesh))(tree)


def member_mesh(count: int, devices=None) -> Optional[jax.sharding.Mesh]:
  """The (MEMBERS, REPLICAS) mesh over which a vmapped population of `count` members is split.

  One process: the largest number d of `devices` (default: this host's) that divides `count`,
  so every device trains as many members, as a (d, 1) mesh over the first d (None where d is 1).
  Several processes: every process must hold a part of each array, so all of `devices` (the
  run's, of every process) form a (d, n / d) mesh, d = gcd(count, n): the members split d ways,
  each part repeated on n / d devices (choose `count` a multiple of the device count).
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if jax.process_count() > 1:
    size = math.gcd(count, len(devices))
  else:
    size = max(d for d in range(1, len(devices) + 1) if count % d == 0)
    if size == 1:
      return None
    devices = devices[:size]
  return jax.sharding.Mesh(np.array(devices).reshape(size, -1), (MEMBERS, REPLICAS))


def split_shape(split: Optional[jax.sharding.Mesh]) -> tuple[int, int]:
  """(ways, copies) of a `member_mesh`: the members split `ways` ways, each part on `copies`
  devices ((1, 1) without a mesh)."""
  return (1, 1) if split is None else tuple(split.devices.shape)


def split_note(count: int, split: Optional[jax.sharding.Mesh], devices: int) -> Optional[str]:
  """The progress line on a `member_mesh` of `count` members that leaves some of the run's
  `devices` idle or computing copies of others' members (None where each trains its own)."""
  ways, copies = split_shape(split)
  if ways == devices:
    return None
  idle = devices - ways * copies
  waste = ([f"{idle} of the {devices} devices idle"] if idle else []) + (
      [f"each part computed on {copies} devices"] if copies > 1 else [])
  return (f"population of {count} members split {ways} way(s) over {devices} devices: "
          f"{'; '.join(waste)}; a multiple of {devices} members gives each device its own")


def population_step(model, tx, data_config, mesh: Optional[jax.sharding.Mesh] = None):
  """The train step of a stacked population: `jax.vmap` of one member's step over the members.

  `perm` is int32[M, steps, B] and `key` a stack of M keys (one per member, as `jaxbd.train.fit`
  makes them from a stack of keys); the metrics are `finite_means` over members. With a
  `member_mesh`, each of its devices runs the vmapped step on its own members (`jax.shard_map`:
  no communication but the metrics' means); the state and the population's per-member arrays
  are split over it on their leading axis, the images replicated.
  """

  def member(state, images, labels, kind, trigger, row_key, perm, i, key):
    batch_fn = functools.partial(data_lib.gather_batch,
                                 poison_fn=poison.poison_fn(trigger, row_key),
                                 crop_padding=data_config.crop_padding, flip=data_config.flip)
    step = train_lib.make_train_step(train_lib.classification_loss(model), tx, batch_fn)
    return step(state, data_lib.TrainArrays(images, labels, kind), perm, i, key)

  def stacked(state, arrays: Population, perm, i, key):
    return jax.vmap(member, in_axes=(0, None, 0, 0, 0, 0, 0, None, 0))(
        state, arrays.images, arrays.labels, arrays.kind, arrays.triggers, arrays.row_keys, perm,
        i, key)

  if mesh is not None:
    split, specs = P(MEMBERS), Population(P(), *[P(MEMBERS)] * 4)
    stacked = shard_map(stacked, mesh=mesh, in_specs=(split, specs, split, P(), split),
                        out_specs=(split, split))

  def step(state, arrays: Population, perm, i, key, context=None):
    del context
    state, m = stacked(state, arrays, perm, i, key)
    return state, finite_means(m)

  return step


def finite_means(metrics: dict) -> dict:
  """The means of per-member metrics f32[M] over the members whose loss is finite, and
  `diverged`, the count of the others; every mean is NaN when no member's loss is finite (so
  that `jaxbd.train.fit` stops the phase)."""
  finite = jnp.isfinite(metrics["loss"])
  count = jnp.sum(finite)
  means = {k: jnp.where(count > 0, jnp.sum(jnp.where(finite, v, 0.0)) / jnp.maximum(count, 1),
                        jnp.nan) for k, v in metrics.items()}
  return {**means, "diverged": (finite.size - count).astype(jnp.float32)}


@jax.jit
def finite_members(state) -> jax.Array:
  """bool[M]: whether every floating-point array of each member of a stacked train state is
  finite (one program, one transfer)."""
  per_leaf = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
              for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(per_leaf), axis=0)


def train_group(model, images: np.ndarray, members: list[dict], *, phase: str, train_config,
                data_config, log_config, vmapped: bool, workdir: Optional[str] = None,
                mesh: Optional[jax.sharding.Mesh] = None) -> tuple[list[dict], dict]:
  """Trains the members of one group from scratch.

  Args:
    model: the architecture every member shares.
    images: uint8[N, H, W, C] the shared training images.
    members: dicts with `key` (the member's phase key: its initialization and training streams
      split from it as in `jaxbd.experiments.common.train_classifier`), `labels` int[N], `kind`
      int8[N] and `trigger` (the same pytree structure for every member).
    phase: phase name (checkpoints under `workdir/checkpoints/<phase>`; `<phase>_<j>` per member
      when not vmapped).
    train_config: the `train` section.
    data_config: the `data` section (augmentation).
    log_config: the `log` section.
    vmapped: one vmapped step over the stacked members (`population_step`), or a loop that
      trains each member as `train_classifier` trains a run's model, data-parallel on `mesh`.
    workdir: checkpoints and metrics.jsonl (None: neither).
    mesh: the run's mesh (default: one device): a vmapped population is split over its devices
      (`member_mesh`), and the returned states are placed on it (`jaxbd.train.put_state`; a
      state restored from a population's checkpoint sits on one device, where the evaluator of
      a mesh cannot use it).

  Returns:
    (the members' final train states in order, None for a member whose training diverged,
    `jaxbd.train.fit`'s summary with `seconds` and `images_per_second` over the whole group and
    `diverged`, {member position: reason} for those members).

  Raises:
    DivergedError: every member diverged.
  """
  mesh = mesh if mesh is not None else train_lib.make_mesh(1)
  fit = functools.partial(train_lib.fit, epochs=train_config.epochs,
                          batch_size=train_config.batch_size, workdir=workdir,
                          log_every=log_config.every_steps, progress=log_config.progress,
                          eval_every=0, checkpoint_every=train_config.checkpoint_every)
  train = _train_stacked if vmapped else _train_looped
  out, diverged, summary = train(model, images, members, phase, train_config, data_config, mesh,
                                 fit)
  if len(diverged) == len(members):
    raise DivergedError(diverged[0] if len(members) == 1 else
                        f"every member of {phase!r} diverged; the first: {diverged[0]}")
  summary["diverged"] = diverged
  states = [None if j in diverged else train_lib.put_state(s, mesh) for j, s in enumerate(out)]
  return states, summary


def _train_stacked(model, images, members, phase, tc, data_config, mesh, fit):
  """`train_group`'s vmapped population: (member states, {position: reason} of the diverged
  ones, summary)."""
  tx = train_lib.make_optimizer(tc, -(-len(images) // tc.batch_size))
  split = member_mesh(len(members), mesh.devices.flat)
  note = split_note(len(members), split, mesh.devices.size)
  if note:
    host.say(note, err=True)
  stack = lambda xs: split_members(jax.tree.map(lambda *a: jnp.stack(a), *xs), split)
  init_keys, train_keys = zip(*(jax.random.split(m["key"]) for m in members))
  # Initialized one by one as `supervised_setup` does (same values), then stacked.
  state = stack([train_lib.create_state(train_lib.init_variables(model, k, images.shape[1:]), tx)
                 for k in init_keys])
  population = Population(jnp.asarray(images), np.stack([m["labels"] for m in members]),
                          np.stack([m["kind"] for m in members]),
                          jax.tree.map(lambda *a: np.stack(a), *[m["trigger"] for m in members]),
                          jnp.stack([poison.row_key(m["key"]) for m in members]))
  state, summary = fit(phase, state, population_step(model, tx, data_config, split),
                       population.split(split), key=stack(train_keys))
  summary["images_per_second"] *= len(members)
  summary["member_split"] = list(split_shape(split))
  state = gather_members(state, split)
  out = [jax.tree.map(lambda x, j=j: x[j], state) for j in range(len(members))]
  diverged = {int(j): f"training phase {phase!r} diverged for member {j + 1} of {len(members)} "
              "(its parameters are NaN or inf); lower its learning rate"
              for j in np.flatnonzero(~np.asarray(finite_members(state)))}
  return out, diverged, summary


def _train_looped(model, images, members, phase, tc, data_config, mesh, fit):
  """`train_group`'s loop: each member trained as `train_classifier` trains a run's model (the
  same setup, poisoning and keys), data-parallel on `mesh`: (member states, {position: reason}
  of the diverged ones, summary over the members). Members whose steps compile to the same
  program (the same trigger, or none) compile it once."""
  out, runs, diverged, cache = [], [], {}, train_lib.StepCache()
  for j, m in enumerate(members):
    setup, train_key = common.classifier_setup(
        model, images, m["labels"], tc, data_config, mesh, m["key"],
        kind=m["kind"] if np.any(m["kind"]) else None, trigger=m["trigger"])
    try:
      state, run = fit(f"{phase}_{j}", setup.state, setup.step, setup.arrays, key=train_key,
                       step_cache=cache)
      runs.append(run)
    except DivergedError as e:
      state, diverged[j] = None, str(e)
    out.append(state)
  seconds = sum(run["seconds"] for run in runs)
  seen = sum(run["images_per_second"] * run["seconds"] for run in runs)
  return out, diverged, dict(runs[-1] if runs else {}, seconds=seconds,
                             images_per_second=seen / seconds if seconds else 0.0)
