"""Metrics anomalib lacks or computes wrongly on raw scores."""

from distillad.metrics.ranking import RawScoreAUROC, aupro, auroc, f1_max, pro_curve, rank_normalize, roc_curve
from distillad.metrics.spro import (
    DefectConfig,
    SaturatedRegion,
    auspro,
    auspro_per_group,
    load_defects_config,
    loco_regions,
    mvtec_loco_metrics,
    mvtec_loco_spro,
    spro_curve,
)

__all__ = [
    "DefectConfig",
    "RawScoreAUROC",
    "SaturatedRegion",
    "aupro",
    "auroc",
    "auspro",
    "auspro_per_group",
    "f1_max",
    "load_defects_config",
    "loco_regions",
    "mvtec_loco_metrics",
    "mvtec_loco_spro",
    "pro_curve",
    "rank_normalize",
    "roc_curve",
    "spro_curve",
]
