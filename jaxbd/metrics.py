"""Metrics with BackdoorBench's definitions, on host numpy arrays.

- ACC: accuracy on the clean test set.
- ASR: among triggered test images whose true label is not the attack's target, the fraction
  classified as the target.
- RA: accuracy of those triggered images on their true labels.
- DER: [max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1] / 2.
- Target rate: among images whose true label is not the target, the fraction predicted as the
  target (a behavior backdoor's effect without an input trigger).
- Behavior ASR (QB, arXiv 2412.01369): among non-target images, the fraction where the float model
  is right AND the quantized model predicts the target.
- ROC AUC: area under the ROC curve of detection scores (higher = more suspicious).
- Routing statistics of patch-routed MoE layers (BadPatches): how often each expert selects each
  patch position on clean and on triggered images, and whether the patches a trigger covers are
  routed to an expert at all.
All metrics are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of pred == labels.  pred, labels: int[M]."""
  pred, labels = np.asarray(pred), np.asarray(labels)
  if pred.shape != labels.shape:
    raise ValueError(f"pred {pred.shape} and labels {labels.shape} differ in shape")
  return float(np.mean(pred == labels)) if len(labels) else float("nan")


def non_target_mask(labels: np.ndarray, target_labels: np.ndarray) -> np.ndarray:
  """bool[M]: the test images an ASR counts (true label differs from the attack's label)."""
  return np.asarray(labels) != np.asarray(target_labels)


def attack_success_rate(pred: np.ndarray, labels: np.ndarray,
                        target_labels: np.ndarray) -> float:
  """ASR over triggered images whose true label is not their target.

  Args:
    pred: int[M] predictions on triggered images.
    labels: int[M] true labels.
    target_labels: int[M] the label the attack wants for each image (all-to-one: constant).
  """
  keep = non_target_mask(labels, target_labels)
  return accuracy(np.asarray(pred)[keep], np.asarray(target_labels)[keep])


def robust_accuracy(pred: np.ndarray, labels: np.ndarray, target_labels: np.ndarray) -> float:
  """Accuracy on true labels over the same triggered, non-target images as the ASR.

  pred, labels, target_labels: int[M] (predictions on triggered images, true and attack labels).
  """
  keep = non_target_mask(labels, target_labels)
  return accuracy(np.asarray(pred)[keep], np.asarray(labels)[keep])


def target_rate(pred: np.ndarray, labels: np.ndarray, target: int) -> float:
  """Fraction of images with true label != target predicted as target.  pred, labels: int[M]."""
  return attack_success_rate(pred, labels, np.full(np.shape(labels), target))


def behavior_attack_success_rate(pred_fp: np.ndarray, pred_q: np.ndarray, labels: np.ndarray,
                                 target: int) -> float:
  """QB's ASR over images with true label != target: float right and quantized says target.

  Args:
    pred_fp: int[M] predictions of the float model.
    pred_q: int[M] predictions of the quantized model on the same images.
    labels: int[M] true labels.
    target: target class.
  """
  pred_fp, pred_q, labels = np.asarray(pred_fp), np.asarray(pred_q), np.asarray(labels)
  keep = labels != target
  hits = (pred_fp == labels) & (pred_q == target)
  return float(np.mean(hits[keep])) if keep.any() else float("nan")


def defense_effectiveness_rating(acc_bd: float, asr_bd: float, acc_def: float,
                                 asr_def: float) -> float:
  """DER = [max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1] / 2, in [0, 1]; NaN when
  an input is NaN (e.g. an ASR over no non-target images), which Python's `max` would drop."""
  gain, loss = float(np.maximum(0.0, asr_bd - asr_def)), float(np.maximum(0.0, acc_bd - acc_def))
  return (gain - loss + 1.0) / 2.0


def as_scores(values: Sequence[Optional[float]]) -> np.ndarray:
  """f64[M]: scores as results.json holds them, None (how it writes NaN and inf) as NaN."""
  return np.array([np.nan if v is None else v for v in values], np.float64)


def finite_part(values: Sequence[Optional[float]],
                positive: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
  """(f64[K] scores, bool[K] labels): the K of M models whose score (`as_scores`) is finite, for
  `roc_curve` and `roc_auc`, which refuse any other."""
  scores = as_scores(values)
  finite = np.isfinite(scores)
  return scores[finite], np.asarray(positive, bool)[finite]


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """False and true positive rates at every threshold (scores >= t flagged), from (0,0) to (1,1).

  Args:
    scores: f[M], higher = more likely positive (e.g. backdoored).
    positive: bool[M] ground truth.
  """
  scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
  if scores.ndim != 1 or scores.shape != positive.shape:
    raise ValueError(f"ROC needs one score per model: scores {scores.shape}, labels "
                     f"{positive.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"ROC scores must be finite, got {scores.tolist()}")
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError("ROC needs at least one positive and one negative")
  order = np.argsort(-scores, kind="stable")
  s, p = scores[order], positive[order]
  # One point per distinct threshold: ties move together.
  last_of_tie = np.r_[s[1:] != s[:-1], True]
  tp, fp = np.cumsum(p)[last_of_tie], np.cumsum(~p)[last_of_tie]
  return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve of f[N] `scores` for bool[N] `positive` (ties count one half),
  in [0, 1]."""
  fpr, tpr = roc_curve(scores, positive)
  # Trapezoids between the curve's points: a tie group is one straight segment, worth one half.
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def routing_statistics(clean: np.ndarray, triggered: np.ndarray,
                       covered: np.ndarray) -> dict[str, list | float]:
  """Selection rates of one MoE layer on clean images and their triggered versions.

  Args:
    clean: bool[N, S, E] expert e selects position s of clean image i.
    triggered: bool[N, S, E] the same on the triggered images.
    covered: bool[N, S] the positions the trigger covers in image i.

  Returns:
    clean_rate / triggered_rate: [E][S] fraction of images where expert e selects position s.
    trigger_routed / trigger_routed_clean: fraction of trigger-covered positions selected by >= 1
      expert on triggered images / at the same positions of the clean images.
    trigger_per_expert / trigger_per_expert_clean: [E] fraction of covered positions that expert
      e selects (for token choice: which experts the trigger tokens go to).
    trigger_experts / trigger_experts_clean: mean number of experts per covered position.
    routed / routed_clean: fraction of all positions selected by >= 1 expert.
  """
  clean, triggered = np.asarray(clean, bool), np.asarray(triggered, bool)
  covered = np.asarray(covered, bool)
  if clean.shape != triggered.shape or clean.shape[:2] != covered.shape:
    raise ValueError(f"clean {clean.shape}, triggered {triggered.shape} and covered "
                     f"{covered.shape} do not match ([N, S, E], [N, S, E], [N, S])")
  out = {}
  for name, sel in (("", triggered), ("_clean", clean)):
    at_trigger = sel[covered]  # [P, E]
    out["trigger_routed" + name] = float(np.mean(at_trigger.any(-1))) if len(at_trigger) else 0.0
    out["trigger_per_expert" + name] = (at_trigger.mean(0) if len(at_trigger) else
                                        np.zeros(sel.shape[-1])).tolist()
    out["trigger_experts" + name] = float(at_trigger.sum(-1).mean()) if len(at_trigger) else 0.0
    out["routed" + name] = float(np.mean(sel.any(-1)))
  out["clean_rate"] = clean.mean(0).T.tolist()
  out["triggered_rate"] = triggered.mean(0).T.tolist()
  return out
