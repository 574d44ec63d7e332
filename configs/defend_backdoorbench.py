r"""Evaluate and defend a model trained by BackdoorBench (PyTorch) with jaxbd's defenses.

  python -m jaxbd.main \
      --config=configs/defend_backdoorbench.py:checkpoint=/runs/badnet_0_1/attack_result.pt \
      --config.data.tfds_data_dir=/data/tensorflow_datasets --config.defense.names=ft \
      --workdir=/tmp/jaxbd/defend_badnet

The file is BackdoorBench's attack result (`torch.save` of a dict with `model_name`,
`num_classes`, `model` and `bd_train.poison_indicator`); see `jaxbd.interop.backdoorbench`. The
model must be a PreAct-ResNet18 (any width). Normalization is BackdoorBench's CIFAR-10 mean/std,
which its models expect. `attack` names the trigger the model was poisoned with, with
BackdoorBench's defaults (badnets: 3x3 white square at the bottom-right corner; blended: alpha 0.2,
give the trigger image with --config.poison.blended.image). Defenses use 5% clean training data
(BackdoorBench's default) drawn from rows the file does not mark as poisoned.

Arguments: checkpoint=PATH, source=tfds:cifar10 (any data source), attack=badnets|blended|none,
target=0, width=64.
"""

from jaxbd import config as config_lib
from jaxbd.models import common


def get_config(arg=None):
  """The config for `arg` (the arguments in the module docstring)."""
  a = config_lib.parse_arg(arg, checkpoint="", source="tfds:cifar10", attack="badnets",
                           target=0, width=64)
  config = config_lib.defaults()
  config.experiment = "defend"
  config.defend.checkpoint = a.checkpoint
  config.data.source = a.source
  config.data.mean = common.CIFAR10_MEAN
  config.data.std = common.CIFAR10_STD
  config.model.name = "preact_resnet18"
  config.model.preact_resnet18.width = a.width
  config.poison.name = a.attack
  config.poison.target = a.target
  config.poison.badnets.size = 3
  config.defense.clean_fraction = 0.05
  return config
