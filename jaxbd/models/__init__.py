"""Flax Linen classifiers and their registry.

`MODELS[name].build(config, num_classes, mean, std)` returns an `nn.Module` whose
`apply(variables, images, train=...)` maps f32[B, H, W, C] images in [0, 1] to logits f32[B, K];
`create(config, num_classes, mean, std)` builds `config.model.name`. Patch-routed models (pMoE,
V-MoE) also have a routing cell: the side in pixels of the image block behind one routing position
(`routing_cell`).
"""

import types

from jaxbd import config as config_lib
from jaxbd.models import cnn, pmoe, resnet, vmoe
from jaxbd.models.common import features

MODELS = types.MappingProxyType({
    "cnn": config_lib.Component(cnn.default_config, cnn.validate, cnn.build),
    "preact_resnet18": resnet.component("preact_resnet18", preact=True),
    "resnet18": resnet.component("resnet18", preact=False),
    "pmoe": config_lib.Component(pmoe.pmoe_config, pmoe.pmoe_validate, pmoe.pmoe_build),
    "pmoe_patch": config_lib.Component(pmoe.pmoe_patch_config, pmoe.pmoe_patch_validate,
                                       pmoe.pmoe_patch_build),
    "vmoe": config_lib.Component(vmoe.default_config, vmoe.validate, vmoe.build),
})

# Models with fake-quantization layers (a `quant` attribute; `jaxbd.quant`).
QUANTIZABLE = ("cnn", "preact_resnet18", "resnet18", "pmoe", "pmoe_patch")

ROUTED = ("pmoe", "pmoe_patch", "vmoe")  # models whose layers route image patches to experts


def create(config, num_classes: int, mean, std):
  """The model named by `config.model.name` (see MODELS)."""
  return MODELS[config.model.name].build(config, num_classes, mean, std)


def routing_cell(config, image_shape) -> int:
  """Pixels per side of the image block behind one routing position; 0 for unrouted models.

  The patch size of the patch-routed models (`pmoe_patch`, `vmoe`); for the WRN-MoE `pmoe`, the
  image side over the side of its routing grid (4 on 32x32 images).
  """
  name = config.model.name
  if name == "pmoe":
    return pmoe.pmoe_cell(tuple(image_shape))
  return config.model[name].patch if name in ROUTED else 0
