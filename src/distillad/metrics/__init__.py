"""Metrics anomalib lacks or computes wrongly on raw scores."""

from distillad.metrics.ranking import RawScoreAUROC, aupro, auroc, f1_max, rank_normalize

__all__ = ["RawScoreAUROC", "aupro", "auroc", "f1_max", "rank_normalize"]
