"""Building blocks shared by several methods (RD, DSKD, AAND, DMDD)."""

from distillad.components.blocks import BlockFamily, UpsamplingResidualBlock, block_family, residual_stage
from distillad.components.bottleneck import OneClassBottleneck
from distillad.components.decoder import MirrorDecoder
from distillad.components.distance import (
    MultiScaleAnomalyMap,
    at_least_float32,
    cosine_distance_map,
    flattened_cosine_distance,
    gaussian_smoothing,
    upsampled_sum,
)
from distillad.components.feature_cache import FrozenFeatureCache

__all__ = [
    "BlockFamily",
    "FrozenFeatureCache",
    "MirrorDecoder",
    "MultiScaleAnomalyMap",
    "OneClassBottleneck",
    "UpsamplingResidualBlock",
    "at_least_float32",
    "block_family",
    "cosine_distance_map",
    "flattened_cosine_distance",
    "gaussian_smoothing",
    "residual_stage",
    "upsampled_sum",
]
