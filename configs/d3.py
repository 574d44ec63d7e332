r"""The D3 table: PreAct-ResNet18 on CIFAR-10, 10% poisoning, 5% clean data; no defense, FT, D3, PT.

  python -m jaxbd.main --config=configs/d3.py:attack=badnets --workdir=DIR
  python -m jaxbd.main --config=configs/d3.py:attack=sig,source=npz:/data/cifar10.npz --workdir=DIR
  python -m jaxbd.main --config=configs/d3.py:attack=wanet,cpu --workdir=DIR   # CPU scale
  python -m jaxbd.report --inputs=DIR1,DIR2,... --out=REPORT_DIR   # tables and plots

Reproduces Wei, Liu & Zha (ICCV 2025), Table 1's CIFAR-10 rows with BackdoorBench's victim
(configs/cifar10.py: PreAct-ResNet18, SGD 0.01 momentum 0.9 wd 5e-4, cosine per epoch, 100 epochs,
batch 128, crop + flip; 10% all-to-one, target 0) and attacks: BadNets (3x3 white, bottom right),
Blended (alpha 0.2; seeded noise, or --config.poison.blended.image=FILE for BackdoorBench's image),
WaNet (k 4, s 0.5, cross ratio 2), SIG (delta 40, f 6, clean-label: every target-class image at
10%). Defenses with their reference defaults on 5% clean training data (2,500 images): FT (20
epochs), D3 (100 epochs, batch 256, lmd 0.5, eps 0.1, random warm-up), PT (2,000 steps).
Expected (the paper, ACC/ASR): BadNets 91.32/95.03 -> FT 89.96/1.48, D3 90.77/0.74; Blended
93.47/99.92 -> 92.78/96.11, 92.29/0.22; WaNet 91.25/89.73 -> 93.48/17.10, 93.31/0.04; SIG
84.48/98.27 -> 90.80/2.37, 89.99/0.00. No full-scale (GPU) run has been made yet.

`cpu`: the 16-wide CNN on a 5,000-image subset (configs/cifar10.py:cpu) with defenses scaled to
seconds: FT 10 epochs; D3 100 epochs at batch 16 and lr 0.02 with lmd 3 and eps 0.5 (random
warm-up, the reference's loss, projection and schedule); PT 600 steps at lr 0.01. D3's batch,
epochs, lr, lmd, eps and warm-up were chosen on 2,000 held-out CIFAR-10 training images outside
the subset (never test data) with the attack's trigger, as the paper's rule does ("lowest ASR
with ACC >= original - 3%"). No setting kept ACC within 3 points, so the choice is the highest
held-out ACC with held-out ASR < 10%. Re-measured with

  python -m jaxbd.select --config=configs/d3.py:cpu,source=npz:FILE --workdir=DIR --defense=d3 \
      --grid="defense.d3.batch_size=16,32;defense.d3.lr=0.01,0.02,0.05"

held-out ACC / ASR (suspect 0.491 / 1.0): batch 16: lr 0.01 0.401 / 0.012, lr 0.02 0.4105 /
0.017, lr 0.05 0.412 / 0.064; batch 32: 0.386 / 0.027, 0.389 / 0.014, 0.410 / 0.028. Earlier
searches (another machine): batch 8: 0.431 / 0.068; batch 64: 0.374 / 0.068; lmd 4 or 5: ASR
0.08-0.12; lmd 10: ACC 0.39, ASR 0.38; far / middle warm-up: ACC 0.29-0.30; eps 1.0, lmd 6,
epochs 200, BN frozen, noise warm-up: 7-16 points lost. Measured on BadNets
(tests/test_defenses_cifar.py, test subset): ASR 1.0 -> 0.012 / 0.034, ACC 0.4995 -> 0.4395 /
0.504 -> 0.430 on two machines (6.0 / 7.4 points lost). The ACC loss (the paper's
PreAct-ResNet18 loses < 1) comes from re-learning the re-initialized classifier from 250 images
with the features of a 50%-accurate CNN; FT alone keeps ACC but ASR 1.0. Larger victims did
not help: a 32-wide CNN (ACC 0.54) and a 16-wide CNN on 10,000 images (ACC 0.56) lost 13-16
points at batch 64; on 20,000 images (held-out ACC 0.617) D3 at batch 16 lost 7.7 points.
Arguments: attack=badnets|blended|wanet|sig; defenses=ft+d3+pt ('+'-separated, since ','
separates arguments); cpu; source=...; epochs=N (victim epochs; 0: the recipe's).
"""

import os

from jaxbd import config as config_lib

ATTACKS = ("badnets", "blended", "wanet", "sig")


def get_config(arg=None):
  a = config_lib.parse_arg(arg, attack="badnets", defenses="ft+d3+pt", cpu=False,
                           source="tfds:cifar10", epochs=0)
  if a.attack not in ATTACKS:
    raise config_lib.ConfigError(f"configs/d3.py: attack must be one of {ATTACKS}")
  base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py")
  config = config_lib.load_file(f"{base}:source={a.source},epochs={a.epochs}" + (",cpu" if a.cpu
                                                                                else ""))
  config.poison.name = a.attack
  config.poison.rate = 0.1
  config.poison.target = 0
  config.poison.label_mode = "clean_label" if a.attack == "sig" else "all2one"
  config.defense.names = a.defenses.replace("+", ",")
  config.defense.clean_fraction = 0.05
  if a.cpu:
    config.defense.ft.epochs = 10
    config.defense.d3.update(dict(epochs=100, batch_size=16, lr=0.02, lmd=3.0, eps=0.5,
                                  eval_every=0, checkpoint_every=0))
    config.defense.pt.update(dict(steps=600, lr=0.01, batch_size=64, checkpoint_every=0))
  return config
