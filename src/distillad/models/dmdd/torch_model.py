"""Dual-Modeling Decouple Distillation (Liu et al., ACM MM 2024): the torch model.

Three parts (paper Fig. 2):

- :class:`DecoupledStudent` (Sec. 3.2): a trainable copy of the teacher's four stages; after each stage
  a 1x1 convolution doubles the channels and splits them into a normality feature N_i and an
  abnormality feature A_i; N_i feeds stage i+1.
- :class:`PyramidModelingNetwork` (Sec. 3.2, Fig. 4): the normality branch is refined top-down-top
  (inner top-down path, outer bottom-up path), the abnormality branch down-top-down (inner bottom-up,
  outer top-down). Inner and outer paths are separate switches (Table 4).
- :class:`MultiPerceptionSegmentationNetwork` (Sec. 3.4.2, Fig. 6): fuses the 8 cosine-distance maps
  (4 NGM + 4 AIM) with Pyramid Upsampling and the Multi-perception Mechanism into a probability map M
  and the score S = mean of the 100 largest values of M.

Choices where the paper is silent (measured in ``benchmarks/results/dmdd_mtd.md``):

- The decoupling convolutions start as stacked identities and the PMN fusion convolutions start at
  zero, so an untrained student reproduces the teacher exactly (N_i = F_i^T) and training starts
  from the pretrained representation the paper relies on ("the same capacity") instead of from a
  random projection between stages. The abnormality half gets Gaussian noise of standard deviation
  :data:`ABNORMALITY_INIT_NOISE` / sqrt(C) on top (about a 0.1 relative change of A_i): an exact copy sits at the
  minimum of the cosine distance, where L_AIM's gradient vanishes (measured on 8 mtd pairs at 128 px: 1e-8 for
  the abnormality weights of every stage, 2e-2 with the noise) although AIM must push A_i away from F_i^T
  inside anomalies.
- PMN fuses by addition after a 1x1 convolution + bilinear upsampling (top-down) or a strided 3x3
  convolution (bottom-up). Pyramid Upsampling fuses the one-channel maps by addition without weights.
- The global attention parameter G has one weight per map channel and output pixel; the weighted
  channel average and the channel compression are one 1x1 convolution over G * x, initialised as the
  plain average.
- The student's BatchNorm layers keep the teacher's running statistics (eval mode; their affine
  parameters train), so that the student starts as the teacher and train and test see the same
  normalisation; in train mode the first mtd batch gave L_NGM 1.23 instead of 0.24.
- The MSN's output bias starts at the log-odds of :data:`ANOMALY_PRIOR` (the prior-probability
  initialisation of Lin et al., 2017), so M starts near the share of anomalous pixels. Starting at
  p = 0.5, the many normal pixels dominate the first BCE gradients and Adam's fixed-size steps drove
  the spatial attention negative (weights summing to -2.3 after 10 steps), which inverted the maps:
  pixel AUROC 0.40 on real mtd defects against 0.66 before the attention; with the prior 0.65.
- With the MSN switched off (Table 5 "w/o MSN") the map is the plain sum of the upsampled maps,
  smoothed with a Gaussian (sigma 4, as RD) and the score is its maximum.
"""

from __future__ import annotations

import copy
import math
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from torch import nn

from distillad.backbones import create_encoder
from distillad.components import (
    FrozenFeatureCache,
    at_least_float32,
    cosine_distance_map,
    gaussian_smoothing,
    upsampled_sum,
)
from distillad.models.base import channels_last, float32_teacher, frozen, image_score, keep_frozen_in_eval

BRANCHES = {"normality": ("normality",), "abnormality": ("abnormality",), "both": ("normality", "abnormality")}
# Fig. 4: each branch's (inner, outer) path directions.
PMN_DIRECTIONS = {"normality": ("top_down", "bottom_up"), "abnormality": ("bottom_up", "top_down")}
MAP_PREFIX = {"normality": "ngm", "abnormality": "aim"}
#: Noise on the abnormality half of the decoupling convolutions at initialisation (times 1 / sqrt(channels)).
ABNORMALITY_INIT_NOISE = 0.1
#: Initial probability of the MSN output: about the share of anomalous pixels in its training pairs (0.026 on mtd).
ANOMALY_PRIOR = 0.02


