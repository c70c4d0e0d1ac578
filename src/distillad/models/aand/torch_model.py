"""AAND: Anomaly Amplification and Normality Distillation (Tang et al.), as a plain ``nn.Module``.

The teacher is the frozen pretrained encoder (levels 1-3, strides 4, 8, 16). Beside each level sits a
Residual Anomaly Amplification module (RAA, Sec. III-B, Fig. 3) that turns the vanilla feature F_T into
the advanced feature

    F_A = F_T + w * Delta                                                        (Eq. 1)

where the matching-guided residual gate (MRG, Eq. 2-4) predicts the anomaly weight w in [0, 1] and the
attribute-scaling residual generator (ARG, Eq. 5) produces Delta = tanh(MLP(F_T)) * F_T. The RAA modules
are side branches: F_A is an output only and the next teacher stage takes the original F_T (the
authors' public code, ``resnet_rar.py``). A reverse-distillation student (OCBE bottleneck + mirror
decoder) reconstructs F_A (Sec. III-C); the anomaly map is the sum of the upsampled per-level cosine
distances (Eq. 13-14).

Choices where the paper is silent (taken from the authors' public code unless said otherwise):

- MLPs Phi_theta1 / Phi_theta2: three 1x1 convolutions C -> H -> H -> C with ReLU, H = min(2C, 1024).
- Position encoding p_c: the 2-D sinusoidal encoding of CFlow (anomalib's ``positional_encoding_2d``),
  for channel counts not divisible by 4 computed for the next multiple of 4 and truncated.
- Memory items: ``L`` normal and ``L`` anomaly embeddings initialised from N(0, 1).
- Softmax temperature 0.2 on the cosine similarities of Eq. 3 (the equation has none, i.e. 1). With
  temperature 1 the gate cannot leave [0.12, 0.88] (cosines lie in [-1, 1]), so normal patches would
  always receive at least 12 % of the residual, against the paper's intent of suppressing it.
- The pseudo-anomaly mask is downsampled to a level by area averaging and binarised at 0.3
  (:data:`MASK_THRESHOLD`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from anomalib.models.image.cflow.utils import positional_encoding_2d
from torch import nn

from distillad.backbones import create_encoder
from distillad.components import (
    FrozenFeatureCache,
    MirrorDecoder,
    MultiScaleAnomalyMap,
    OneClassBottleneck,
    block_family,
    upsampled_sum,
)
from distillad.models.base import channels_last, float32_teacher, frozen, image_score, keep_frozen_in_eval

#: A level patch is anomalous when more than this fraction of its pixels lies in the pseudo-anomaly mask.
MASK_THRESHOLD = 0.3
#: Residual forms of the ARG: Eq. 5 (``tanh``), Table VII (b) (``sigmoid``), Table VII (a) (``free``).
RESIDUALS = ("tanh", "sigmoid", "free")
#: Anomaly maps: Eq. 13-14 (``distillation``) or the MRG anomaly weights alone (Table V (a), Table VI (c)).
SCORES = ("distillation", "mrg")


def downsample_mask(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The pseudo-anomaly mask M_k of a level: area-average ``mask`` (B, 1, H, W) to ``size``, threshold.

    Returns a bool (B, 1, h, w) tensor, True on anomalous patches (Sec. III-B, "subsampling the anomaly
    mask at the same scale"; threshold :data:`MASK_THRESHOLD` as in the authors' code).
    """
    return F.adaptive_avg_pool2d(mask.float(), tuple(size)) > MASK_THRESHOLD


@lru_cache(maxsize=32)
def _position_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    padded = -(-channels // 4) * 4
    return positional_encoding_2d(padded, height, width)[:channels]


def position_encoding(channels: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """2-D sinusoidal position encoding p_c (Eq. 2) of shape (1, C, H, W) on ``like``'s device and dtype."""
    return _position_encoding(channels, height, width).to(device=like.device, dtype=like.dtype).unsqueeze(0)


def projection_mlp(channels: int) -> nn.Sequential:
    """Phi_theta (Eq. 2 and 5): 1x1 convolutions C -> H -> H -> C with ReLU, H = min(2C, 1024)."""
    hidden = min(2 * channels, 1024)
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1),
    )


