"""Plots drawn from results documents (`results.json`), never from live state.

- `routing_heatmaps`: per expert, how often each patch position is selected on clean vs on
  triggered images (one figure per model and MoE layer).
- `asr_vs_rate`: ASR (and ACC) against the poisoning rate, one line per attack (with mean +- std
  error bars over seeds when the rows carry them).
- `prune_sweep`: ACC and ASR of the pruned-only models against the fraction of channels pruned.
- `defense_tradeoff`: ACC against ASR, an arrow from each attacked model to each of its defended
  models, one color per defense.
- `roc_curves`: the detection experiment's ROC curves of each detector's suspicion scores.
- `from_results(path)`: the per-run plots (routing, rate sweep, prune sweep, ROC) that a results
  file has data for. `python -m jaxbd.report` (`jaxbd.experiments.report`) draws them for every
  results file it finds, plus the cross-run figures.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas (no pyplot, no global
backend state) and written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np

from jaxbd import metrics
from jaxbd import fileio


def _figure(figsize: tuple[float, float]):
  """A new `matplotlib.figure.Figure` on the Agg canvas. matplotlib is imported here, on the
  first plot: it takes a third of a second, which every CLI start would pay."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str) -> str:
  with fileio.atomic_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  return path


def routing_heatmaps(stats: dict, grid: Sequence[int], title: str, path: str) -> str:
  """Selection rate per expert and position, clean (top row) vs triggered (bottom row).

  Args:
    stats: one layer's `jaxbd.metrics.routing_statistics`.
    grid: (rows, cols) of the routing positions.
    title: figure title.
    path: PNG file to write.
  """
  rows = (("clean", stats["clean_rate"]), ("triggered", stats["triggered_rate"]))
  experts = len(stats["clean_rate"])
  fig = _figure((2.2 * experts + 0.8, 4.6))
  axes = fig.subplots(2, experts, squeeze=False)
  image = None
  for r, (name, rates) in enumerate(rows):
    for e in range(experts):
      ax = axes[r, e]
      image = ax.imshow(np.asarray(rates[e]).reshape(grid), vmin=0.0, vmax=1.0, cmap="viridis")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f"expert {e}", fontsize=9)
      if e == 0:
        ax.set_ylabel(name)
  fig.colorbar(image, ax=axes, shrink=0.8, label="selection rate")
  fig.suptitle(f"{title}: trigger patches routed {stats['trigger_routed']:.2f} "
               f"(clean {stats['trigger_routed_clean']:.2f})", fontsize=10)
  return _save(fig, path)


