r"""`python -m jaxbd.select`: choose a defense's hyper-parameters on held-out training images.

  python -m jaxbd.select --config=configs/pick_your_poison.py:cpu,source=npz:FILE \
      --workdir=DIR --defense=pt --grid="defense.pt.lr=0.005,0.01,0.05;defense.pt.slol=0.01,0.05"

Trains (or resumes) the config's backdoored model in DIR, runs the defense once per cell of
`--grid` (cartesian product of `defense.<name>.field=v1,v2` groups) on the run's trusted set,
scores each defended model on `--heldout` held-out training images, and picks the setting with
Pick your Poison's rule: lowest held-out ASR among those whose held-out ACC is at most
`--max_acc_drop` below the suspect model's (ties: higher ACC). The held-out images are
`--heldout` of the trusted images (default: a third), the defense running on the others
(`--heldout_from=trusted`, the default and the paper's way: no clean image beyond the defender's
budget), or training images outside the `data.train_limit` subset (`--heldout_from=outside`,
default 2,000; more clean images than the budget). Test data is never read. Prints a table and
writes DIR/selection.json (`jaxbd.experiments.selection`). Exit status 1 when no setting is
eligible; bad input is one line `jaxbd: error: ...` with exit status 2.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from jaxbd import cli
from jaxbd import main as run_command
from jaxbd import sweep
from jaxbd.errors import ConfigError

_DEFENSE = flags.DEFINE_string("defense", None, "The defense to tune (ft, d3, pt, fine_pruning).")
_HELDOUT = flags.DEFINE_integer(
    "heldout", None, "Held-out training images (default: a third of the trusted set with "
    "--heldout_from=trusted, 2000 with outside).")
_HELDOUT_FROM = flags.DEFINE_enum(
    "heldout_from", "trusted", ["trusted", "outside"],
    "Where the held-out images come from: a part of the trusted set (the defense then runs on "
    "the rest), or training images outside the data.train_limit subset.")
_MAX_ACC_DROP = flags.DEFINE_float("max_acc_drop", 0.03,
                                   "Largest held-out ACC loss a setting may cost.")


def main() -> None:
  """Runs the selection; exit status 1 when no setting is eligible."""
  from jaxbd.experiments import selection  # pylint: disable=g-import-not-at-top
  if not _DEFENSE.value or not sweep.grid_value():
    raise ConfigError("--defense and --grid are required")
  config = run_command.config_value()
  workdir = run_command.workdir_value()
  doc = selection.select(config, workdir, _DEFENSE.value,
                         sweep.parse_grid(sweep.grid_value(), config),
                         heldout=_HELDOUT.value, heldout_from=_HELDOUT_FROM.value,
                         max_acc_drop=_MAX_ACC_DROP.value)
  print(selection.table(doc))
  print(f"selection: {os.path.join(workdir, 'selection.json')}")
  if doc["chosen"] is None:
    print(f"selection: no setting keeps held-out ACC within {_MAX_ACC_DROP.value} of the "
          "suspect model's", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, flags_parser=run_command.parse_flags)