class MatchingResidualGate(nn.Module):
    """MRG (Sec. III-B1): anomaly weight w = summed softmax weights of the anomaly memory items.

    q_i = Phi_theta1(F_T^i + p_c^i) (Eq. 2); cosine similarities of q_i to L normal and L anomaly
    memory items, one softmax over all 2L (Eq. 3); w_i = sum of the L anomaly weights (Eq. 4).

    Args:
        channels: Feature channels C of the level.
        memory_items: L, items in each of the two memories (50 in the paper).
        temperature: Divides the cosine similarities before the softmax (see the module docstring).
    """

    def __init__(self, channels: int, memory_items: int = 50, temperature: float = 0.2) -> None:
        super().__init__()
        if memory_items < 1:
            msg = f"memory_items must be at least 1, got {memory_items}"
            raise ValueError(msg)
        if temperature <= 0:
            msg = f"temperature must be positive, got {temperature}"
            raise ValueError(msg)
        self.query = projection_mlp(channels)
        self.normal_memory = nn.Parameter(torch.randn(memory_items, channels))
        self.anomaly_memory = nn.Parameter(torch.randn(memory_items, channels))
        self.temperature = temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Anomaly weights (B, 1, H, W) in [0, 1] for vanilla features (B, C, H, W)."""
        _, channels, height, width = features.shape
        query = F.normalize(self.query(features + position_encoding(channels, height, width, features)), dim=1)
        memory = F.normalize(torch.cat([self.normal_memory, self.anomaly_memory]), dim=1)
        similarity = torch.einsum("bchw,mc->bmhw", query, memory)
        weights = torch.softmax(similarity / self.temperature, dim=1)
        return weights[:, len(self.normal_memory):].sum(dim=1, keepdim=True)


class AttributeScalingResidualGenerator(nn.Module):
    """ARG (Sec. III-B2): Delta = tanh(Phi_theta2(F_T)) * F_T (Eq. 5).

    Args:
        channels: Feature channels C of the level.
        residual: ``tanh`` (Eq. 5), ``sigmoid`` (Table VII (b): channel weights in (0, 1)) or ``free``
            (Table VII (a): Delta = Phi_theta2(F_T), a learnable residual without scale restriction).
    """

    def __init__(self, channels: int, residual: str = "tanh") -> None:
        super().__init__()
        if residual not in RESIDUALS:
            msg = f"unknown residual '{residual}'; use one of {', '.join(RESIDUALS)}"
            raise ValueError(msg)
        self.projection = projection_mlp(channels)
        self.residual = residual

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The residual Delta (B, C, H, W) for vanilla features (B, C, H, W)."""
        projected = self.projection(features)
        if self.residual == "free":
            return projected
        scale = torch.tanh(projected) if self.residual == "tanh" else torch.sigmoid(projected)
        return scale * features


class AmplifiedFeatures(NamedTuple):
    """What one RAA module produces for a level."""

    amplified: torch.Tensor
    """F_A = F_T + w * Delta (Eq. 1; Eq. 6 when ground-truth weights are applied), (B, C, H, W)."""
    gate: torch.Tensor | None
    """The MRG's predicted anomaly weights (B, 1, H, W), or ``None`` without a gate."""
    residual: torch.Tensor
    """Delta (B, C, H, W) before gating."""


class ResidualAnomalyAmplification(nn.Module):
    """RAA (Fig. 3): MRG + ARG beside one teacher level.

    Args:
        channels: Feature channels C of the level.
        memory_items: L of the MRG.
        temperature: Softmax temperature of the MRG.
        gate: Use the MRG; ``False`` is Table V (b), residuals added everywhere (w = 1).
        residual: ARG form, see :class:`AttributeScalingResidualGenerator`.
    """

    def __init__(self, channels: int, memory_items: int = 50, temperature: float = 0.2, gate: bool = True,
                 residual: str = "tanh") -> None:
        super().__init__()
        self.gate = MatchingResidualGate(channels, memory_items, temperature) if gate else None
        self.generator = AttributeScalingResidualGenerator(channels, residual)

    def forward(self, features: torch.Tensor, weights: torch.Tensor | None = None) -> AmplifiedFeatures:
        """Amplify vanilla ``features`` (B, C, H, W).

        ``weights`` (B, 1, H, W), the ground-truth anomaly weights, replace the predicted ones in Eq. 1
        during stage-1 training (Eq. 6); otherwise the gate's prediction is used (1 without a gate).
        """
        predicted = self.gate(features) if self.gate is not None else None
        residual = self.generator(features)
        if weights is None:
            weights = predicted if predicted is not None else torch.ones_like(features[:, :1])
        return AmplifiedFeatures(features + weights * residual, predicted, residual)


