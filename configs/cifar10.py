r"""CIFAR-10 backdoor experiments with BackdoorBench's victim settings.

  python -m jaxbd.main --config=configs/cifar10.py --workdir=DIR
  python -m jaxbd.main --config=configs/cifar10.py:cpu,source=npz:/data/cifar10.npz --workdir=DIR

Default (`preact_resnet18`): PreAct-ResNet18, SGD lr 0.01 momentum 0.9 wd 5e-4, cosine per epoch,
100 epochs, batch 128, random crop (4) + flip, BadNets 3x3 white bottom-right, 10% all-to-one,
target 0, the poisoned rows drawn from every class as BackdoorBench draws them (it reports ACC
91.32 / ASR 95.03 for BadNets). Data from TFDS (`tfds:cifar10`, set data.tfds_data_dir) or any
`npz:`/`folder:` source.

`cpu`: a 16-wide CNN on a class-balanced 5,000-image training subset and a 2,000-image test subset,
10 epochs, batch 64, lr 0.05: about 50 s per model on 2 CPU cores (30 s with
XLA_FLAGS=--xla_force_host_platform_device_count=2), ACC ~0.50 clean. The BadNets patch is a 3x3
checkerboard: with the solid white square this 24k-parameter CNN reaches only ASR ~0.37 in 10
epochs (bright corners are common in CIFAR-10), with the checkerboard ASR ~1.0 at ACC within 3
points of the clean model.

`cpu_defense`: the same CNN on a class-balanced 45,000-image subset for 3 epochs (~1 minute on 2
CPU cores, ACC ~0.60, BadNets ASR 1.0), the victim of the post-training defenses' CPU recipes
(configs/d3.py:cpu, configs/pick_your_poison.py:cpu): 5% / 1% of it are 2,250 / 450 trusted
images, close to the papers' 2,500 / 500, and the other 5,000 training images are left for
choosing a defense's hyper-parameters (`python -m jaxbd.select`). It carries Pivotal Tuning's CPU
recipe, shared by both: 600 steps at batch 64, l_slol 0.01, the paper's other settings (chosen in
configs/pick_your_poison.py). Both CPU victims fine-tune (FT) 20 epochs at batch 128, not
BackdoorBench's 100 at 256.

`pyp` (without `cpu`): Pick your Poison's victim instead, the post-activation CIFAR ResNet-18
(`resnet18`) trained with SGD lr 0.1, momentum 0.9, wd 5e-4, cosine per step, batch 128, 100
epochs (configs/pick_your_poison.py, configs/detection.py).

Arguments: cpu, cpu_defense, pyp, source=..., attack=badnets|none, rate=0.1, epochs=N (0: the
default).

Sweep (poison rates x seeds, `get_sweep`), results in DIR/results.sqlite:

  python -m jaxbd.sweep --config=configs/cifar10.py:cpu,source=npz:/data/cifar10.npz --workdir=DIR
"""

from jaxbd import config as config_lib


def get_config(arg=None):
  """The config for `arg` (the arguments in the module docstring)."""
  a = config_lib.parse_arg(arg, cpu=False, cpu_defense=False, pyp=False, source="tfds:cifar10",
                           attack="badnets", rate=0.1, epochs=0)
  config_lib.require(not (a.pyp and (a.cpu or a.cpu_defense)),
                     "config argument pyp is a full-scale victim; it does not go with cpu")
  config = config_lib.defaults()
  config.data.source = a.source
  config.data.crop_padding = 4
  config.data.flip = True
  config.poison.name = a.attack
  config.poison.rate = a.rate
  config.poison.target = 0
  config.poison.badnets.size = 3
  config.train.optimizer = "sgd"
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  config.train.schedule = "cosine"
  if a.cpu or a.cpu_defense:
    config.data.train_limit = 45000 if a.cpu_defense else 5000
    config.data.test_limit = 2000
    config.model.name = "cnn"
    config.model.cnn.width = 16
    config.model.cnn.stages = 3
    config.train.epochs = 3 if a.cpu_defense else 10
    config.train.batch_size = 64
    config.train.lr = 0.05
    config.train.nesterov = True
    config.train.eval_every = 0
    config.poison.badnets.pattern = "checkerboard"
    config.defense.ft.update(dict(epochs=20, batch_size=128))  # the CPU tables' FT
    if a.cpu_defense:
      config.defense.pt.update(dict(steps=600, batch_size=64, slol=0.01, checkpoint_every=0))
  else:
    config.model.name = "preact_resnet18"
    # BackdoorBench draws all-to-one rows from every class (target-class rows keep their label
    # and get the trigger); the CPU recipes, measured before, draw from the other classes.
    config.poison.exclude_target = False
    config.train.epochs = 100
    config.train.batch_size = 128
    config.train.lr = 0.01
    config.train.schedule_unit = "epoch"
    config.train.eval_every = 10
    if a.pyp:
      config.model.name = "resnet18"
      config.train.lr = 0.1
      config.train.schedule_unit = "step"
  if a.epochs:
    config.train.epochs = a.epochs
  return config


def get_sweep(arg=None):
  """Cells for `python -m jaxbd.sweep --config=configs/cifar10.py[:ARGS]`: rates x seeds."""
  del arg
  return [{"poison.rate": rate, "seed": seed}
          for rate in (0.001, 0.01, 0.05, 0.1) for seed in (0, 1, 2)]
