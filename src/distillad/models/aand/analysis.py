"""Diagnostics of the RAA modules: the residual intensity of Fig. 8."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from distillad.models.aand.torch_model import AANDModel, downsample_mask


class ResidualIntensity(NamedTuple):
    """Mean squared gated residual on normal and on anomalous patches (NaN where a kind has no patch)."""

    normal: float
    """Mean over the levels of the per-level normal intensity."""
    anomalous: float
    """Mean over the levels of the per-level anomalous intensity (levels without anomalous patches skipped)."""
    levels: list[tuple[float, float]]
    """(normal, anomalous) per level 1-3."""


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


@torch.no_grad()
def residual_intensity(model: AANDModel, images: torch.Tensor, masks: torch.Tensor) -> ResidualIntensity:
    """Residual intensity of Fig. 8 for a batch: ``1 / (N C) sum_i sum_j r_ij^2`` over normal / anomalous patches.

    r = w * Delta is the residual the RAA actually adds, F_A - F_T, with the gate's *predicted* weights
    (as at inference; with ground-truth weights the normal intensity would be zero by construction,
    Eq. 6). Patches are labelled by ``masks`` (B, 1, H, W) downsampled to each level like the stage-1
    masks (:func:`~distillad.models.aand.torch_model.downsample_mask`). The paper writes the formula with
    Delta; the authors' code measures the gated residual, which is what Fig. 8's claim (small on normal,
    growing on anomalous inputs) is about. Use ``AAND.model`` for a trained module; ``images`` in [0, 1].
    """
    if model.raa is None:
        msg = "this AAND model has no RAA modules (stage1_epochs=0), so it adds no residual"
        raise ValueError(msg)
    model.eval()
    vanilla = model.encode(images)
    levels = []
    for features, output in zip(vanilla, model.amplify(vanilla), strict=True):
        intensity = (output.amplified - features).pow(2).mean(dim=1, keepdim=True)
        anomalous = downsample_mask(masks, features.shape[-2:])
        normal_values, anomalous_values = intensity[~anomalous], intensity[anomalous]
        levels.append((normal_values.mean().item() if normal_values.numel() else math.nan,
                       anomalous_values.mean().item() if anomalous_values.numel() else math.nan))
    return ResidualIntensity(_mean([n for n, _ in levels]), _mean([a for _, a in levels]), levels)
