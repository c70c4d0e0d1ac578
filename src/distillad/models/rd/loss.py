"""Reverse Distillation knowledge-distillation loss (Deng & Li, CVPR 2022, Eq. 1-2)."""

from __future__ import annotations

import torch
from torch import nn

from distillad.components import cosine_distance_map, flattened_cosine_distance


class ReverseDistillationLoss(nn.Module):
    """L_KD = sum over levels k of the mean per-pixel cosine distance M^k (Eq. 2).

    Args:
        mode: ``"pixel"`` (the paper's Eq. 2, default) or ``"flat"`` (the official code: one cosine
            distance per sample over the flattened map, which weights large activations more).
    """

    def __init__(self, mode: str = "pixel") -> None:
        super().__init__()
        if mode not in {"pixel", "flat"}:
            msg = f"unknown RD loss mode '{mode}'; use 'pixel' (paper Eq. 2) or 'flat' (official code)"
            raise ValueError(msg)
        self.mode = mode

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
        distance = cosine_distance_map if self.mode == "pixel" else flattened_cosine_distance
        return sum(distance(t, s).mean() for t, s in zip(teacher, student))