class AANDModel(nn.Module):
    """Frozen teacher + RAA side branches (the advanced teacher) -> OCBE bottleneck -> mirror decoder.

    Training (stage 2) returns ``(advanced_teacher_features, student_features)``; evaluation returns an
    ``InferenceBatch`` with the Gaussian-smoothed sum of the three cosine-distance maps (Eq. 13-14) and
    its maximum. Stage 1 uses :meth:`amplify` with ground-truth weights.

    Args:
        backbone: timm encoder name.
        pretrained: Load pretrained teacher weights (offline-first; see :mod:`distillad.backbones`).
        weights: Explicit teacher weights file.
        amplify: Build the RAA modules; ``False`` leaves the vanilla teacher (RD, Table V base / (d)).
        memory_items: L of each MRG.
        temperature: Softmax temperature of each MRG.
        gate: Use the MRG (``False``: Table V (b)).
        residual: ARG form (``tanh``, ``sigmoid``, ``free``; Table VII).
        score: ``distillation`` (Eq. 13-14) or ``mrg`` (Table V (a): the mean of the upsampled MRG
            weights of the three levels, smoothed like the distillation map).
        sigma: Gaussian smoothing of the anomaly map (4, as RD and the authors' evaluation code).
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", pretrained: bool = True,
                 weights: str | Path | None = None, amplify: bool = True, memory_items: int = 50,
                 temperature: float = 0.2, gate: bool = True, residual: str = "tanh", score: str = "distillation",
                 sigma: float = 4.0) -> None:
        super().__init__()
        if score not in SCORES:
            msg = f"unknown score '{score}'; use one of {', '.join(SCORES)}"
            raise ValueError(msg)
        if score == "mrg" and not (amplify and gate):
            msg = "score='mrg' needs the RAA modules with their gate (stage1_epochs > 0 and gate=True)"
            raise ValueError(msg)
        self.encoder = frozen(create_encoder(backbone, pretrained=pretrained, weights=weights))
        family = block_family(self.encoder)
        channels = self.encoder.channels
        self.raa = nn.ModuleList(
            ResidualAnomalyAmplification(c, memory_items, temperature, gate, residual) for c in channels[:3]
        ) if amplify else None
        self.bottleneck = OneClassBottleneck(channels[:3], channels[3], family)
        self.decoder = MirrorDecoder(channels[3], channels[:3], family)
        self.anomaly_map = MultiScaleAnomalyMap(sigma)
        self.score = score
        # Stage 2 encodes the same normal images every epoch (the RAA modules run on top, uncached: they trained
        # in stage 1). Not in the state dict.
        self.teacher_cache = FrozenFeatureCache()
        channels_last(self)

    def train(self, mode: bool = True) -> AANDModel:
        keep_frozen_in_eval(self, mode, [self.encoder])
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Vanilla teacher features F_T of levels 1-3 for images in [0, 1]."""
        return float32_teacher(self.encoder, images)[:3]

    def amplify(self, features: list[torch.Tensor],
                masks: list[torch.Tensor] | None = None) -> list[AmplifiedFeatures]:
        """Run the RAA modules on vanilla ``features``; ``masks`` (per level, (B, 1, h, w)) are ground-truth
        anomaly weights that replace the predicted ones (Eq. 6)."""
        if self.raa is None:
            msg = "this AAND model has no RAA modules (built with amplify=False)"
            raise RuntimeError(msg)
        masks = masks if masks is not None else [None] * len(features)
        return [module(f, m) for module, f, m in zip(self.raa, features, masks, strict=True)]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        features = self.teacher_cache(self.encode, images) if self.training else self.encode(images)
        outputs = None
        if self.raa is not None:
            # The advanced teacher is fixed after stage 1 (Algorithm 1, line 10); in float32 like the vanilla one
            # (models.base.float32_teacher), so that the student learns the features inference compares it with.
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                outputs = self.amplify(features)
            features = [output.amplified for output in outputs]
        if self.score == "mrg" and not self.training:
            anomaly_map = self._gate_map([output.gate for output in outputs], images.shape[-2:])
            return InferenceBatch(pred_score=image_score(anomaly_map), anomaly_map=anomaly_map)
        student = self.decoder(self.bottleneck(features))
        if self.training:
            return features, student
        anomaly_map = self.anomaly_map(features, student, images.shape[-2:])
        return InferenceBatch(pred_score=image_score(anomaly_map), anomaly_map=anomaly_map)

    def _gate_map(self, gates: list[torch.Tensor], image_size: torch.Size) -> torch.Tensor:
        return self.anomaly_map.blur(upsampled_sum(gates, image_size) / len(gates))
