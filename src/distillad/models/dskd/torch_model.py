"""Dual-student knowledge distillation (DSKD, Zhang et al., WACV 2024) for any timm encoder."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from distillad.backbones import STAGE_REDUCTIONS, create_encoder
from distillad.components import (
    FrozenFeatureCache,
    MirrorDecoder,
    OneClassBottleneck,
    block_family,
    gaussian_smoothing,
    upsampled_sum,
)
from distillad.models.base import channels_last, float32_teacher, frozen, image_score, keep_frozen_in_eval
from distillad.models.dskd.loss import discrepancy_maps


class GlobalContextCondensingBlock(nn.Module):
    """GCCB (Sec. 3.4, Fig. 3): condense a feature map into one g-dim vector and restore the map's shape.

    1x1 conv C -> g, global average pooling to a single vector, broadcast back to the input's spatial
    size, 1x1 conv g -> C. With g == C there are no 1x1 convs (Table 6, g = 2048 for WideResNet-50-2).
    The output is the same at every position and does not depend on where the input's features are,
    only on their average. Both 1x1 convs are plain (with bias; the paper names no normalisation or
    activation); the second one is applied to the pooled vector before broadcasting, which equals
    applying it to the broadcast map because a 1x1 conv acts per position.

    Args:
        channels: Channels C of the input and output.
        condensed_channels: Channels g of the condensed vector.
    """

    def __init__(self, channels: int, condensed_channels: int) -> None:
        super().__init__()
        convs = condensed_channels != channels
        self.compress = nn.Conv2d(channels, condensed_channels, 1) if convs else nn.Identity()
        self.restore = nn.Conv2d(condensed_channels, channels, 1) if convs else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), constant over H and W."""
        condensed = self.compress(features).mean(dim=(2, 3), keepdim=True)
        return self.restore(condensed).expand(-1, -1, *features.shape[-2:])


