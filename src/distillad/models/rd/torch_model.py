"""Reverse Distillation (Deng & Li, CVPR 2022) for any timm encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from distillad.backbones import create_encoder
from distillad.components import FrozenFeatureCache, MirrorDecoder, MultiScaleAnomalyMap, OneClassBottleneck, block_family
from distillad.models.base import channels_last, float32_teacher, frozen, image_score, keep_frozen_in_eval


class ReverseDistillationModel(nn.Module):
    """Frozen teacher encoder -> one-class bottleneck -> student decoder that mirrors the teacher.

    The teacher's stages 1-3 (strides 4, 8, 16) are distilled; the OCBE embedding has the teacher's
    stage-4 width. Training returns ``(teacher_features, student_features)``; evaluation returns an
    ``InferenceBatch`` with the Gaussian-smoothed sum of the three cosine-distance maps and its maximum.

    Args:
        backbone: timm encoder name.
        pretrained: Load pretrained teacher weights (offline-first; see :mod:`distillad.backbones`).
        weights: Explicit teacher weights file.
        sigma: Gaussian smoothing of the anomaly map (4 in the paper).
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", pretrained: bool = True,
                 weights: str | Path | None = None, sigma: float = 4.0) -> None:
        super().__init__()
        self.encoder = frozen(create_encoder(backbone, pretrained=pretrained, weights=weights))
        family = block_family(self.encoder)
        channels = self.encoder.channels
        self.bottleneck = OneClassBottleneck(channels[:3], channels[3], family)
        self.decoder = MirrorDecoder(channels[3], channels[:3], family)
        self.anomaly_map = MultiScaleAnomalyMap(sigma)
        self.teacher_cache = FrozenFeatureCache()  # training images repeat every epoch; not in the state dict
        channels_last(self)

    def train(self, mode: bool = True) -> ReverseDistillationModel:
        keep_frozen_in_eval(self, mode, [self.encoder])
        return self

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's stage 1-3 features."""
        return float32_teacher(self.encoder, images)[:3]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        with torch.no_grad():
            teacher = self.teacher_cache(self.encode, images) if self.training else self.encode(images)
        student = self.decoder(self.bottleneck(teacher))
        if self.training:
            return teacher, student
        anomaly_map = self.anomaly_map(teacher, student, images.shape[-2:])
        return InferenceBatch(pred_score=image_score(anomaly_map), anomaly_map=anomaly_map)
