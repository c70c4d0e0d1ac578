"""Anomaly synthesis: Perlin masks, texture sources, foregrounds (GrabCut / threshold) and their cache.

DRAEM-style synthetic anomalies restricted to the object's foreground, as used by DMDD (Sec. 3.4.1,
Foreground-aware Anomaly Synthesis) and AAND (pseudo-anomaly masks = Perlin mask intersected with a
grayscale-threshold foreground), in the training step or in DataLoader workers (:mod:`.workers`). See
DESIGN.md "Anomaly synthesis".
"""

from distillad.synthesis.foreground import (
    FOREGROUND_MODES,
    MAX_FRACTION,
    MIN_FRACTION,
    ForegroundCache,
    compute_foreground,
    grabcut_foreground,
    otsu_separability,
    texture_or_object,
    threshold_foreground,
    to_uint8_rgb,
    whole_image,
)
from distillad.synthesis.perlin import perlin_mask, perlin_noise, random_ellipse_mask
from distillad.synthesis.synthesizer import AnomalySynthesizer, SynthesisResult
from distillad.synthesis.textures import (
    PROCEDURAL_TEXTURES,
    BuiltinTextures,
    FolderTextures,
    TextureSource,
    make_texture_source,
)
from distillad.synthesis.workers import (
    KeyedDataset,
    SynthesisBatchSampler,
    SynthesisKey,
    SynthesisPlan,
    SynthesizingCollate,
    WorkerSynthesis,
    take_synthesis,
)

__all__ = [
    "FOREGROUND_MODES",
    "MAX_FRACTION",
    "MIN_FRACTION",
    "PROCEDURAL_TEXTURES",
    "AnomalySynthesizer",
    "BuiltinTextures",
    "FolderTextures",
    "ForegroundCache",
    "KeyedDataset",
    "SynthesisBatchSampler",
    "SynthesisKey",
    "SynthesisPlan",
    "SynthesisResult",
    "SynthesizingCollate",
    "TextureSource",
    "WorkerSynthesis",
    "compute_foreground",
    "grabcut_foreground",
    "make_texture_source",
    "otsu_separability",
    "perlin_mask",
    "perlin_noise",
    "random_ellipse_mask",
    "take_synthesis",
    "texture_or_object",
    "threshold_foreground",
    "to_uint8_rgb",
    "whole_image",
]
