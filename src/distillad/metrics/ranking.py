"""Threshold-free metrics computed on raw anomaly scores without squashing them.

torchmetrics' binary curves (and so anomalib's ``AUROC`` and ``F1Max``) pass any prediction outside
[0, 1] through a sigmoid, decided per batch: raw distillation scores of 10-50 all saturate to 1.0
and the AUROC collapses towards 0.5, or is quietly wrong when only some batches exceed 1. Here every
prediction of the whole test set is mapped into [0, 1] by one affine, rank-preserving map before the
curve is computed, which leaves AUROC, AUPRO and F1-max exactly as defined on the raw scores.
"""

from __future__ import annotations

import torch
from anomalib.metrics import AnomalibMetric
from anomalib.metrics.aupro import _AUPRO
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_precision_recall_curve, binary_roc
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.compute import auc


def rank_normalize(values: torch.Tensor) -> torch.Tensor:
    """Map ``values`` into [0, 1] with one affine map (min -> 0, max -> 1); order and ties are kept."""
    values = values.double()
    low, high = values.min(), values.max()
    if high <= low:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def auroc(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve of raw ``predictions`` (any range) against binary ``targets``."""
    targets = targets.flatten().long()
    if targets.min() == targets.max():
        return float("nan")
    return float(binary_auroc(rank_normalize(predictions.flatten()), targets, thresholds=None))


def f1_max(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Best F1 over all thresholds and the raw-score threshold that reaches it."""
    predictions, targets = predictions.flatten().double(), targets.flatten().long()
    normalized = rank_normalize(predictions)
    precision, recall, thresholds = binary_precision_recall_curve(normalized, targets, thresholds=None)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    best = int(torch.argmax(f1[:-1]))
    low, high = predictions.min(), predictions.max()
    return float(f1[best]), float(low + thresholds[best] * (high - low))


def roc_curve(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """False- and true-positive rates of raw ``predictions`` over all thresholds (the curve :func:`auroc` integrates)."""
    fpr, tpr, _ = binary_roc(rank_normalize(predictions.flatten()), targets.flatten().long(), thresholds=None)
    return fpr, tpr


def pro_curve(anomaly_maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-region overlap against the pixel false-positive rate, up to ``fpr_limit`` (anomalib's PRO curve)."""
    metric = _AUPRO(fpr_limit=fpr_limit)
    metric.update(anomaly_maps.squeeze(1).float(), masks.squeeze(1).long())
    return metric._compute()


def aupro(anomaly_maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (anomalib's rank-based AUPRO)."""
    if masks.sum() == 0:
        return float("nan")
    fpr, pro = pro_curve(anomaly_maps, masks, fpr_limit)
    return float(auc(fpr, pro, reorder=True) / fpr[-1])


class _RawScoreAUROC(Metric):
    """AUROC that keeps raw predictions until ``compute`` and ranks them there (see module docstring)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds.detach().flatten().cpu())
        self.target.append(target.detach().flatten().cpu())

    def compute(self) -> torch.Tensor:
        return torch.tensor(auroc(dim_zero_cat(self.preds), dim_zero_cat(self.target)))


class RawScoreAUROC(AnomalibMetric, _RawScoreAUROC):
    """anomalib-compatible AUROC on raw scores: ``RawScoreAUROC(fields=["pred_score", "gt_label"], prefix="image_")``."""