def asr_vs_rate(sweep: Sequence[dict], path: str, title: str = "") -> str:
  """ASR (solid) and ACC (dashed) against the poisoning rate, one color per attack.

  Args:
    sweep: rows `{"attack", "rate", "acc", "asr"}`, optionally with `"acc_std"`, `"asr_std"`
      (drawn as error bars, e.g. over seeds).
    path: PNG file to write.
    title: figure title.
  """
  fig = _figure((5.5, 3.8))
  ax = fig.subplots()
  for i, attack in enumerate(dict.fromkeys(row["attack"] for row in sweep)):
    rows = sorted((r for r in sweep if r["attack"] == attack), key=lambda r: r["rate"])
    rates = [100 * r["rate"] for r in rows]
    for key, style, alpha in (("asr", "o-", 1.0), ("acc", "x--", 0.6)):
      ax.errorbar(rates, [value(r, key) for r in rows],
                  yerr=[value(r, f"{key}_std", 0.0) for r in rows],
                  fmt=style, color=f"C{i}", alpha=alpha, capsize=3,
                  label=f"{attack} {key.upper()}")
  ax.set_xscale("log")
  ticks = sorted({100 * r["rate"] for r in sweep})
  ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
  ax.minorticks_off()
  ax.set_xlabel("poisoning rate (%)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "ASR against poisoning rate", fontsize=10)
  return _save(fig, path)


def value(metrics: dict, key: str, missing: float = float("nan")) -> float:
  """`metrics[key]` for a plot: NaN (not drawn) where results.json holds null (an undefined or
  diverged metric), `missing` where the key is absent."""
  v = metrics.get(key, missing)
  return float("nan") if v is None else v


def prune_sweep(stages: dict, reference: dict, path: str) -> str:
  """ACC and ASR of the pruned-only models (`pruned@RATE` stages) against the fraction pruned.

  Args:
    stages: a defense's evaluated stages.
    reference: the undefended model's metrics (fraction 0).
    path: PNG file to write.
  """
  points = [(0.0, reference)]
  for name, m in stages.items():
    match = re.fullmatch(r"pruned@([0-9.e-]+)", name)
    if match:
      points.append((float(match.group(1)), m))
  points.sort(key=lambda p: p[0])
  fig = _figure((5, 3.6))
  ax = fig.subplots()
  for key, style in (("acc", "o-"), ("asr", "s-")):
    ax.plot([p for p, _ in points], [value(m, key) for _, m in points], style, label=key.upper())
  ax.set_xlabel("fraction of channels pruned")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("fine-pruning: pruning stage only", fontsize=10)
  return _save(fig, path)


def defense_tradeoff(runs: Sequence[dict], path: str) -> str:
  """ACC against ASR: each attacked model (black) with an arrow to each of its defended models.

  Args:
    runs: `{"label", "attacked": {"acc", "asr"}, "defenses": {name: {"acc", "asr"}}}` each.
    path: PNG file to write.
  """
  fig = _figure((5.5, 4.2))
  ax = fig.subplots()
  names = list(dict.fromkeys(name for run in runs for name in run["defenses"]))
  for run in runs:
    a = run["attacked"]
    ax.plot(a["asr"], a["acc"], "ko", ms=5)
    for name, d in run["defenses"].items():
      color = f"C{names.index(name)}"
      ax.annotate("", xy=(d["asr"], d["acc"]), xytext=(a["asr"], a["acc"]),
                  arrowprops=dict(arrowstyle="->", color=color, alpha=0.7))
      ax.plot(d["asr"], d["acc"], "s", color=color, ms=5)
  ax.plot([], [], "ko", label="attacked")
  for i, name in enumerate(names):
    ax.plot([], [], "s", color=f"C{i}", label=name)
  ax.set_xlabel("ASR")
  ax.set_ylabel("ACC")
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("defenses: accuracy against attack success", fontsize=10)
  return _save(fig, path)


def roc_curves(detection: dict, positive: Sequence[bool], path: str) -> str:
  """ROC curves of the detectors' suspicion scores.

  Args:
    detection: `{detector: {"suspicion": f[M], "auc": float}}` (results.json "detection"; a
      suspicion that is None or not finite is left out, as its AUC leaves it out).
    positive: bool[M] which models are backdoored.
    path: PNG file to write.
  """
  fig = _figure((4, 4))
  ax = fig.subplots()
  for name, d in detection.items():
    fpr, tpr = metrics.roc_curve(*metrics.finite_part(d["suspicion"], positive))
    # Straight segments between the thresholds' points: a tie group's diagonal, as the AUC has it.
    ax.plot(fpr, tpr, marker=".", label=f"{name} (AUC {d['auc']:.3f})")
  ax.plot([0, 1], [0, 1], ":", color="gray")
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.legend(loc="lower right")
  return _save(fig, path)


def from_results(path: str, outdir: str | None = None, doc: dict | None = None) -> list[str]:
  """Draws every plot a results.json has data for into `outdir` (default: beside it).

  `doc` is the parsed file when the caller has already read it.

  Returns:
    The written file names.
  """
  if doc is None:
    with open(path) as f:
      doc = json.load(f)
  outdir = outdir or os.path.dirname(os.path.abspath(path))
  written = []
  routing = doc.get("routing") or {}
  for model, layers in (routing.get("models") or {}).items():
    for layer, stats in layers.items():
      name = f"routing_{model}_{layer.replace('/', '_')}.png"
      written.append(routing_heatmaps(stats, routing["grid"], f"{model} {layer}",
                                      os.path.join(outdir, name)))
  if doc.get("sweep"):
    written.append(asr_vs_rate(doc["sweep"], os.path.join(outdir, "asr_vs_rate.png")))
  for name, defense in (doc.get("defenses") or {}).items():
    if any(s.startswith("pruned@") for s in defense.get("stages", {})):
      written.append(prune_sweep(defense["stages"], doc["metrics"]["backdoored"],
                                 os.path.join(outdir, f"{name}_sweep.png")))
  if doc.get("detection"):
    positive = [m["attack"] != "none" for m in doc["metrics"]["members"]]
    written.append(roc_curves(doc["detection"], positive, os.path.join(outdir, "roc.png")))
  return [os.path.basename(p) for p in written]
