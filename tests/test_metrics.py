"""Tests of distillad.metrics: AUROC / F1-max / AUPRO on raw scores, against hand values and the torchmetrics pitfall."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from distillad.metrics import RawScoreAUROC, aupro, auroc, f1_max, rank_normalize

# Positives 30 and 50, negatives 10, 20, 40: of the 6 (positive, negative) pairs, 5 are ordered right.
RAW_SCORES = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
RAW_LABELS = torch.tensor([0, 0, 1, 0, 1])


def score_batch(scores: list[float], labels: list[int]) -> SimpleNamespace:
    """A batch with the two fields an image-level anomalib metric reads (it only uses getattr)."""
    return SimpleNamespace(pred_score=torch.tensor(scores), gt_label=torch.tensor(labels))


# --- rank_normalize / auroc -------------------------------------------------------------------------------


def test_rank_normalize_is_one_affine_map() -> None:
    torch.testing.assert_close(rank_normalize(torch.tensor([30.0, 10.0, 20.0, 30.0])),
                               torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(rank_normalize(torch.tensor([-3.0, 5.0])), torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(rank_normalize(torch.full((3,), 7.0)), torch.zeros(3, dtype=torch.float64))


def test_auroc_on_raw_scores_equals_hand_value() -> None:
    assert auroc(RAW_SCORES, RAW_LABELS) == pytest.approx(5 / 6)
    # invariant to any increasing affine map of the scores, including a huge offset and negative scores
    assert auroc(RAW_SCORES * 1000 + 1e6, RAW_LABELS) == pytest.approx(5 / 6)
    assert auroc(RAW_SCORES - 100, RAW_LABELS) == pytest.approx(5 / 6)


def test_auroc_counts_ties_as_half() -> None:
    # positive 2 ties with negative 2: pairs (2 vs 1) = 1, (2 vs 2) = 1/2, (3 vs 1) = 1, (3 vs 2) = 1 -> 3.5 / 4
    assert auroc(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([0, 0, 1, 1])) == pytest.approx(3.5 / 4)


def test_auroc_of_one_class_is_nan() -> None:
    assert math.isnan(auroc(RAW_SCORES, torch.zeros(5, dtype=torch.long)))


def test_torchmetrics_auroc_is_wrong_on_raw_scores() -> None:
    # The pitfall distillad exists to avoid (DESIGN "Pitfalls"): torchmetrics passes predictions outside [0, 1]
    # through a sigmoid. In float32 sigmoid(10) = 0.99995 survives but sigmoid(20..50) are all exactly 1.0, so the
    # positives tie with negatives 20 and 40: (2 wins + 2 half ties + 2 half ties) / 6 = 4/6 instead of 5/6.
    wrong = float(BinaryAUROC()(RAW_SCORES, RAW_LABELS))
    assert wrong == pytest.approx(4 / 6)
    assert wrong != pytest.approx(auroc(RAW_SCORES, RAW_LABELS))
    # with every score >= 20 everything saturates: a perfect ranking reads as chance
    perfect = torch.tensor([20.0, 30.0, 40.0, 50.0])
    labels = torch.tensor([0, 0, 1, 1])
    assert float(BinaryAUROC()(perfect, labels)) == pytest.approx(0.5)
    assert auroc(perfect, labels) == pytest.approx(1.0)


# --- RawScoreAUROC (anomalib metric, batch-wise) ----------------------------------------------------------

# Two batches: the first in [0, 1], the second above 1. Ranked globally, positives 0.9 and 3.0 against
# negatives 0.2 and 1.5: 0.9 > 0.2, 0.9 < 1.5, 3.0 > 0.2, 3.0 > 1.5 -> 3/4.
BATCHES = [([0.2, 0.9], [0, 1]), ([1.5, 3.0], [0, 1])]


def test_raw_score_auroc_batchwise_equals_single_shot() -> None:
    metric = RawScoreAUROC(fields=["pred_score", "gt_label"], prefix="image_")
    for scores, labels in BATCHES:
        metric.update(score_batch(scores, labels))
    all_scores = torch.tensor([s for scores, _ in BATCHES for s in scores])
    all_labels = torch.tensor([label for _, labels in BATCHES for label in labels])
    assert float(metric.compute()) == pytest.approx(0.75)
    assert float(metric.compute()) == pytest.approx(auroc(all_scores, all_labels))
    assert metric.name == "image_RawScoreAUROC"


def test_torchmetrics_batchwise_squashing_is_quietly_wrong() -> None:
    # The second batch alone is squashed (sigmoid(1.5) = 0.82 < 0.9), so torchmetrics reports 1.0 instead of 0.75.
    metric = BinaryAUROC()
    for scores, labels in BATCHES:
        metric.update(torch.tensor(scores), torch.tensor(labels))
    assert float(metric.compute()) == pytest.approx(1.0)


def test_raw_score_auroc_reset_and_pixel_fields() -> None:
    metric = RawScoreAUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_")
    maps = torch.tensor([[[[5.0, 1.0], [2.0, 7.0]]]])  # (1, 1, 2, 2)
    masks = torch.tensor([[[True, False], [False, False]]])
    metric.update(SimpleNamespace(anomaly_map=maps, gt_mask=masks))
    # the anomalous pixel (5) beats 1 and 2 but not 7 -> 2/3
    assert float(metric.compute()) == pytest.approx(2 / 3)
    metric.reset()
    metric.update(SimpleNamespace(anomaly_map=maps, gt_mask=maps > 6))
    assert float(metric.compute()) == pytest.approx(1.0)


# --- f1_max -----------------------------------------------------------------------------------------------


def test_f1_max_equals_hand_value_and_returns_raw_threshold() -> None:
    # score >= t: t=50 -> P 1, R 1/2, F1 2/3; t=40 -> 1/2; t=30 -> P 2/3, R 1, F1 0.8; t=20 -> 2/3; t=10 -> 4/7
    best, threshold = f1_max(RAW_SCORES, RAW_LABELS)
    assert best == pytest.approx(0.8)
    assert threshold == pytest.approx(30.0)


def test_f1_max_threshold_follows_the_scores() -> None:
    best, threshold = f1_max(RAW_SCORES * 3 - 7, RAW_LABELS)
    assert (best, threshold) == (pytest.approx(0.8), pytest.approx(83.0))
    best, threshold = f1_max(torch.tensor([0.1, 0.2, 0.7, 0.9]), torch.tensor([0, 0, 1, 1]))
    assert best == pytest.approx(1.0) and 0.2 < threshold <= 0.7


# --- aupro ------------------------------------------------------------------------------------------------


def two_region_mask() -> torch.Tensor:
    """A (1, 1, 4, 8) mask: region A = pixel (0, 0); region B = pixels (3, 5), (3, 6), (3, 7); 28 background."""
    mask = torch.zeros(1, 1, 4, 8, dtype=torch.long)
    mask[0, 0, 0, 0] = 1
    mask[0, 0, 3, 5:] = 1
    return mask


def background_scores() -> torch.Tensor:
    """28 distinct background scores in (0.1, 0.9)."""
    return torch.linspace(0.1, 0.9, 28)


def test_aupro_of_a_perfect_map_is_one() -> None:
    mask = two_region_mask()
    assert aupro(mask.float(), mask) == pytest.approx(1.0)
    assert aupro(mask.float() * 50 + 10, mask) == pytest.approx(1.0)  # raw scores far above 1


@pytest.mark.parametrize(("b_scores", "expected"), [((0.05, 0.05, 0.05), 0.5), ((0.95, 0.05, 0.05), 2 / 3)])
def test_aupro_averages_over_regions_not_pixels(b_scores: tuple[float, ...], expected: float) -> None:
    # A scores above every background pixel, B's low pixels below every one; within FPR <= 0.3 the PRO is flat at
    # (overlap_A + overlap_B) / 2: (1 + 0) / 2 = 0.5, or (1 + 1/3) / 2 = 2/3 (pixel-weighted would be 1/4 or 1/2).
    mask = two_region_mask()
    scores = torch.zeros(1, 1, 4, 8)
    scores[mask == 0] = background_scores()
    scores[0, 0, 0, 0] = 1.0
    scores[0, 0, 3, 5:] = torch.tensor(b_scores)
    assert aupro(scores, mask) == pytest.approx(expected, abs=1e-6)
    assert aupro(scores * 100 - 20, mask) == pytest.approx(expected, abs=1e-6)


def test_aupro_integrates_a_step_up_to_the_fpr_limit() -> None:
    # One region of 2 pixels scored 0.9 and 0.5; 8 background pixels, the highest 0.8 and 0.4, the rest lower.
    # Curve: (0, 1/2) -> (1/8, 1/2) -> (1/8, 1) -> (0.3, 1): area 1/16 + 0.175 = 0.2375; / 0.3 = 0.79166...
    mask = torch.zeros(1, 1, 1, 10, dtype=torch.long)
    mask[..., :2] = 1
    scores = torch.tensor([0.9, 0.5, 0.8, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.0]).view(1, 1, 1, 10)
    assert aupro(scores, mask) == pytest.approx(0.2375 / 0.3, abs=1e-6)


def test_aupro_without_anomalous_pixels_is_nan() -> None:
    assert math.isnan(aupro(torch.rand(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long)))
