"""AAND: two-stage Anomaly Amplification and Normality Distillation (Tang et al.)."""

from distillad.models.aand.analysis import ResidualIntensity, residual_intensity
from distillad.models.aand.lightning_model import AAND
from distillad.models.aand.torch_model import (
    AANDModel,
    AttributeScalingResidualGenerator,
    MatchingResidualGate,
    ResidualAnomalyAmplification,
)

__all__ = [
    "AAND",
    "AANDModel",
    "AttributeScalingResidualGenerator",
    "MatchingResidualGate",
    "ResidualAnomalyAmplification",
    "ResidualIntensity",
    "residual_intensity",
]
