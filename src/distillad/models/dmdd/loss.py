"""DMDD losses (Liu et al., ACM MM 2024): NGM (Eq. 1-2), AIM (Eq. 3-4) and segmentation (Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillad.components import cosine_distance_map


class NormalityGuidanceLoss(nn.Module):
    """L_NGM (Eq. 2) per normal/anomalous pair, averaged over the batch: mean over the 4 stages of the summed
    mean cosine distances (Eq. 1) from the student's normality features on the normal image (D^n) and on its
    anomalous twin (D^a) to the teacher's features of the normal image."""

    def forward(self, teacher_normal: list[torch.Tensor], student_on_normal: list[torch.Tensor],
                student_on_anomalous: list[torch.Tensor]) -> torch.Tensor:
        terms = [(cosine_distance_map(t, n) + cosine_distance_map(t, a)).mean()
                 for t, n, a in zip(teacher_normal, student_on_normal, student_on_anomalous)]
        return sum(terms) / len(terms)


class AbnormalityInverseMimickingLoss(nn.Module):
    """L_AIM (Eq. 3) per image, averaged over the batch: mean over stages of mean |M_i^AIM - M_i^gt|, where
    M_i^AIM is the cosine-distance map between teacher and abnormality features of the same image (Eq. 4) and
    M_i^gt the anomaly mask area-downsampled to the stage (fractional at anomaly edges). Normal images use a
    zero mask. A normal/anomalous pair contributes both images' terms, as Eq. 2 does for L_NGM."""

    def forward(self, teacher: list[torch.Tensor], student_abnormality: list[torch.Tensor],
                masks: torch.Tensor) -> torch.Tensor:
        terms = []
        for t, s in zip(teacher, student_abnormality):
            stage_mask = F.adaptive_avg_pool2d(masks, t.shape[-2:])
            terms.append((cosine_distance_map(t, s) - stage_mask).abs().mean())
        return sum(terms) / len(terms)


class SegmentationLoss(nn.Module):
    """L_seg (Eq. 5) = BCE(M, M^gt) + BCE(S, max(M^gt)); M is given as logits for numerical stability."""

    def forward(self, logits: torch.Tensor, score: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        targets = masks.flatten(1).amax(dim=1)
        map_loss = F.binary_cross_entropy_with_logits(logits, masks)
        score_loss = F.binary_cross_entropy(score.clamp(1e-6, 1 - 1e-6), targets)
        return map_loss + score_loss
