"""Poisoning: triggers (vectorized `jnp` transforms), poison plans, and the trigger registry.

`TRIGGERS[name].build(config, image_shape)` returns the trigger of `config.poison.<name>` for
images of shape (H, W, C); `make_trigger(config, image_shape)` does this for `config.poison.name`.

Triggers: `badnets`, `blended` (triggers.py), `wanet` (wanet.py), `sig` (sig.py),
`adaptive_blend`, `adaptive_patch`, `tsb` (pieces.py), `refool` (refool.py: reflections),
`badpatches` (badpatches.py: aligned to the victim's routing grid). A trigger that wants cover
rows (training images that get its `cover` transform and keep their label) says how many per
poisoned row in its `cover_ratio` attribute; `plan_from_config` draws them. `adversarial`
(label-consistent poisoning) perturbs the poisoned rows of a clean-label attack with PGD before
the trigger.
"""

import types

from jaxbd import config as config_lib
from jaxbd.poison import adversarial, badpatches, pieces, refool, sig, triggers, wanet
from jaxbd.poison.plan import (CLEAN, COVER, POISONED, PoisonPlan, load_plan, make_plan,
                               marked_bound, phase_poison_fn, poison_fn, poisoned_label,
                               row_key)


def _component(name, default_config, validate, build):
  """A registry entry: `build(config, shape)` is `build(config.poison.<name>, shape, seed)`."""
  return config_lib.Component(
      default_config, validate,
      lambda config, shape: build(config.poison[name], shape, config.seed))


TRIGGERS = types.MappingProxyType({
    "badnets": _component("badnets", triggers.badnets_config, triggers.badnets_validate,
                          triggers.badnets),
    "blended": _component("blended", triggers.blended_config, triggers.blended_validate,
                          triggers.blended),
    "wanet": _component("wanet", wanet.default_config, wanet.validate, wanet.build),
    "sig": _component("sig", sig.default_config, sig.validate, sig.build),
    "adaptive_blend": _component("adaptive_blend", pieces.adaptive_blend_config,
                                 pieces.adaptive_blend_validate, pieces.adaptive_blend),
    "adaptive_patch": _component("adaptive_patch", pieces.adaptive_patch_config,
                                 pieces.adaptive_patch_validate, pieces.adaptive_patch),
    "tsb": _component("tsb", pieces.tsb_config, pieces.tsb_validate, pieces.tsb),
    "refool": _component("refool", refool.default_config, refool.validate, refool.build),
    "badpatches": config_lib.Component(
        badpatches.default_config, badpatches.validate,
        lambda config, shape: badpatches.build(config.poison.badpatches, shape, config.seed,
                                               _victim_cell(config, shape))),
})


def _victim_cell(config, image_shape) -> int:
  """The routing cell of the configured model: the grid BadPatches aligns to by default."""
  from jaxbd import models  # pylint: disable=g-import-not-at-top  (the model's geometry only)
  return models.routing_cell(config, image_shape)


def make_trigger(config, image_shape):
  """The trigger named by `config.poison.name` for images of `image_shape` (H, W, C)."""
  return TRIGGERS[config.poison.name].build(config, tuple(image_shape))


def planned_rate(poison_config) -> float:
  """The share of training rows a `poison` config section poisons: its `rate`, 0 without a
  trigger (`name="none"`, whatever `rate` holds)."""
  return poison_config.rate if poison_config.name != "none" else 0.0


def plan_from_config(config, labels, num_classes, trigger=None) -> PoisonPlan:
  """The poison plan of `config.poison` for training labels int[N] (seeded by `config.seed`).

  With a `trigger` that has a `cover_ratio`, `cover_ratio` cover rows (of any class, not poisoned)
  are drawn per poisoned row.
  """
  p = config.poison
  rate = planned_rate(p)
  return make_plan(labels, num_classes, rate=rate, target=p.target, label_mode=p.label_mode,
                   seed=config.seed, exclude_target=p.exclude_target,
                   cover_rate=rate * getattr(trigger, "cover_ratio", 0.0))