class PositionalCondensingBlock(nn.Module):
    """A position-aware GCCB, after the bottleneck of GCAD's global branch (which DSKD cites).

    The map is narrowed per position (1x1 conv C -> c, c = max(1, g // (H * W)), so the flattened map holds
    about g numbers), condensed to one g-dim vector by a conv whose kernel spans the whole map (a fully
    connected layer over positions: each position has its own weights), and restored by the transposed
    conv of the same extent and a 1x1 conv c -> C. The vector therefore records what is where, and the
    restored map differs per position, so a part missing from its place or one too many changes the global
    decoder's input, which average pooling cannot see. Plain layers, as :class:`GlobalContextCondensingBlock`.
    The map's size is fixed by the model's input size.

    Args:
        channels: Channels C of the input and output.
        condensed_channels: Length g of the condensed vector.
        spatial_size: (H, W) of the map it condenses.
    """

    def __init__(self, channels: int, condensed_channels: int, spatial_size: tuple[int, int]) -> None:
        super().__init__()
        self.spatial_size = tuple(spatial_size)
        narrow = max(1, condensed_channels // (self.spatial_size[0] * self.spatial_size[1]))
        self.narrow = nn.Conv2d(channels, narrow, 1)
        self.condense = nn.Conv2d(narrow, condensed_channels, self.spatial_size)
        self.expand = nn.ConvTranspose2d(condensed_channels, narrow, self.spatial_size)
        self.restore = nn.Conv2d(narrow, channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) through one g-dim vector per image."""
        if tuple(features.shape[-2:]) != self.spatial_size:
            msg = (f"the positional GCCB was built for {self.spatial_size} maps, got {tuple(features.shape[-2:])}; "
                   "score images at the model's image size")
            raise ValueError(msg)
        return self.restore(self.expand(self.condense(self.narrow(features))))


#: GCCB readings by ``gccb_pooling`` name: (C, g, stage-4 map size) -> module.
CONDENSING_BLOCKS: dict[str, Callable[[int, int, tuple[int, int]], nn.Module]] = {
    "mean": lambda channels, condensed, _size: GlobalContextCondensingBlock(channels, condensed),
    "positional": PositionalCondensingBlock,
}


class Student(nn.Module):
    """A student: an embedding of the teacher features, a decoder, its loss type and Eq. 8 statistics.

    ``map_mean``/``map_std`` are mu and sigma of Eq. 8 for this student's summed map; they are buffers,
    so they are saved in checkpoints (0 and 1, i.e. no standardisation, until they are fitted).
    """

    def __init__(self, embed: nn.Module, decoder: MirrorDecoder, loss_type: str) -> None:
        super().__init__()
        self.embed = embed
        self.decoder = decoder
        self.loss_type = loss_type
        self.register_buffer("map_mean", torch.tensor(0.0))
        self.register_buffer("map_std", torch.tensor(1.0))

    def forward(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reconstructions of the teacher's stage 1-3 features (strides 4, 8, 16)."""
        return self.decoder(self.embed(teacher))


class _GlobalEmbedding(nn.Module):
    """OCBE_glo + GCCB: a trainable copy of the teacher's 4th stage on F_T^3, then the GCCB (Sec. 3.4, Fig. 3)."""

    def __init__(self, stage: nn.Module, gccb: nn.Module) -> None:
        super().__init__()
        self.stage = stage
        self.gccb = gccb

    def forward(self, teacher: list[torch.Tensor]) -> torch.Tensor:
        return self.gccb(self.stage(teacher[2]))


class DSKDModel(nn.Module):
    """Frozen teacher, a local student (RD) and a global student (OCBE_glo + GCCB + decoder).

    - Local student (Sec. 3.3): OCBE_loc fuses F_T^1..3 (RD's MFF + OCE) and a decoder mirroring the
      teacher reconstructs F_T^1..3.
    - Global student (Sec. 3.4): OCBE_glo is a trainable copy of the teacher's 4th stage, initialised
      with its pretrained weights ("we use the 4-th residual stage of ResNet as trainable OCBE_glo"),
      applied to the high-semantic feature F_T^3 (the paper's GCCB input; the fused low-level features
      of OCBE_loc are what it says hurts global learning); the GCCB condenses its output to one
      g-dim vector; a decoder identical to the local one reconstructs F_T^1..3.
    - Scoring (Sec. 3.5, Eq. 8): each student's per-level maps are upsampled bilinearly to the image
      size and summed; each sum is standardised with mu/sigma from held-out normal images
      (:meth:`fit_standardization`); the standardised maps are added and smoothed with a Gaussian
      (sigma 4, as RD); the image score is the maximum.

    A student's map follows its training loss: Eq. 1 for ``"pixel"``, Eq. 6 for ``"affinity"`` (the
    paper pairs the local map with Eq. 1 and the global with Eq. 6; with switched losses, Tables 4-5,
    it does not say, and the trained discrepancy is the one the student learned to minimise).

    Training returns ``(teacher_features, {student name: reconstructions})``; evaluation returns an
    ``InferenceBatch``.

    Args:
        backbone: timm encoder name.
        pretrained: Load pretrained teacher weights (offline-first; see :mod:`distillad.backbones`).
        weights: Explicit teacher weights file.
        local_loss: ``"pixel"``, ``"affinity"`` or ``None`` (no local student).
        global_loss: ``"pixel"``, ``"affinity"`` or ``None`` (no global student).
        gccb: Use the GCCB in the global student (Table 6 "w/o" when ``False``).
        gccb_channels: GCCB width g; equal to the teacher's stage-4 width means no 1x1 convs.
        gccb_pooling: ``"mean"`` (the paper's pooled vector) or ``"positional"`` (GCAD-like, position-aware).
        image_size: Input size (the positional GCCB's weights span the stage-4 map).
        temperature: Softmax temperature T of the contextual affinity.
        sigma: Gaussian smoothing of the fused map.
        chunk_rows: Row chunk of the contextual affinity (memory only; the result does not depend on it).
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", pretrained: bool = True,
                 weights: str | Path | None = None, local_loss: str | None = "pixel",
                 global_loss: str | None = "affinity", gccb: bool = True, gccb_channels: int = 1024,
                 gccb_pooling: str = "mean", image_size: tuple[int, int] = (256, 256),
                 temperature: float = 1.0, sigma: float = 4.0, chunk_rows: int = 512) -> None:
        super().__init__()
        self.encoder = frozen(create_encoder(backbone, pretrained=pretrained, weights=weights))
        family = block_family(self.encoder)
        channels = self.encoder.channels
        self.students = nn.ModuleDict()
        if local_loss is not None:
            embed = OneClassBottleneck(channels[:3], channels[3], family)  # OCBE_loc
            self.students["local"] = Student(embed, MirrorDecoder(channels[3], channels[:3], family), local_loss)
        if global_loss is not None:
            stage = copy.deepcopy(self.encoder.stages[3]).requires_grad_(True)
            stage4_size = tuple(-(-side // STAGE_REDUCTIONS[3]) for side in image_size)
            condense = (CONDENSING_BLOCKS[gccb_pooling](channels[3], gccb_channels, stage4_size) if gccb
                        else nn.Identity())
            embed = _GlobalEmbedding(stage, condense)
            self.students["global"] = Student(embed, MirrorDecoder(channels[3], channels[:3], family), global_loss)
        self.temperature = temperature
        self.chunk_rows = chunk_rows
        self.blur = gaussian_smoothing(sigma)
        self.teacher_cache = FrozenFeatureCache()  # training images repeat every epoch; not in the state dict
        self.register_buffer("standardized", torch.tensor(False))  # set by fit_standardization, saved with mu/sigma
        channels_last(self)
        # The global student's stage is a copy of the teacher's, made in eval mode; Lightning keeps the modes it
        # finds, so without this its BatchNorm ran on running statistics until the first validation switched it
        # (and a resumed run, built fresh, trained that epoch differently).
        self.train()

    def train(self, mode: bool = True) -> DSKDModel:
        keep_frozen_in_eval(self, mode, [self.encoder])
        return self

    def summed_maps(self, teacher: list[torch.Tensor], students: dict[str, list[torch.Tensor]],
                    image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """M_loc and M_glo of Eq. 8: per student, the sum of its level maps upsampled to ``image_size``."""
        summed = {}
        for name, features in students.items():
            maps = discrepancy_maps(self.students[name].loss_type, teacher, features, self.temperature,
                                    self.chunk_rows)
            summed[name] = upsampled_sum(maps, image_size)
        return summed

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's stage 1-3 features F_T^1..3."""
        return float32_teacher(self.encoder, images)[:3]

    def _features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        with torch.no_grad():
            teacher = self.teacher_cache(self.encode, images) if self.training else self.encode(images)
        return teacher, {name: student(teacher) for name, student in self.students.items()}

    @torch.no_grad()
    def fit_standardization(self, batches: Iterable[torch.Tensor]) -> int:
        """Set mu and sigma of Eq. 8 from images of normal samples; returns the number of images used.

        mu and sigma are the mean and (population) standard deviation of all pixels of each student's
        summed map M (before the Gaussian). Call in eval mode with normal images only. Without any image
        the statistics are left unchanged and 0 is returned.
        """
        totals = {name: torch.zeros(3, dtype=torch.float64) for name in self.students}
        count = 0
        for images in batches:
            if len(images) == 0:
                continue
            teacher, students = self._features(images)
            for name, summed in self.summed_maps(teacher, students, images.shape[-2:]).items():
                values = summed.double().cpu()
                totals[name] += torch.stack([values.new_tensor(values.numel()), values.sum(), values.square().sum()])
            count += len(images)
        if count == 0:
            return 0
        for name, (pixels, total, squares) in totals.items():
            mean = total / pixels
            std = (squares / pixels - mean.square()).clamp_min(0).sqrt().clamp_min(1e-12)
            self.students[name].map_mean.fill_(float(mean))
            self.students[name].map_std.fill_(float(std))
        self.standardized.fill_(True)
        return count

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Checkpoints written before the flag existed: fitted statistics are the ones that moved from 0 and 1.
        if prefix + "standardized" not in state_dict:
            stats = [state_dict.get(f"{prefix}students.{name}.{key}") for name in self.students
                     for key in ("map_mean", "map_std")]
            if all(stat is not None for stat in stats):
                state_dict[prefix + "standardized"] = torch.tensor(any(
                    float(stat) != default for stat, default in zip(stats, (0.0, 1.0) * len(self.students))))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, images: torch.Tensor,
    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]] | InferenceBatch:
        """Training: teacher features and student reconstructions; evaluation: Eq. 8's map and score."""
        if self.training:
            return self._features(images)
        anomaly_map = self.blur(sum(self.standardized_maps(images).values()))
        return InferenceBatch(pred_score=image_score(anomaly_map), anomaly_map=anomaly_map)

    def standardized_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per student, (M - mu) / sigma of Eq. 8 (before the Gaussian); the anomaly map is their blurred sum."""
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not tracing and not self.standardized:
            msg = ("DSKD's Eq. 8 statistics (mu, sigma) are not fitted, so its scores would be on no common scale; "
                   "train it with a Lightning Trainer (they are fitted at the end of fit) or call fit_standardization "
                   "with normal images")
            raise RuntimeError(msg)
        teacher, students = self._features(images)
        summed = self.summed_maps(teacher, students, images.shape[-2:])
        return {name: (summed[name] - self.students[name].map_mean) / self.students[name].map_std for name in summed}
