"""A population trained with one vmapped step equals its members trained one after another."""

import jax
import numpy as np
import pytest

from conftest import tiny_digits_config
from jaxbd import data, models, poison
from jaxbd import train as train_lib
from jaxbd.errors import DivergedError
from jaxbd.experiments import population


def test_looped_and_vmapped_populations_train_the_same_members():
  config = tiny_digits_config(**{"train.epochs": 1})
  ds = data.load(config.data)
  model = models.create(config, ds.num_classes, (0.5,), (0.25,))
  trigger = poison.make_trigger(config, ds.image_shape)
  plan = poison.plan_from_config(config, ds.y_train, ds.num_classes, trigger)
  members = [dict(key=jax.random.key(7), labels=ds.y_train,
                  kind=np.zeros(len(ds.y_train), np.int8), trigger=trigger),
             dict(key=jax.random.key(8), labels=plan.labels, kind=plan.kind, trigger=trigger)]
  kwargs = dict(phase="p", train_config=config.train, data_config=config.data,
                log_config=config.log)
  looped, looped_summary = population.train_group(model, ds.x_train, members, vmapped=False,
                                                  **kwargs)
  vmapped, _ = population.train_group(model, ds.x_train, members, vmapped=True, **kwargs)
  assert looped_summary["seconds"] > 0 and looped_summary["images_per_second"] > 0
  for a, b in zip(looped, vmapped):  # batched vs single convolutions: float rounding only
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
                 a["params"], b["params"])
  first, second = (jax.tree.leaves(s["params"]) for s in looped)
  assert any(not np.allclose(x, y) for x, y in zip(first, second))  # members differ


@pytest.mark.parametrize("vmapped", [True, False])
def test_a_diverged_member_leaves_the_others_as_they_train_alone(vmapped):
  """A member whose poisoned rows carry a NaN trigger diverges; the population returns None for
  it, says why, and trains the other member exactly as it trains alone. A group whose every
  member diverges raises."""
  config = tiny_digits_config(**{"train.epochs": 1})
  ds = data.load(config.data)
  model = models.create(config, ds.num_classes, (0.5,), (0.25,))
  trigger = poison.make_trigger(config, ds.image_shape)
  plan = poison.plan_from_config(config, ds.y_train, ds.num_classes, trigger)
  broken = trigger.replace(pattern=np.full_like(trigger.pattern, np.nan))
  good = dict(key=jax.random.key(7), labels=plan.labels, kind=plan.kind, trigger=trigger)
  bad = dict(key=jax.random.key(8), labels=plan.labels, kind=plan.kind, trigger=broken)
  kwargs = dict(phase="p", train_config=config.train, data_config=config.data,
                log_config=config.log, vmapped=vmapped)
  states, summary = population.train_group(model, ds.x_train, [bad, good], **kwargs)
  assert states[0] is None and states[1] is not None
  assert list(summary["diverged"]) == [0] and "diverged" in summary["diverged"][0]
  alone, _ = population.train_group(model, ds.x_train, [good], **kwargs)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
               states[1]["params"], alone[0]["params"])
  with pytest.raises(DivergedError, match="diverged"):
    population.train_group(model, ds.x_train, [bad, dict(bad, key=jax.random.key(9))], **kwargs)


def test_a_vmapped_population_splits_its_members_over_the_devices():
  """On the test session's 4 CPU devices: the largest device count that divides the population,
  so every device trains as many members; the step on that mesh trains what one device does."""
  assert len(jax.local_devices()) == 4
  assert [None if (m := population.member_mesh(n)) is None else m.devices.size
          for n in (1, 2, 3, 4, 5, 6, 8)] == [None, 2, 3, 4, None, 3, 4]
  assert population.member_mesh(4, jax.local_devices()[:2]).devices.size == 2  # a run's mesh
  note = lambda n, mesh=None: population.split_note(n, mesh or population.member_mesh(n), 4)
  assert note(4) is None and note(8) is None
  assert note(3).endswith("1 of the 4 devices idle; a multiple of 4 members gives each device "
                          "its own")
  assert "3 of the 4 devices idle" in note(5)
  copies = jax.sharding.Mesh(np.array(jax.local_devices()).reshape(2, 2),
                             (population.MEMBERS, population.REPLICAS))
  assert note(6, copies).endswith("over 4 devices: each part computed on 2 devices; a multiple "
                                  "of 4 members gives each device its own")
  config = tiny_digits_config()
  ds = data.load(config.data)
  model = models.create(config, ds.num_classes, (0.5,), (0.25,))
  trigger = poison.make_trigger(config, ds.image_shape)
  plan = poison.plan_from_config(config, ds.y_train, ds.num_classes, trigger)
  stacked = population.Population(
      jax.numpy.asarray(ds.x_train), np.stack([plan.labels] * 4), np.stack([plan.kind] * 4),
      jax.tree.map(lambda x: np.stack([x] * 4), trigger),
      jax.numpy.stack([poison.row_key(jax.random.key(j)) for j in range(4)]))
  tx = train_lib.make_optimizer(config.train, 20)
  init = lambda k: train_lib.create_state(
      train_lib.init_variables(model, k, ds.image_shape), tx)
  keys = jax.random.split(jax.random.key(0), 4)
  perm = jax.numpy.stack([jax.numpy.arange(4 * 64).reshape(4, 64)] * 4)
  mesh = population.member_mesh(4)
  out = {}
  for name, m in (("one device", None), ("split", mesh)):
    step = jax.jit(population.population_step(model, tx, config.data, mesh=m))
    state = population.split_members(jax.vmap(init)(keys), m)
    for i in range(3):
      state, metrics = step(state, stacked.split(m), population.split_members(perm, m), i,
                            population.split_members(keys, m))
    out[name] = (state, metrics)
  state, metrics = out["split"]
  assert {d.id for d in jax.tree.leaves(state["params"])[0].devices()} == {0, 1, 2, 3}
  assert jax.tree.leaves(state["params"])[0].sharding.spec[0] == population.MEMBERS
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               out["one device"][0]["params"], state["params"])
  assert float(metrics["loss"]) == pytest.approx(float(out["one device"][1]["loss"]), rel=1e-5)


def test_a_member_that_holds_a_phase_keeps_its_saved_model(tmp_path):
  """`save_phase` (a population member's phase) saves a state once; where the workdir already
  holds the phase's final checkpoint it keeps it and returns that model, not the new state."""
  from jaxbd.experiments import common  # pylint: disable=g-import-not-at-top
  config = tiny_digits_config(**{"train.epochs": 1})
  r = common.prepare(config, str(tmp_path / "run"))
  ds = r.dataset
  setup, _ = common.classifier_setup(r.model, ds.x_train, ds.y_train, config.train, config.data,
                                     r.mesh, jax.random.key(0))
  first = common.save_phase(r, "backdoored", 1, setup.state)
  other = dict(setup.state, params=jax.tree.map(lambda p: p + 1, setup.state["params"]))
  again = common.save_phase(r, "backdoored", 1, other)
  for a, b, c in zip(*(jax.tree.leaves(v["params"]) for v in (first, again, other))):
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)
