"""AAND losses: focal + anomaly amplification (stage 1, Eq. 7-9) and KD + HKD (stage 2, Eq. 10-12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillad.components import cosine_distance_map, flattened_cosine_distance


class BinaryFocalLoss(nn.Module):
    """Focal loss (Lin et al., ICCV 2017) on probabilities, supervising the MRG weights w (Sec. III-B1).

    ``-a (1 - p)^g y log p - (1 - a) p^g (1 - y) log(1 - p)``, averaged over patches. The paper names
    the focal loss without parameters; a = 0.8 (weight of the rare anomalous patches) and g = 2 are the
    authors' code. Probabilities are clamped to [1e-6, 1 - 1e-6] so a saturated gate gives no infinity.

    Args:
        alpha: Weight of the positive (anomalous) class.
        gamma: Focusing exponent.
    """

    def __init__(self, alpha: float = 0.8, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = probability.clamp(1e-6, 1 - 1e-6)
        target = target.to(p.dtype)
        positive = -self.alpha * (1 - p) ** self.gamma * target * torch.log(p)
        negative = -(1 - self.alpha) * p**self.gamma * (1 - target) * torch.log(1 - p)
        return (positive + negative).mean()


def pairwise_cosine(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of every row of ``rows`` (N, C) with every row of ``columns`` (M, C) -> (N, M)."""
    return F.normalize(rows, dim=1) @ F.normalize(columns, dim=1).T


