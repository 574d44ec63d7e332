r"""`python -m jaxbd.report`: markdown tables and figures from results files and a sweep store.

  python -m jaxbd.report --inputs=/runs/d3_badnets,/runs/sweeps/rates/cells \
      --store=/runs/sweeps/rates/results.sqlite --out=/runs/report
  python -m jaxbd.report --inputs=/runs --reference=configs/d3_paper.json --out=/runs/report

`--inputs` takes results.json files or directories (searched recursively for results.json),
comma-separated; `--store` a sweep's `results.sqlite` (`python -m jaxbd.sweep`). Writes
`OUT/report.md` with the per-run tables and plots, the defense table and ACC/ASR trade-off across
runs (with `--reference`, a JSON file of published numbers such as configs/d3_paper.json, each
attack's published row under its measured one), and the store's cells and ASR against poisoning
rate (mean +- std over seeds); see
`jaxbd.experiments.report`. A missing or corrupt input is one line `jaxbd: error: ...` with exit
status 2, and nothing is written: the report is drawn in a hidden folder and moved into --out only
once complete, so one that fails leaves an existing --out as it was.
"""

from __future__ import annotations

from absl import flags

from jaxbd import cli
from jaxbd.errors import ConfigError

_INPUTS = flags.DEFINE_list("inputs", [], "results.json files or directories holding them.")
_STORE = flags.DEFINE_string("store", None, "A sweep's results.sqlite.")
_OUT = flags.DEFINE_string("out", None, "Report directory (report.md and the figures).")
_REFERENCE = flags.DEFINE_string("reference", None,
                                 "Published numbers for the defense table (a JSON file).")


def main() -> None:
  """Writes the markdown tables and figures of --inputs into --out."""
  if not _OUT.value:
    raise ConfigError("--out is required")
  from jaxbd.experiments import report  # pylint: disable=g-import-not-at-top
  path = report.write_report(_INPUTS.value, _STORE.value, _OUT.value, _REFERENCE.value)
  print(f"report: {path}")


if __name__ == "__main__":
  cli.run(main, interrupted="interrupted")
