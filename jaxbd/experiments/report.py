"""Markdown tables generated from `results.json` files (never typed by hand).

`defense_table(docs)` lays out one row per run (attack) and, per model, ACC / ASR in percent, with
DER for defenses: the layout of the D3 paper's tables, e.g.

| attack | no defense | ft | d3 |
|---|---|---|---|
| badnets | 91.32 / 95.03 | 89.96 / 1.48 (96.09) | 90.77 / 0.74 (96.87) |
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from jaxbd.experiments.results import markdown_table


def load(workdirs: Iterable[str]) -> list[dict]:
  """The results documents of run directories (or results.json paths)."""
  docs = []
  for path in workdirs:
    if os.path.isdir(path):
      path = os.path.join(path, "results.json")
    with open(path) as f:
      docs.append(json.load(f))
  return docs


def cell(m: dict | None, der: bool = False) -> str:
  """"ACC / ASR" in percent, with " (DER)" for defenses; empty when missing."""
  if not m:
    return ""
  text = f"{100 * m['acc']:.2f} / {100 * m['asr']:.2f}" if "asr" in m else f"{100 * m['acc']:.2f}"
  if der and "der" in m:
    text += f" ({100 * m['der']:.2f})"
  return text


def defense_table(docs: Sequence[dict]) -> str:
  """One row per run: attack, the backdoored model and each defense (ACC / ASR (DER), %)."""
  defenses = []
  for doc in docs:
    defenses += [d for d in doc.get("defenses", {}) if d not in defenses]
  rows = []
  for doc in docs:
    attack = doc["attack"]["name"]
    if doc["attack"].get("training_attack"):
      attack += f" ({doc['attack']['training_attack']['name']})"
    rows.append([attack, cell(doc["metrics"].get("backdoored")),
                 *(cell(doc["defenses"].get(d), der=True) for d in defenses)])
  return markdown_table(["attack", "no defense", *defenses], rows)
