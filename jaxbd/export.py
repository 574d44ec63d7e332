r"""`python -m jaxbd.export`: a standard run's trained model as a BackdoorBench attack result.

  python -m jaxbd.export --workdir=/runs/d3_badnets --out=/runs/d3_badnets.pt
  python -m jaxbd.export --workdir=/runs/d3_badnets --phase=clean --out=/runs/clean.pt

Writes the final checkpoint of `--phase` (`backdoored` by default, or `clean`) of the
PreAct-ResNet18 run in `--workdir` as a BackdoorBench-style `torch.save` file (state_dict, the
poisoned rows of the whole training split, the run's input normalization; needs the `[torch]`
extra): see `jaxbd.interop.export`. Bad input is one line `jaxbd: error: ...` with exit status
2, and nothing is written.
"""

from __future__ import annotations

from absl import flags

from jaxbd import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory of a standard experiment.")
_PHASE = flags.DEFINE_enum("phase", "backdoored", ["backdoored", "clean"],
                           "The trained model to export.")
_OUT = flags.DEFINE_string("out", None, "The .pt file to write.")


def main() -> None:
  """Exports --phase of the run in --workdir to --out."""
  from jaxbd.interop import export  # pylint: disable=g-import-not-at-top
  s = export.export_run(_WORKDIR.value, _PHASE.value, _OUT.value)
  rows = "" if s["poisoned"] is None else (f", {s['poisoned']} of the {s['train_split']} "
                                           "training rows marked poisoned")
  print(f"export: {s['out']} ({s['model']}, {s['num_classes']} classes, {s['img_size']} "
        f"images{rows})")


if __name__ == "__main__":
  cli.run(main, interrupted="interrupted")
