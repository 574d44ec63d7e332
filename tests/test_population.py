"""A population trained with one vmapped step equals its members trained one after another."""

import jax
import numpy as np
import pytest

from conftest import tiny_digits_config
from jaxbd import data, models, poison
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
