r"""BadPatches (arXiv 2505.01811): routing-aware backdoors on pMoE and V-MoE, fine-pruning.

  python -m jaxbd.main --config=configs/badpatches.py --workdir=DIR
  python -m jaxbd.main --config=configs/badpatches.py:source=npz:/data/cifar10.npz --workdir=DIR
  python -m jaxbd.main --config=configs/badpatches.py:cpu,source=npz:/data/cifar10.npz --workdir=DIR

Default (SPEC section 1, the thesis code's setting): pMoE WRN-MoE (k = 10: 160/320/640 channels,
4 experts, l = 16 of the 8x8 = 64 routing positions, the reference code's softmax-over-all gates,
Keras's initializers and BatchNorm settings, images in [0, 1] without normalization) on full
CIFAR-10, 25 epochs, SGD lr 0.1 without momentum or weight decay, constant lr, batch 128,
no augmentation. Attack: BadPatches, one 4x4 checkerboard patch on the victim's grid (the
bottom-right cell), all-to-one target 0, 1% of the training set (drawn from the non-target
classes, jaxbd's `poison.exclude_target` default; False draws from every class). Poison-rate
sweep 0.01%, 0.1%, 1%, 2% against BadNets (the same checkerboard as a 3x3 square in the
bottom-right corner, not grid-aligned: the comparison isolates the placement), Blend (alpha
0.2, seeded noise) and WaNet (k 4, s 0.5, two noise-mode cover rows per poisoned row), SPEC's
routing-agnostic baselines.
Defense: fine-pruning on 10,000 clean training images (`defense.clean_fraction=0.2`), 10% of each
expert's last-conv channels, then 5 epochs of fine-tuning with the training routine (SGD 0.1),
with the prune-rate sweep. The paper reports ASR > 80% at 0.01% on pMoE, up to 100% at 2% with
~1 point of ACC lost, pruning alone ineffective and fine-tuning bringing ASR to ~2.1% for ~1.4
points of ACC. Work: 17 models of 25 epochs on 50,000 images (clean, backdoored, 15 more in the
sweep) and the fine-pruning; not yet run on an accelerator, so no runtime or result is claimed.

`cpu`: the CPU recipe of the test suite, with `model=pmoe_patch`: the image-patch pMoE (4x4
patches, 4 experts, l = 16, 64 channels per expert) on a class-balanced 5,000-image CIFAR-10
subset (2,000 test images), 10 epochs, same optimizer; sweep rate 0.1% (5 images) against BadNets;
fine-pruning on 500 clean images. Measured on 2 CPU cores (4 fake devices, seed 0): clean ACC
0.398 (ASR 0.032); BadPatches at 1%: ACC 0.402, ASR 1.0; at 0.1%: BadPatches ASR 0.987 vs BadNets
0.184; about 2 minutes. `cpu` with the WRN-MoE (`widen` 1, BatchNorm momentum 0.9), 2 fake
devices, 2026-12-07, 7 minutes: clean ACC 0.349; BadPatches at 1%: 0.400 / ASR 0.882, 10% pruned
0.362 / 0.875, fine-tuned 0.315 / 0.871; at 0.1% neither BadPatches (ASR 0.016) nor BadNets
(0.062) is learned.

Arguments:
  model=pmoe|pmoe_patch|vmoe   victim (pmoe: WRN-MoE; pmoe_patch: image patches; vmoe: V-MoE
                               ViT, patch 4, E = 8, K = 2, MoE every 2nd block)
  source=...                   data source (default tfds:cifar10; npz:PATH for the encoded files)
  trigger=badpatches|badnets|blended|wanet   the attack of the main model (and first line of
                               the sweep)
  rate=0.01                    poisoning rate of the main model
  knowledge=full|patch|offset|l   the attacker's knowledge of the victim's routing: full; patch
                               (assumes cells of half the victim's side: 2 pixels); offset (grid
                               shifted by 2 pixels); l (assumes l = 8; affects position=router)
  position=fixed|random|router, pattern=solid|checkerboard|noise|optimized   BadPatches options
  cpu, epochs=N (0: the default)
"""

from jaxbd import config as config_lib

VICTIM_CELL = 4  # pixels per routing position of all three victims on 32x32 images


def get_config(arg=None):
  """The config for `arg` (the arguments in the module docstring)."""
  a = config_lib.parse_arg(arg, model="pmoe", source="tfds:cifar10", trigger="badpatches",
                           rate=0.01, knowledge="full", position="fixed",
                           pattern="checkerboard", cpu=False, epochs=0)
  config = config_lib.defaults()
  config.experiment = "badpatches"
  config.data.source = a.source
  config.data.crop_padding = 0  # the thesis code trains without augmentation
  config.data.flip = False

  config.model.name = a.model
  if a.model == "pmoe":  # the reference WRN-MoE takes images in [0, 1] unnormalized
    config.data.mean, config.data.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  config.model.pmoe.widen = 10
  config.model.pmoe.experts = 4
  config.model.pmoe.l = 16
  config.model.vmoe.patch = VICTIM_CELL

  config.poison.name = a.trigger
  config.poison.rate = a.rate
  config.poison.target = 0
  config.poison.badpatches.position = a.position
  config.poison.badpatches.pattern = a.pattern
  config.poison.badpatches.count = 1
  if a.knowledge == "patch":
    config.poison.badpatches.patch = VICTIM_CELL // 2
  elif a.knowledge == "offset":
    config.poison.badpatches.offset = VICTIM_CELL // 2
  elif a.knowledge == "l":
    config.poison.badpatches.l = 8
  elif a.knowledge != "full":
    raise config_lib.ConfigError(f"config argument knowledge={a.knowledge!r} is not one of "
                                 "full, patch, offset, l")
  config.poison.badnets.size = 3
  config.poison.badnets.corner = "bottom_right"
  config.poison.badnets.pattern = "checkerboard" if a.pattern == "optimized" else a.pattern
  config.poison.blended.alpha = 0.2

  config.train.optimizer = "sgd"
  config.train.lr = 0.1
  config.train.momentum = 0.0
  config.train.weight_decay = 0.0
  config.train.schedule = "constant"
  config.train.batch_size = 128
  config.train.epochs = 25
  config.train.eval_every = 5

  config.badpatches.rates = (0.0001, 0.001, 0.01, 0.02)
  config.badpatches.baselines = "badnets,blended,wanet"
  config.defense.names = "fine_pruning"
  config.defense.clean_fraction = 0.2  # 10,000 CIFAR-10 training images
  # Fine-tuning stage: 5 epochs with the victim's own training routine (*open* in the thesis).
  config.defense.fine_pruning.finetune.update(dict(
      epochs=5, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
      schedule="constant", eval_every=0, checkpoint_every=0))

  if a.cpu:
    config.data.train_limit = 5000
    config.data.test_limit = 2000
    if a.model == "pmoe":
      config.model.pmoe.widen = 1
      # The 390 steps at lr 0.1 move the model faster than Keras's momentum 0.99 lets the
      # BatchNorm statistics follow: eval-mode ACC 0.26 where 0.9 gives 0.35 (same training).
      config.model.pmoe.bn_momentum = 0.9
    config.model.vmoe.update(dict(hidden=64, depth=4, heads=4, mlp_dim=128))
    config.train.epochs = 10
    config.train.eval_every = 0
    config.train.checkpoint_every = 0
    config.badpatches.rates = (0.001,)
    config.badpatches.baselines = "badnets"
    config.badpatches.routing_images = 1000
    config.defense.clean_fraction = 0.1
  if a.epochs:
    config.train.epochs = a.epochs
  return config
