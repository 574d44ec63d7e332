r"""Prints the markdown table (ACC / ASR (DER) in %) of finished runs from their results.json.

  python scripts/results_table.py /runs/d3_badnets /runs/d3_blended /runs/d3_wanet /runs/d3_sig
"""

import sys

from jaxbd.experiments import report


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    sys.exit("usage: python scripts/results_table.py WORKDIR [WORKDIR ...]")
  print(report.defense_table(report.load(argv[1:])))


if __name__ == "__main__":
  main(sys.argv)
