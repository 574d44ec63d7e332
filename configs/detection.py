r"""Backdoor detection over a population of models: CTI vs Neural Cleanse, ROC AUC.

  python -m jaxbd.main --config=configs/detection.py:cpu,source=npz:/data/cifar10.npz --workdir=DIR
  python -m jaxbd.main --config=configs/detection.py --workdir=DIR      # CIFAR-10 from TFDS

Reproduces the detection experiment of "Pick your Poison" (Lukas & Kerschbaum): clean and
backdoored models (BadNets and Blended in turn, 10% poisoning, target 0, each with its own seed)
are scored by Calibrated Trigger Inversion (with a Pivotal-Tuning repair on 1% clean data) and by
Neural Cleanse; the ROC AUC of each detector is printed and the ROC curves written to
DIR/roc.png. Members with the same kind of trigger are trained together with jax.vmap over a
leading model axis.

Default: 8 clean + 8 backdoored PreAct-ResNet18s (width 64), 100 epochs each, on full CIFAR-10 (a
GPU job). `cpu`: 3 clean + 3 backdoored 8-wide CNNs on a 2,000-image subset, 8 epochs, PT repair
200 steps at lr 0.01, NC 10 epochs, members trained one after another (on CPU XLA's batched
convolutions make the vmapped step 2-3x slower than a loop; scripts/bench_population.py).
Measured with clean=2,backdoored=2 --config.defense.pt.steps=60 --config.detection.nc.epochs=5
(2 CPU devices, about 9 minutes): member ACC 0.33-0.41, the BadNets member reached only ASR 0.25
and the Blended one 1.0; ROC AUC CTI 0.25, NC 0.50. Four weak models are a check that the pipeline
runs, not a detection result: use the default population (or more epochs) for numbers.

Arguments: cpu, source=..., clean=N, backdoored=N, attacks=badnets+blended ('+'-separated).
"""

import os

from jaxbd import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, cpu=False, source="tfds:cifar10", clean=0, backdoored=0,
                           attacks="badnets+blended")
  base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py")
  config = config_lib.load_file(f"{base}:source={a.source}" + (",cpu" if a.cpu else ""))
  config.experiment = "detection"
  config.defense.clean_fraction = 0.01
  d = config.detection
  d.attacks = a.attacks.replace("+", ",")
  d.num_clean, d.num_backdoored = 8, 8
  if a.cpu:
    config.data.train_limit = 2000
    config.data.test_limit = 1000
    config.model.cnn.width = 8
    config.train.epochs = 8
    config.train.checkpoint_every = 0
    config.defense.clean_fraction = 0.05  # 100 images: 1% of a 2,000-image subset is 20
    config.defense.pt.update(dict(steps=200, lr=0.01, batch_size=50, checkpoint_every=0))
    d.num_clean, d.num_backdoored = 3, 3
    d.nc.epochs = 10
    d.vmap = False  # on CPU the loop is 2-3x faster than vmap (scripts/bench_population.py)
  if a.clean:
    d.num_clean = a.clean
  if a.backdoored:
    d.num_backdoored = a.backdoored
  return config
