r"""Backdoor detection over a population of models: CTI vs Neural Cleanse, ROC AUC.

  python -m jaxbd.main --config=configs/detection.py:cpu,source=npz:/data/cifar10.npz --workdir=DIR
  python -m jaxbd.main --config=configs/detection.py --workdir=DIR      # CIFAR-10 from TFDS

Reproduces the detection experiment of "Pick your Poison" (Lukas & Kerschbaum): clean and
backdoored models (BadNets and Blended in turn, 10% poisoning, target 0, each with its own seed)
are scored by Calibrated Trigger Inversion (with a Pivotal-Tuning repair on 1% clean data) and by
Neural Cleanse; the ROC AUC of each detector is printed and the ROC curves written to
DIR/roc.png. Members with the same kind of trigger are trained together with jax.vmap over a
leading model axis.

Default: 8 clean + 8 backdoored ResNet-18s (the paper's post-activation CIFAR ResNet-18,
`resnet18`; SGD lr 0.1, momentum 0.9, wd 5e-4, cosine per step, batch 128), 100 epochs each, on
full CIFAR-10 (a GPU job); 2% trusted images, of which CTI's repair and inversion take the
paper's 1% and its scores s_t the other 1% (the reference measures them on test images).
`cpu`: 3 clean + 3 backdoored 16-wide CNNs on the 5,000-image subset of configs/cifar10.py:cpu
(10 epochs), 5% trusted (250 images; 1% would be 50), PT repair 200 steps at
lr 0.01, NC 20 epochs, members trained one after another (on CPU XLA's batched convolutions make the
vmapped step 2-3x slower than a loop; scripts/bench_population.py). Measured on 5 clean + 5
backdoored members (`cpu,clean=5,backdoored=5`, 2 CPU devices, 2026-12-05: 6 minutes to train them
all, then per member 50 s for NC, 135 s for CTI with its repair): clean members ACC 0.50-0.52,
backdoored ones 0.48-0.50 at ASR 1.0 (BadNets, Blended in turn). Neural Cleanse separates them (with
the reference's cost schedule, which starts at 0 until the attack succeeds for `patience` epochs,
hence 20 epochs: minimum mask norm 40-68 clean, 5.6-8.6 backdoored, every backdoored member's
smallest mask on the true target 0; anomaly index 0.70-1.02 vs 1.31-2.06; ROC AUC 1.0 by either
score; `--config.detection.scorers=nc`). CTI does not: AUC 0.60 (suspicion 0.64-0.95 clean,
0.62-0.94 backdoored, s_t on the 125 trusted images held out from its repair and inversion, its best
target never the true target 0). CTI assumes the repaired copy keeps the clean behaviour and loses
the backdoor; here PT leaves the backdoor (see configs/pick_your_poison.py), so a trigger that finds
it fools both copies, while for a clean suspect the inversion still finds a perturbation that fools
it and not its repaired copy (trained at lr 0.01). D3 as the repair, which does remove this backdoor
(`--config.detection.cti.repair=d3` with the D3 settings of the README's detection paragraph), does
no better: AUC 0.28 (0.95-0.99 clean, 0.86-0.99 backdoored; D3's warm-up then shared a key with
its first step), since a perturbation that fools a clean suspect rarely fools a copy D3 moved that
far either. Smaller populations (3 + 3, before CTI drew
its batches as the reference's loader does) gave AUCs from 0.44 to 0.89 for the same settings: the
groups overlap, and one pair changing order moves the AUC by 1/9. The same 5 + 5 command on
another CPU, whose round-off trains slightly different members (2026-12-05: 5 minutes to train,
275 s per member to score): NC AUC 1.0 again (minimum mask norm 40-66 clean, 7.3-9.5 backdoored,
always on the true target 0), CTI 0.76 (0.62-0.93 clean, 0.74-0.97 backdoored, best target never
0). NC drew from the member's key in these runs, which CTI splits for its own draws; with a stream
of its own (`NC_STREAM` in jaxbd/experiments/detection.py; the second CPU, 2026-12-05,
`--config.detection.scorers=nc`: 5 minutes to train, 47 s per member): AUC 1.0 by either score,
minimum mask norm 48-64 clean, 6.9-10.5 backdoored, always on the target 0, anomaly index
0.73-0.86 vs 1.18-2.45. With the looped members trained data-parallel on the run's 2 devices
(2026-12-06, the first CPU: 3.2 minutes to train the ten, then 315 s per member; 56 minutes in
all): NC 1.0 by either score (minimum mask norm 46-60 clean, 7.2-11.6 backdoored, always on the
target 0; anomaly index 0.69-0.92 vs 1.09-2.18), CTI 0.56 (0.62-0.92 clean, 0.69-0.98
backdoored, best target never 0). So CTI does not detect at this scale; the default population on
an accelerator is the detection result.

Arguments: cpu, source=..., clean=N, backdoored=N, attacks=badnets+blended ('+'-separated).
"""

from jaxbd import config as config_lib


def get_config(arg=None):
  """The config for `arg` (the arguments in the module docstring)."""
  a = config_lib.parse_arg(arg, cpu=False, source="tfds:cifar10", clean=0, backdoored=0,
                           attacks="badnets+blended")
  config = config_lib.load_beside(__file__, "cifar10.py",
                                  f"source={a.source}" + (",cpu" if a.cpu else ",pyp"))
  config.experiment = "detection"
  # 2%: CTI repairs and inverts on half of it (the paper's 1%, 500 images) and measures s_t on
  # the other half (detection.cti.score_fraction), where the reference takes test images.
  config.defense.clean_fraction = 0.02
  d = config.detection
  d.attacks = a.attacks.replace("+", ",")
  d.num_clean, d.num_backdoored = 8, 8
  if a.cpu:
    config.data.test_limit = 1000
    config.train.checkpoint_every = 0
    config.defense.clean_fraction = 0.05  # 250 images: 1% of the 5,000-image subset is 50
    config.defense.pt.update(dict(steps=200, lr=0.01, batch_size=50, checkpoint_every=0))
    d.num_clean, d.num_backdoored = 3, 3
    d.nc.epochs = 20  # 5 (patience) at cost 0 before the schedule starts; no early stop (25)
    d.vmap = False  # on CPU the loop is 2-3x faster than vmap (scripts/bench_population.py)
  if a.clean:
    d.num_clean = a.clean
  if a.backdoored:
    d.num_backdoored = a.backdoored
  return config