class DecoupledStudent(nn.Module):
    """Decoupled student (Sec. 3.2): teacher-initialised stages, each followed by a decoupling 1x1 conv.

    Args:
        stages: The teacher's stages (deep-copied; the copy trains).
        channels: Channels of each stage.
        branches: ``("normality", "abnormality")`` or one of them (Table 4 single-branch rows). The
            first branch's feature feeds the next stage.
    """

    def __init__(self, stages: nn.ModuleList, channels: list[int], branches: tuple[str, ...]) -> None:
        super().__init__()
        self.stages = copy.deepcopy(stages).requires_grad_(True)
        self.branches = branches
        self.decouple = nn.ModuleList()
        for width in channels:
            conv = nn.Conv2d(width, width * len(branches), kernel_size=1)
            with torch.no_grad():
                conv.weight.copy_(torch.eye(width).repeat(len(branches), 1).view(-1, width, 1, 1))
                conv.bias.zero_()
                if "abnormality" in branches:  # break the symmetry with the teacher (module docstring)
                    half = conv.weight[branches.index("abnormality") * width:][:width]
                    half.add_(torch.randn_like(half) * ABNORMALITY_INIT_NOISE / math.sqrt(width))
            self.decouple.append(conv)

    def forward(self, normalized_images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Per branch, the four decoupled stage features."""
        features = {branch: [] for branch in self.branches}
        hidden = normalized_images
        for stage, decouple in zip(self.stages, self.decouple):
            parts = decouple(stage(hidden)).chunk(len(self.branches), dim=1)
            for branch, part in zip(self.branches, parts):
                features[branch].append(part)
            hidden = parts[0]
        return features


class PyramidPath(nn.Module):
    """One multi-scale fusion path over four stage features, fused by addition.

    ``top_down``: P_4 = X_4, P_i = X_i + up(conv1x1(P_{i+1})); ``bottom_up``: P_1 = X_1,
    P_i = X_i + conv3x3_stride2(P_{i-1}). Fusion convolutions start at zero (identity path).
    """

    def __init__(self, channels: list[int], direction: str) -> None:
        super().__init__()
        self.direction = direction
        if direction == "top_down":
            convs = [nn.Conv2d(channels[i + 1], channels[i], 1) for i in range(len(channels) - 1)]
        else:
            convs = [nn.Conv2d(channels[i - 1], channels[i], 3, stride=2, padding=1) for i in range(1, len(channels))]
        for conv in convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.convs = nn.ModuleList(convs)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        fused = list(features)
        if self.direction == "top_down":
            for i in range(len(features) - 2, -1, -1):
                lateral = self.convs[i](fused[i + 1])
                fused[i] = features[i] + F.interpolate(lateral, size=features[i].shape[-2:], mode="bilinear",
                                                       align_corners=False)
        else:
            for i in range(1, len(features)):
                lateral = self.convs[i - 1](fused[i - 1])
                if lateral.shape[-2:] != features[i].shape[-2:]:
                    lateral = F.interpolate(lateral, size=features[i].shape[-2:], mode="bilinear", align_corners=False)
                fused[i] = features[i] + lateral
        return fused


class PyramidModelingNetwork(nn.Module):
    """PMN (Fig. 4): per branch an inner then an outer fusion path, each switchable (Table 4)."""

    def __init__(self, channels: list[int], branches: tuple[str, ...], inner: bool = True, outer: bool = True) -> None:
        super().__init__()
        self.paths = nn.ModuleDict()
        for branch in branches:
            inner_direction, outer_direction = PMN_DIRECTIONS[branch]
            steps = ([PyramidPath(channels, inner_direction)] if inner else []) + (
                [PyramidPath(channels, outer_direction)] if outer else [])
            self.paths[branch] = nn.Sequential(*steps)

    def forward(self, features: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        return {branch: self.paths[branch](branch_features) for branch, branch_features in features.items()}


class PyramidUpsampling(nn.Module):
    """Pyramid Upsampling (Sec. 3.4.2): NGM maps fused top-down, AIM maps bottom-up, then upsampled.

    Args:
        enabled: ``False`` (Table 5 "-PU") upsamples each map on its own.
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    @staticmethod
    def _fuse(maps: list[torch.Tensor], top_down: bool) -> list[torch.Tensor]:
        order = range(len(maps) - 2, -1, -1) if top_down else range(1, len(maps))
        fused = list(maps)
        for i in order:
            neighbour = fused[i + 1] if top_down else fused[i - 1]
            fused[i] = maps[i] + F.interpolate(neighbour, size=maps[i].shape[-2:], mode="bilinear", align_corners=False)
        return fused

    def forward(self, maps: dict[str, list[torch.Tensor]], image_size: tuple[int, int]) -> torch.Tensor:
        """Concatenate the (fused) maps of every branch, upsampled to ``image_size`` -> (B, n_maps, H, W)."""
        channels = []
        for branch, branch_maps in maps.items():
            if self.enabled:
                branch_maps = self._fuse(branch_maps, top_down=branch == "normality")
            channels.extend(F.interpolate(m, size=image_size, mode="bilinear", align_corners=False)
                            for m in branch_maps)
        return torch.cat(channels, dim=1)


class ChannelAttention(nn.Module):
    """Channel attention over the anomaly-map channels (CBAM style: avg + max pooling, shared MLP)."""

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        pooled = self.mlp(F.adaptive_avg_pool2d(maps, 1)) + self.mlp(F.adaptive_max_pool2d(maps, 1))
        return maps * torch.sigmoid(pooled)


class SpatialAttention(nn.Module):
    """Spatial attention (CBAM style: channel mean and max -> 7x7 conv -> sigmoid)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        summary = torch.cat([maps.mean(dim=1, keepdim=True), maps.amax(dim=1, keepdim=True)], dim=1)
        return maps * torch.sigmoid(self.conv(summary))


class MultiPerceptionSegmentationNetwork(nn.Module):
    """MSN head (Sec. 3.4.2): Pyramid Upsampling, Multi-perception Mechanism, sigmoid map, top-k score.

    Args:
        num_maps: Number of cosine-distance maps (8 with both branches, 4 with one).
        image_size: Input size; the global attention parameter has one weight per channel and pixel.
        pyramid_upsampling: Table 5 "PU" switch.
        multi_perception: Table 5 "MM" switch (channel + spatial + global attention).
        top_k: Pixels averaged into the image score (100 in the paper).
        global_attention_stride: The global attention G holds one weight per channel and block of this many
            pixels a side, upsampled bilinearly (1: one per pixel).
    """

    def __init__(self, num_maps: int, image_size: tuple[int, int], pyramid_upsampling: bool = True,
                 multi_perception: bool = True, top_k: int = 100, global_attention_stride: int = 1) -> None:
        super().__init__()
        self.upsampling = PyramidUpsampling(pyramid_upsampling)
        self.multi_perception = multi_perception
        if multi_perception:
            self.channel_attention = ChannelAttention(num_maps)
            self.spatial_attention = SpatialAttention()
            size = [max(1, -(-side // global_attention_stride)) for side in image_size]
            self.global_attention = nn.Parameter(torch.ones(1, num_maps, *size))
        self.compress = nn.Conv2d(num_maps, 1, kernel_size=1)
        with torch.no_grad():
            self.compress.weight.fill_(1.0 / num_maps)
            self.compress.bias.fill_(math.log(ANOMALY_PRIOR / (1 - ANOMALY_PRIOR)))
        self.top_k = top_k

    def forward(self, maps: dict[str, list[torch.Tensor]], image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the logits of M (B, 1, H, W) and the score S (B,) in [0, 1]."""
        stacked = self.upsampling(maps, image_size)
        if self.multi_perception:
            stacked = self.spatial_attention(self.channel_attention(stacked))
            weights = self.global_attention
            if weights.shape[-2:] != stacked.shape[-2:]:
                weights = F.interpolate(weights, size=stacked.shape[-2:], mode="bilinear", align_corners=False)
            stacked = stacked * weights
        logits = self.compress(stacked)
        probabilities = torch.sigmoid(logits).flatten(1)
        score = probabilities.topk(min(self.top_k, probabilities.shape[1]), dim=1).values.mean(dim=1)
        return logits, score


class DMDDModel(nn.Module):
    """Frozen teacher, decoupled student with PMN, and the MSN head.

    Args:
        backbone: timm encoder name; the paper uses ``wide_resnet50_2``.
        pretrained: Pretrained teacher (and student initialisation).
        weights: Explicit encoder weights file.
        image_size: Input size (for the MSN's global attention parameter).
        branches: ``"both"``, ``"normality"`` or ``"abnormality"`` (Table 4).
        pmn_inner: PMN inner path (Table 4).
        pmn_outer: PMN outer path (Table 4).
        msn: Multi-perception Segmentation Network; ``False`` = plain sum of the maps (Table 5).
        pyramid_upsampling: Pyramid Upsampling inside the MSN (Table 5).
        multi_perception: Multi-perception Mechanism inside the MSN (Table 5).
        top_k: Pixels averaged into the MSN score.
        global_attention_stride: Pixels a side per weight of the MSN's global attention.
        sigma: Gaussian smoothing of the summed map when the MSN is off.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", pretrained: bool = True,
                 weights: str | Path | None = None, image_size: tuple[int, int] = (256, 256),
                 branches: str = "both", pmn_inner: bool = True, pmn_outer: bool = True, msn: bool = True,
                 pyramid_upsampling: bool = True, multi_perception: bool = True, top_k: int = 100,
                 global_attention_stride: int = 1,
                 sigma: float = 4.0) -> None:
        super().__init__()
        if branches not in BRANCHES:
            msg = f"branches must be one of {', '.join(BRANCHES)}, got '{branches}'"
            raise ValueError(msg)
        self.teacher = frozen(create_encoder(backbone, pretrained=pretrained, weights=weights))
        self.branches = BRANCHES[branches]
        channels = self.teacher.channels
        self.student = DecoupledStudent(self.teacher.stages, channels, self.branches)
        # The student keeps the teacher's BatchNorm statistics (affine parameters still train): in train mode
        # batch statistics make an untrained student differ from the teacher (NGM 1.23 instead of 0.24 on the
        # first mtd batch) and the running statistics drift away from the ones the teacher is compared with.
        self.student_batchnorms = [m for m in self.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.pmn = PyramidModelingNetwork(channels, self.branches, inner=pmn_inner, outer=pmn_outer)
        self.msn = (MultiPerceptionSegmentationNetwork(4 * len(self.branches), image_size, pyramid_upsampling,
                                                       multi_perception, top_k, global_attention_stride)
                    if msn else None)
        self.blur = gaussian_smoothing(sigma)
        self.teacher_cache = FrozenFeatureCache()  # normal training images repeat every epoch; not in the state dict
        channels_last(self)
        self.train()

    def train(self, mode: bool = True) -> DMDDModel:
        keep_frozen_in_eval(self, mode, [self.teacher, *self.student_batchnorms])
        return self

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen teacher features F_i^T of images in [0, 1]."""
        with torch.no_grad():
            return self.teacher(images)

    def pair_teacher_features(self, normal: torch.Tensor, anomalous: torch.Tensor,
                              twins_context: AbstractContextManager | None = None) -> list[torch.Tensor]:
        """Teacher features (float32 or wider) of ``cat([normal, anomalous])``; the normal training images repeat every
        epoch, so theirs come from :attr:`teacher_cache`, in float32 also inside a mixed-precision step
        (:func:`~distillad.models.base.float32_teacher`), while synthetic twins are never seen twice and are
        encoded in ``twins_context`` (training passes
        :meth:`~distillad.models.base.DistillationModule.frozen_pass_precision`)."""
        with torch.no_grad():
            normal_features = self.teacher_cache(partial(float32_teacher, self.teacher), normal)
        with twins_context or nullcontext():
            twin_features = self.teacher_features(anomalous)
        return [torch.cat([n, at_least_float32(t)]) for n, t in zip(normal_features, twin_features)]

    def student_features(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Decoupled, PMN-refined student features per branch (F^SNGM_i and F^SAIM_i)."""
        return self.pmn(self.student(self.teacher.normalize(images)))

    def distance_maps(self, images: torch.Tensor,
                      teacher: list[torch.Tensor] | None = None) -> dict[str, list[torch.Tensor]]:
        """Per branch, the four cosine-distance maps between teacher and student features (Eq. 1, 4).

        ``teacher``: the teacher features of ``images`` when the caller has them (training reads cached ones).
        """
        teacher = self.teacher_features(images) if teacher is None else teacher
        student = self.student_features(images)
        return {branch: [cosine_distance_map(t, s) for t, s in zip(teacher, student[branch])] for branch in student}

    def fuse(self, maps: dict[str, list[torch.Tensor]], image_size: tuple[int, int]) -> InferenceBatch:
        """Anomaly map and score from the distance maps: the MSN's sigmoid map M and S, or the smoothed plain sum
        without MSN."""
        if self.msn is not None:
            logits, score = self.msn(maps, image_size)
            return InferenceBatch(pred_score=score, anomaly_map=torch.sigmoid(logits))
        anomaly_map = self.blur(upsampled_sum([m for branch_maps in maps.values() for m in branch_maps], image_size))
        return InferenceBatch(pred_score=image_score(anomaly_map), anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map and score of images in [0, 1]."""
        return self.fuse(self.distance_maps(images), images.shape[-2:])

    def forward_with_components(self, images: torch.Tensor) -> tuple[InferenceBatch, dict[str, torch.Tensor]]:
        """The prediction and, from the same teacher/student pass, the per-stage, per-branch maps upsampled to
        the input size (``ngm_1`` ... ``aim_4``; paper Fig. 8)."""
        maps = self.distance_maps(images)
        size = images.shape[-2:]
        components = {f"{MAP_PREFIX[branch]}_{stage + 1}": F.interpolate(m, size=size, mode="bilinear",
                                                                         align_corners=False)
                      for branch, branch_maps in maps.items() for stage, m in enumerate(branch_maps)}
        return self.fuse(maps, size), components
