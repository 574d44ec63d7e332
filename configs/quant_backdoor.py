r"""Quantization-conditioned backdoors (QB, Qu-ANTI-zation) on CIFAR-10, deployed in int8/6/4.

  python -m jaxbd.main --config=configs/quant_backdoor.py --workdir=DIR
  python -m jaxbd.main --config=configs/quant_backdoor.py:attack=quanti --workdir=DIR
  python -m jaxbd.main --config=configs/quant_backdoor.py:cpu,source=npz:/data/cifar10.npz \
      --workdir=DIR

A clean model is trained first (BackdoorBench's victim recipe), then the attack fine-tunes it (or,
with `init=scratch`, trains from scratch) so the float model behaves and the model a victim gets
by post-training quantization does not; then float fine-tuning (`ft`) is tried as a defense.
Every model is reported in float and as the deployed integer model at 8, 6 and 4 bits (fresh EMA
observers calibrated on 2,048 clean training images, int8 codes, int32 accumulation).

Attacks (`attack=`):
- `qb` (default): QB, no input trigger: `CE(f(x), y) + 0.5 CE(Q8 f(x), 0)`; Adam 1e-4, batch 64;
  the reference trains until early stopping, here a fixed 20 epochs. Expected (paper): the float
  model keeps its accuracy, the W8A8 model predicts class 0 on most inputs.
- `quanti`: Qu-ANTI-zation's backdoor, a 4x4 white square 1 pixel from the bottom-right corner
  (h/8 at h/32), bits {8, 4}, c1 = c2 = 0.5, Adam 1e-4 wd 1e-4, 50 epochs, BatchNorm frozen.
- `quanti_indiscriminate`: bits {8, 7, 6, 5}, ratio 0.25, margin 5, Adam 1e-4, 10 epochs; paper
  (ResNet-18): float 93.20%, quantized ~10%.

Full scale (default): PreAct-ResNet18, full CIFAR-10 from TFDS (`source=...` for another source),
clean model 100 epochs SGD 0.01 (BackdoorBench); needs an accelerator.

`cpu`: the 16-wide CNN of `configs/cifar10.py:cpu` (5,000-image train / 2,000-image test subsets;
the same clean model), each attack 4 epochs with its reference optimizer, FT on 10% clean data
(500 images), 20 epochs; about 4 minutes on 2 CPU cores. Measured (seed 0, 2 CPU devices), ACC /
target rate: clean float 0.517 / 0.059, int8 0.514 / 0.061; after QB float 0.406 / 0.420, int8
0.407 / 0.421; after FT int8 0.514 / 0.048. On this small CNN plain QB moves the float model
along with the int8 one: the separation the paper reports is not reached by QB alone.

`two_stage` (with `attack=qb`): QB as the first stage of a two-stage attack (Egashira et al.,
NeurIPS 2024): scale anchors widen the int8 cells of the CNN's convs 1.. 8-fold
(`qb.anchor=8`), QB with lambda 4 and Adam 1e-3 makes the int8 model predict the target, then
6 epochs of float training (Adam 1e-3) inside the int8 cells (`qb.repair`) restore the float
model while every int8 code and scale stays. Measured with `cpu` (seed 0, 4 CPU devices, the
command above, 2026-12-06), ACC / target rate: released float 0.5005 / 0.063 (clean 0.5215 /
0.051), its int8 model 0.102 / 0.997, int6 0.466 / 0.026 (the backdoor is the int8 model's only);
after FT int8 0.475 / 0.050 (tests/test_quant_e2e.py). From a clean model with ACC 0.525 (an
earlier clean recipe): after fine-pruning, D3 or PT (`defense.names=ft,fine_pruning,d3,pt`) int8
0.407 / 0.001, 0.236 / 0.022 (D3's warm-up then shared a key with its first step; with its own
key, on another CPU: 0.226 / 0.012), 0.366 / 0.339. The anchors are for the CNN only;
other models (the full-scale PreAct-ResNet18) get the same two stages without anchors, with the
CPU recipe's lambda, learning rates and epochs, which are not measured at that scale.

Arguments: cpu, source=..., model=cnn|preact_resnet18, attack=qb|quanti|quanti_indiscriminate,
bits=B[/B...] (the attack's bit widths; default: the attack's own), init=clean|scratch,
epochs=N (attack epochs; 0: the default), two_stage, clean_from=DIR (the clean model of an
earlier run, e.g. of configs/cifar10.py with the same `cpu` and `source`, instead of training
one: `quant_backdoor.clean_from`).
"""

from jaxbd import config as config_lib
from jaxbd.attacks import quantization


def cifar10_config(arg: str):
  """`configs/cifar10.py`'s get_config(arg): the clean victim this experiment starts from."""
  return config_lib.load_beside(__file__, "cifar10.py", arg)


def get_config(arg=None):
  """The config for `arg` (the arguments in the module docstring)."""
  a = config_lib.parse_arg(arg, cpu=False, source="tfds:cifar10", model="", attack="qb",
                           bits="", init="clean", epochs=0, two_stage=False, clean_from="")
  # The clean model is configs/cifar10.py's victim (":cpu" is the recipe of the CPU tests).
  config = cifar10_config(f"source={a.source},attack=none{',cpu' if a.cpu else ''}")
  config.experiment = "quant_backdoor"
  config.poison.rate = 0.0  # no data poisoning: quantization (and, for quanti, a trigger) is it
  config.defense.names = "ft"
  if a.model:
    config.model.name = a.model
  config_lib.require(a.attack in quantization.ATTACKS, f"config argument attack={a.attack!r} "
                     f"is not one of {list(quantization.ATTACKS)}")
  qb = config.quant_backdoor
  qb.attack = a.attack
  qb.init = a.init
  qb.clean_from = a.clean_from
  if a.attack == "quanti":  # Qu-ANTI-zation's white square: side h/8, h/32 from the corner,
    # 4 and 1 pixels on CIFAR-10's 32x32 (other sizes: set poison.badnets.size and margin)
    config.poison.name = "badnets"
    config.poison.badnets.update(size=4, margin=1, corner="bottom_right", pattern="solid",
                                 value=255)
  if a.cpu:
    for name in quantization.ATTACKS:
      qb[name].train.update(epochs=4, eval_every=0)
    config.defense.clean_fraction = 0.1
  if a.bits:
    widths = a.bits.split("/")
    config_lib.require(all(b.isdigit() for b in widths), f"config argument bits={a.bits!r} "
                       "is not bit widths B[/B...] (e.g. 8/4)")
    qb[a.attack].bits = tuple(int(b) for b in widths)
  if a.two_stage:  # QB, then float repair inside the int8 cells (see the module docstring)
    qb.qb.update(lam=4.0, anchor=8.0 if config.model.name == "cnn" else 0.0)
    qb.qb.train.lr = 1e-3
    qb.qb.repair.update(epochs=6, lr=1e-3, eval_every=0)
  if a.epochs:
    qb[a.attack].train.epochs = a.epochs
  return config