def _patches(features: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Patch features (N, C) of a (B, C, H, W) map where the (B, 1, H, W) bool ``where`` holds."""
    return features.permute(0, 2, 3, 1)[where.squeeze(1)]


class AnomalyAmplificationLoss(nn.Module):
    """L_A (Eq. 7) with the dynamic margin S_ref (Eq. 8), summed over levels.

    For a level, with N^a anomalous and N^n normal patches of the batch (the level's mask, see
    :func:`~distillad.models.aand.torch_model.downsample_mask`)::

        L_A = 1 / (N^a N^n) sum_ij max(s(F_A^{a_i}, F_T^{n_j}), s(F_T^{a_i}, F_T^{n_j}) - alpha)

    The loss pushes each amplified anomalous feature at least alpha (in cosine similarity) further from
    every normal feature than the vanilla teacher placed it; S_ref carries no gradient. The patches of
    the whole batch are pooled (the authors' code). When a level has more than ``max_anomalous`` or
    ``max_normal`` patches, that many are drawn at random without replacement (1000 and 5000 in the
    authors' code) so the N^a x N^n similarity matrix stays bounded. A level without anomalous patches
    contributes 0.

    Deviations from the authors' code, where Eq. 7 and Eq. 9 are followed as printed: the code computes
    ``relu(s - S_ref)``, which equals Eq. 7 minus the gradient-free constant mean(S_ref) (same gradient;
    the logged value here can be negative), weights L_A by 0.1 in L_1 (here 1), and takes the normal
    patches only inside the foreground mask (here every non-anomalous patch, as the paper defines N^n).

    Args:
        alpha: The margin alpha of Eq. 8 (0.3 in the paper).
        max_anomalous: Most anomalous patches per level and batch.
        max_normal: Most normal patches per level and batch.
    """

    def __init__(self, alpha: float = 0.3, max_anomalous: int = 1000, max_normal: int = 5000) -> None:
        super().__init__()
        if max_anomalous < 1 or max_normal < 1:
            msg = f"max_anomalous and max_normal must be positive, got {max_anomalous} and {max_normal}"
            raise ValueError(msg)
        self.alpha = alpha
        self.max_anomalous = max_anomalous
        self.max_normal = max_normal

    @staticmethod
    def _sample(count: int, limit: int, device: torch.device) -> torch.Tensor | slice:
        return torch.randperm(count, device=device)[:limit] if count > limit else slice(None)

    def level_loss(self, vanilla: torch.Tensor, amplified: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 7 for one level: features (B, C, H, W), bool mask (B, 1, H, W) of anomalous patches."""
        anomalous, normal = mask, ~mask
        count_anomalous, count_normal = int(anomalous.sum()), int(normal.sum())
        if count_anomalous == 0 or count_normal == 0:
            return amplified.new_zeros(())
        pick_anomalous = self._sample(count_anomalous, self.max_anomalous, vanilla.device)
        pick_normal = self._sample(count_normal, self.max_normal, vanilla.device)
        normal_features = _patches(vanilla, normal)[pick_normal]
        similarity = pairwise_cosine(_patches(amplified, anomalous)[pick_anomalous], normal_features)
        with torch.no_grad():
            reference = pairwise_cosine(_patches(vanilla, anomalous)[pick_anomalous], normal_features) - self.alpha
        return torch.maximum(similarity, reference).mean()

    def forward(self, vanilla: list[torch.Tensor], amplified: list[torch.Tensor],
                masks: list[torch.Tensor]) -> torch.Tensor:
        return sum(self.level_loss(v, a, m) for v, a, m in zip(vanilla, amplified, masks, strict=True))


class AmplificationStageLoss(nn.Module):
    """L_1 = L_focal + L_A (Eq. 9), both summed over the levels.

    Args:
        alpha: Margin of Eq. 8.
        max_anomalous: Anomalous-patch budget of L_A per level.
        max_normal: Normal-patch budget of L_A per level.
    """

    def __init__(self, alpha: float = 0.3, max_anomalous: int = 1000, max_normal: int = 5000) -> None:
        super().__init__()
        self.focal = BinaryFocalLoss()
        self.amplification = AnomalyAmplificationLoss(alpha, max_anomalous, max_normal)

    def forward(self, vanilla: list[torch.Tensor], amplified: list[torch.Tensor], gates: list[torch.Tensor | None],
                masks: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return L_1 and its parts; ``gates`` are the predicted weights (``None`` entries: no gate, no focal term)."""
        focal_terms = [self.focal(g, m) for g, m in zip(gates, masks, strict=True) if g is not None]
        focal = sum(focal_terms, amplified[0].new_zeros(()))
        amplification = self.amplification(vanilla, amplified, masks)
        return focal + amplification, {"focal": focal.detach(), "amplification": amplification.detach()}


class NormalityDistillationLoss(nn.Module):
    """L_2 = L_KD + L_HKD (Eq. 12), summed over the levels.

    - L_KD (Eq. 10): 1 - cos of the flattened maps (C*H*W vectors), averaged over the batch.
    - L_HKD (Eq. 11): per image, the mean of the K_h largest per-patch cosine distances (the hard normal
      patches, Fig. 4), averaged over the batch (the authors' code selects per image and level).
      ``hard_samples=0`` switches HKD off (Table V (c), Fig. 7 K_h = 0); a level with fewer than K_h
      patches uses all of them.

    Args:
        hard_samples: K_h (10 in the paper).
    """

    def __init__(self, hard_samples: int = 10) -> None:
        super().__init__()
        if hard_samples < 0:
            msg = f"hard_samples (K_h) must be >= 0, got {hard_samples}"
            raise ValueError(msg)
        self.hard_samples = hard_samples

    def hard_distance(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """L_HKD of one level (Eq. 11)."""
        distances = cosine_distance_map(teacher, student).flatten(1)
        return distances.topk(min(self.hard_samples, distances.shape[1]), dim=1).values.mean()

    def forward(self, teacher: list[torch.Tensor],
                student: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return L_2 and its parts."""
        kd = sum(flattened_cosine_distance(t, s).mean() for t, s in zip(teacher, student, strict=True))
        hkd = kd.new_zeros(())
        if self.hard_samples:
            hkd = sum(self.hard_distance(t, s) for t, s in zip(teacher, student, strict=True))
        return kd + hkd, {"kd": kd.detach(), "hkd": hkd.detach()}
