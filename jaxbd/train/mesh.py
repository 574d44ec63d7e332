"""Device meshes and shardings: `jax.jit` + `NamedSharding`, no `pmap`.

The mesh has two axes, `data` and `expert`. Batches are split over both (every device takes a
slice of the batch); parameters are replicated, except MoE expert parameters, which are sharded
over `expert` (`state_sharding`): MoE models keep them stacked on a leading expert axis in
submodules named `experts`, and every leaf under such a key (parameters, BatchNorm statistics,
optimizer moments) is split on that axis. With one process this covers all local devices; with
`jax.distributed.initialize()` (multi-host) the same code spans every host's devices.

`Throttle` bounds how many multi-device programs a loop leaves queued (see its docstring).
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxbd.errors import ConfigError

AXES = ("data", "expert")


def make_mesh(data: int = -1, expert: int = 1, devices=None) -> Mesh:
  """A (data, expert) mesh over `devices` (default: all devices of all processes).

  Args:
    data: devices on the data axis; -1: `len(devices) // expert`.
    expert: devices on the expert axis.
    devices: the devices to use (default: all); a mesh smaller than this uses the first
      `data * expert` of them.

  Raises:
    ConfigError: the mesh needs more devices than there are.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if data == -1:
    data = n // expert
  if data * expert > n or data < 1:
    raise ConfigError(f"mesh data={data} x expert={expert} needs more than the {n} available "
                      "devices")
  # Auto axes: shardings propagate through jit (GSPMD), constrained where the code says so.
  return jax.make_mesh((data, expert), AXES, devices=devices[:data * expert],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many parts `batch_sharding` cuts a batch into: every device of the mesh."""
  return int(mesh.devices.size)


def check_batch(batch_size: int, mesh: Mesh, name: str = "train.batch_size") -> None:
  """Raises ConfigError unless the batch splits evenly over the mesh's devices."""
  n = batch_shards(mesh)
  if batch_size % n:
    raise ConfigError(f"{name}={batch_size} is not divisible by the {n} devices of the mesh")


def _put(x, sharding: NamedSharding) -> jax.Array:
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):  # typed keys
    return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put(tree, sharding: NamedSharding):
  """Places a pytree of host or device arrays (each process's own, with the same values in every
  process) with `sharding`, also across processes."""
  return jax.tree.map(lambda x: _put(x, sharding), tree)


def put_replicated(tree, mesh: Mesh):
  """Places a pytree of host or device arrays on every device of the mesh (also multi-host)."""
  return put(tree, replicated(mesh))


EXPERTS_KEY = "experts"


def state_sharding(tree, mesh: Mesh):
  """Shardings of a train state or variables: expert-stacked leaves split over `expert`.

  A leaf under a dict key named `experts` whose leading axis is divisible by the mesh's `expert`
  size is split on that axis; every other leaf is replicated.
  """
  experts = mesh.shape["expert"]

  def sharding(path, x):
    under_experts = any(getattr(k, "key", None) == EXPERTS_KEY for k in path)
    shape = np.shape(x)
    if experts > 1 and under_experts and shape and shape[0] % experts == 0:
      return NamedSharding(mesh, P("expert"))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, tree)


def put_state(tree, mesh: Mesh):
  """Places a train state or variables on the mesh with `state_sharding`."""
  return jax.tree.map(_put, tree, state_sharding(tree, mesh))


class Throttle:
  """Keeps at most `depth` dispatched computations queued behind the one that runs.

  Call it with each output of a loop of jitted calls; once more than `depth` are pending it
  waits for the oldest. XLA's CPU runtime (jaxlib 0.10) deadlocks when unbounded asynchronous
  dispatch queues several programs with collectives over more than one device: one device waits
  in an all-reduce for a peer whose launch is blocked behind the next program, and after
  `--xla_cpu_collective_call_terminate_timeout_seconds` the process aborts. Two fake CPU devices
  and a data-parallel step reproduce it within a few hundred steps (tests/test_train.py). With
  one step queued the device is still never idle as long as dispatching a step takes less time
  than running it.
  """

  def __init__(self, depth: int = 1):
    self._depth = depth
    self._pending: collections.deque = collections.deque()

  def __call__(self, tree: Any) -> Any:
    """Records `tree` (any pytree of arrays) as pending and returns it unchanged."""
    self._pending.append(tree)
    if len(self._pending) > self._depth:
      jax.block_until_ready(self._pending.popleft())
    return tree
