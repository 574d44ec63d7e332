r"""Quickstart: a clean and a BadNets-poisoned CNN on scikit-learn's digits (no download).

  python -m jaxbd.main --config=configs/quickstart.py --workdir=/tmp/jaxbd/quickstart

Digits: 1,437 train / 360 test 8x8 grayscale images, 10 classes. BadNets: a 2x2 white square at
the bottom-right corner, 10% of the training set relabeled to class 0. Runtime: about a minute on 2
CPU cores. Expected: clean ACC ~0.95 with ASR ~0.0-0.1; backdoored ACC within a few points of the
clean model with ASR ~1.0.
"""

from jaxbd import config as config_lib


def get_config(arg=None):
  """The quickstart config (no arguments)."""
  config = config_lib.defaults()
  config_lib.parse_arg(arg)  # takes no arguments; rejects any
  config.experiment = "standard"
  config.data.source = "digits"
  config.data.crop_padding = 1
  config.data.flip = False  # digits are not mirror-symmetric
  config.model.name = "cnn"
  config.model.cnn.width = 16
  config.model.cnn.stages = 2
  config.poison.name = "badnets"
  config.poison.rate = 0.1
  config.poison.target = 0
  config.poison.badnets.size = 2
  config.train.epochs = 30
  config.train.batch_size = 64
  config.train.lr = 0.05
  config.train.eval_every = 10
  config.train.checkpoint_every = 5
  return config
