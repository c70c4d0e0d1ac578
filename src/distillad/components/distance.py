"""Feature distances and the multi-scale anomaly map used by every distillation method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from anomalib.models.components import GaussianBlur2d
from torch import nn


def cosine_distance_map(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-pixel cosine distance ``1 - cos(F_T(h, w), F_S(h, w))`` of two (B, C, H, W) maps -> (B, 1, H, W).

    This is RD's Eq. 1, DMDD's Eq. 1 and 4, and the local term of DSKD and AAND.
    """
    return 1 - F.cosine_similarity(teacher, student, dim=1).unsqueeze(1)


def flattened_cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine distance of the flattened maps (the official RD code's loss; AAND's Eq. 10) -> (B,)."""
    return 1 - F.cosine_similarity(teacher.flatten(1), student.flatten(1), dim=1)


def gaussian_smoothing(sigma: float = 4.0) -> nn.Module:
    """A Gaussian filter of standard deviation ``sigma`` pixels (kernel 2*round(4 sigma)+1); identity for 0."""
    if sigma <= 0:
        return nn.Identity()
    kernel = 2 * int(4.0 * sigma + 0.5) + 1
    return GaussianBlur2d(kernel_size=(kernel, kernel), sigma=(sigma, sigma))


def upsampled_sum(maps: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
    """Sum of (B, 1, h_i, w_i) maps after bilinear upsampling to ``image_size``."""
    return sum(F.interpolate(m, size=image_size, mode="bilinear", align_corners=False) for m in maps)


class MultiScaleAnomalyMap(nn.Module):
    """Sum of per-level cosine-distance maps upsampled to the image size, then Gaussian smoothing.

    RD (Sec. 3.4) and its descendants sum the maps and smooth with a Gaussian of sigma 4; the image
    score is the map's maximum.

    Args:
        sigma: Standard deviation of the Gaussian filter in pixels; 0 disables smoothing.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.blur = gaussian_smoothing(sigma)

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor],
                image_size: tuple[int, int]) -> torch.Tensor:
        """Return the smoothed (B, 1, H, W) anomaly map for paired feature lists."""
        distances = [cosine_distance_map(t, s) for t, s in zip(teacher, student)]
        return self.blur(upsampled_sum(distances, image_size))
