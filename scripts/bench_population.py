r"""Training a population of small models: one vmapped step over M models vs a loop over them.

  python scripts/bench_population.py                      # 8 CNNs (width 8), batch 64
  python scripts/bench_population.py --models=4 --width=16 --steps=20

Data: CIFAR-10-shaped random uint8 images; every member gets its own BadNets plan (10%) and init.
`vmap`: the stacked train states go through one jitted step that runs `jax.vmap` over the model
axis (jaxbd.experiments.population.population_step) on one device; `vmap_split` (with several
devices): the same step with the members split over `member_mesh(M)`, as populations train;
`loop`: each member's own step (`supervised_setup`, data-parallel over all devices, as a looped
population trains), called for each member in turn.
Reports images/s summed over members, compile excluded. Several CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/bench_population.py
"""

from __future__ import annotations

import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jaxbd import benchmark
from jaxbd import config as config_lib
from jaxbd import models, poison
from jaxbd import train as train_lib
from jaxbd.experiments import population as population_lib

_NUM_TRAIN = 2048  # random training images every member trains on

_MODELS = flags.DEFINE_integer("models", 8, "Population size M.", lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", 8, "CNN width.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size per model.", lower_bound=1,
                              upper_bound=_NUM_TRAIN)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
benchmark.require_writable(_OUT)


def main():
  """Measures the vmapped and the looped population step and prints both."""
  c = config_lib.defaults()
  c.model.cnn.width = _WIDTH.value
  config_lib.validate(c)
  m, n, b = _MODELS.value, _NUM_TRAIN, _BATCH.value
  ds = benchmark.random_dataset(n)
  x, y = ds.x_train, ds.y_train
  model = models.create(c, 10, (0.5,) * 3, (0.25,) * 3)
  tx = train_lib.make_optimizer(c.train, n // b)
  trigger = poison.make_trigger(c, (32, 32, 3))
  plans = [poison.make_plan(y, 10, rate=0.1, target=0, seed=s) for s in range(m)]
  keys = jax.random.split(jax.random.key(0), m)
  population = population_lib.Population(
      jnp.asarray(x), jnp.asarray(np.stack([p.labels for p in plans])),
      jnp.asarray(np.stack([p.kind for p in plans])),
      jax.tree.map(lambda a: jnp.stack([a] * m), trigger),
      jnp.stack([poison.row_key(k) for k in keys]))
  init = jax.jit(lambda k: train_lib.create_state(
      train_lib.init_variables(model, k, (32, 32, 3)), tx))  # one program, not op by op
  perm = jnp.arange(n // b * b, dtype=jnp.int32).reshape(-1, b)
  out = {"models": m, "width": _WIDTH.value, "batch_size": b}

  perms = jnp.stack([perm] * m)
  mesh = population_lib.member_mesh(m)
  for name, split in (("vmap", None), ("vmap_split", mesh)):
    if name == "vmap_split" and mesh is None:
      continue
    step = jax.jit(population_lib.population_step(model, tx, c.data, mesh=split),
                   donate_argnums=(0,))
    on = lambda tree, split=split: population_lib.split_members(tree, split)
    state, arrays, members_perm, members_keys = (
        on(jax.vmap(init)(keys)), population.split(split), on(perms), on(keys))
    state, _ = step(state, arrays, members_perm, 0, members_keys)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(_STEPS.value):
      state, _ = step(state, arrays, members_perm, i % perm.shape[0], members_keys)
    jax.block_until_ready(state)
    out[f"{name}_images_per_s"] = m * b * _STEPS.value / (time.perf_counter() - t0)
  out["split_devices"] = 1 if mesh is None else int(mesh.devices.size)

  mesh = train_lib.make_mesh()
  c.train.batch_size = b
  setups = [train_lib.supervised_setup(
      model, x, p.labels, train_config=c.train, data_config=c.data, mesh=mesh, key=k,
      kind=p.kind, poison_fn=poison.phase_poison_fn(trigger, k, p.kind, b,
                                                    train_lib.batch_shards(mesh)))
            for p, k in zip(plans, keys)]
  steps = [jax.jit(s.step, donate_argnums=(0,)) for s in setups]
  states = [step(s.state, s.arrays, perm, 0, keys[0])[0] for step, s in zip(steps, setups)]
  jax.block_until_ready(states)
  t0 = time.perf_counter()
  for i in range(_STEPS.value):
    states = [step(state, s.arrays, perm, i % perm.shape[0], keys[0])[0]
              for step, state, s in zip(steps, states, setups)]
  jax.block_until_ready(states)
  out["loop_images_per_s"] = m * b * _STEPS.value / (time.perf_counter() - t0)
  out["loop_devices"] = int(mesh.devices.size)
  out["vmap_speedup"] = out["vmap_images_per_s"] / out["loop_images_per_s"]
  if "vmap_split_images_per_s" in out:
    out["vmap_split_speedup"] = out["vmap_split_images_per_s"] / out["loop_images_per_s"]
  benchmark.write_json(_OUT.value, out, echo=True)


if __name__ == "__main__":
  benchmark.run_script(main)
