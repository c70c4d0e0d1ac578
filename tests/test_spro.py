"""Tests of the saturated per-region overlap (sPRO) metric and its MVTec LOCO helpers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from distillad.errors import DistilladError
from distillad.metrics import (
    DefectConfig,
    SaturatedRegion,
    auspro,
    auspro_per_group,
    load_defects_config,
    loco_regions,
    mvtec_loco_spro,
    spro_curve,
)

WHOLE = torch.ones(2, 2, dtype=torch.bool)


def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    """One anomaly-free image and one anomalous image whose 4 pixels form one region (both evaluated)."""
    maps = torch.tensor([[[0.1, 0.2], [0.3, 0.9]], [[0.8, 0.7], [0.05, 0.05]]])
    return maps, torch.tensor([True, True])


def test_curve_saturates_at_the_threshold() -> None:
    maps, normal = hand_example()
    # s = 2: the region is fully found once its two best pixels (0.8, 0.7) are; only 0.9 of the normal
    # image is above them, so FPR is 1/4 there.
    fpr, spro = spro_curve(maps, normal, [SaturatedRegion(1, WHOLE, 2.0)])
    torch.testing.assert_close(fpr, torch.tensor([0, 0.25, 0.25, 0.25, 0.5, 0.75, 1, 1], dtype=torch.float64))
    torch.testing.assert_close(spro, torch.tensor([0, 0, 0.5, 1, 1, 1, 1, 1], dtype=torch.float64))


def test_auspro_equals_hand_computation() -> None:
    maps, normal = hand_example()
    saturated = [SaturatedRegion(1, WHOLE, 2.0)]
    assert auspro(maps, normal, saturated, fpr_limit=0.5) == pytest.approx(0.25 / 0.5)  # 0.25 * 1 above FPR 0.25
    assert auspro(maps, normal, saturated, fpr_limit=0.375) == pytest.approx(0.125 / 0.375)  # limit between points
    assert auspro(maps, normal, saturated, fpr_limit=0.2) == 0  # nothing found before FPR 0.25
    # s = |A| is PRO: 0.7 only reaches overlap 1/2, the last two pixels tie at 0.05 (below every normal pixel)
    unsaturated = [SaturatedRegion(1, WHOLE, 4.0)]
    assert auspro(maps, normal, unsaturated, fpr_limit=0.5) == pytest.approx(0.25 * 0.5 / 0.5)


def test_relative_and_absolute_saturation_thresholds() -> None:
    relative = DefectConfig("scratch", 254, 0.5, relative_saturation=True)
    absolute = DefectConfig("missing", 255, 300, relative_saturation=False)
    assert relative.saturation_area(40) == 20
    assert relative.saturation_area(41) == 20  # rounded down, as MVTec LOCO's int()
    assert relative.saturation_area(1) == 1  # never below one pixel
    assert absolute.saturation_area(1000) == 300
    assert absolute.saturation_area(100) == 100  # capped at the region's area
    assert absolute.saturation_area(1000, area_scale=0.25) == 75  # config pixels at a lower resolution


def test_curve_is_exact_against_brute_force_thresholds() -> None:
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.integers(0, 12, size=(4, 5, 5)) / 12)  # many ties
    evaluated = torch.tensor([True, True, True, True])
    masks = [torch.from_numpy(rng.random((5, 5)) < 0.4) for _ in range(3)]
    masks[1] |= masks[0]  # overlapping regions of one image
    regions = [SaturatedRegion(2, masks[0], 3.0), SaturatedRegion(2, masks[1], 2.5), SaturatedRegion(3, masks[2], 4.0)]
    negative = torch.ones(4, 5, 5, dtype=torch.bool)
    negative[2] &= ~masks[1]  # masks[0] lies inside masks[1]
    negative[3] &= ~masks[2]
    fpr, spro = spro_curve(maps, evaluated, regions)
    for index, threshold in enumerate(sorted(set(maps.flatten().tolist()), reverse=True), start=1):
        predicted = maps >= threshold
        expected_fpr = float(predicted[negative].float().mean())
        expected_spro = np.mean([min(float(predicted[r.image][r.mask].sum()) / r.saturation, 1) for r in regions])
        assert (float(fpr[index]), float(spro[index])) == pytest.approx((expected_fpr, expected_spro))


def test_unannotated_pixels_of_anomalous_images_are_negatives_as_in_mvtec_loco() -> None:
    normal = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    logical = torch.tensor([[0.35, 0.35], [0.0, 0.0]])  # region: all 4 pixels, s = 2
    structural = torch.tensor([[0.5, 0.99], [0.99, 0.99]])  # region: the 0.5 pixel; three 0.99 unannotated
    maps = torch.stack([normal, logical, structural])
    one_pixel = torch.tensor([[True, False], [False, False]])
    regions = [SaturatedRegion(1, WHOLE, 2.0), SaturatedRegion(2, one_pixel, 1.0)]
    result = auspro_per_group(maps, [None, "logical", "structural"], regions, fpr_limit=0.5)
    # logical: negatives are the 4 normal pixels; sPRO 1 from FPR 1/4 (0.4 beats 0.35) -> 0.25 / 0.5.
    # structural: negatives are the 4 normal pixels and the three 0.99 -> sPRO 1 from FPR 3/7 -> (1/2 - 3/7) / 0.5.
    # overall: 7 negatives, m = 2; the 0.5 pixel gives 1/2 at FPR 3/7, the logical region comes after 0.4 (FPR 4/7).
    assert result == pytest.approx({"logical": 0.5, "structural": 1 / 7, "mean": (0.5 + 1 / 7) / 2,
                                    "overall": 0.5 * (0.5 - 3 / 7) / 0.5})


def test_metric_needs_normal_images_and_regions() -> None:
    maps, _ = hand_example()
    with pytest.raises(DistilladError, match="outside every region"):
        auspro(maps[1:], torch.tensor([True]), [SaturatedRegion(0, WHOLE, 2.0)])
    with pytest.raises(DistilladError, match="not among the evaluated"):
        auspro(maps, torch.tensor([True, False]), [SaturatedRegion(1, WHOLE, 2.0)])
    with pytest.raises(DistilladError, match="fpr_limit"):
        auspro(maps, torch.tensor([True, False]), [SaturatedRegion(1, WHOLE, 2.0)], fpr_limit=0)


# --- MVTec LOCO files --------------------------------------------------------------------------------------


@pytest.fixture
def loco_category(tmp_path: Path) -> Path:
    """A toy MVTec LOCO category: defects_config.json and 8x8 masks, one file per region."""
    config = [
        {"defect_name": "missing_thing", "pixel_value": 255, "saturation_threshold": 8, "relative_saturation": False},
        {"defect_name": "scratch", "pixel_value": 254, "saturation_threshold": 1.0, "relative_saturation": True},
    ]
    (tmp_path / "defects_config.json").write_text(json.dumps(config))
    masks = {"logical_anomalies/000/000.png": ((slice(0, 4), slice(0, 4)), 255),
             "structural_anomalies/000/000.png": ((slice(4, 6), slice(4, 6)), 254),
             "structural_anomalies/000/001.png": ((slice(7, 8), slice(7, 8)), 254)}
    for name, (region, value) in masks.items():
        path = tmp_path / "ground_truth" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        mask = np.zeros((8, 8), dtype=np.uint8)
        mask[region] = value
        cv2.imwrite(str(path), mask)
    return tmp_path


def test_loco_regions_take_defect_from_pixel_value_and_scale_to_map_size(loco_category: Path) -> None:
    defects = load_defects_config(loco_category / "defects_config.json")
    truth = loco_category / "ground_truth"
    paths = [[], [truth / "logical_anomalies/000/000.png"],
             [truth / "structural_anomalies/000/000.png", truth / "structural_anomalies/000/001.png"]]
    regions = loco_regions(paths, defects, (4, 4))
    assert [(r.image, r.defect, int(r.mask.sum()), r.saturation) for r in regions] == [
        (1, "missing_thing", 4, 2.0),  # 8 px at 8x8 are 2 px at 4x4 (and below the region's 4 px)
        (2, "scratch", 1, 1.0),
        (2, "scratch", 1, 1.0),  # a sub-pixel region keeps its best-covered pixel
    ]
    assert bool(regions[0].mask[:2, :2].all()) and bool(regions[1].mask[2, 2]) and bool(regions[2].mask[3, 3])
    with pytest.raises(DistilladError, match="pixel value 255"):
        loco_regions(paths, {254: defects[254]}, (4, 4))


def test_mvtec_loco_spro_splits_logical_and_structural(loco_category: Path) -> None:
    truth = loco_category / "ground_truth"
    samples = pd.DataFrame({
        "label": ["good", "logical_anomalies", "structural_anomalies"],
        "mask_path": ["", [str(truth / "logical_anomalies/000/000.png")],
                      [str(truth / "structural_anomalies/000/000.png")]],
    })
    normal = torch.arange(16, dtype=torch.float64).view(4, 4) / 100  # 0.00 ... 0.15
    logical = torch.zeros(4, 4, dtype=torch.float64)  # 12 unannotated pixels at 0: negatives
    logical[:2, :2] = torch.tensor([[0.145, 0.135], [0.0, 0.0]])
    structural = torch.zeros(4, 4, dtype=torch.float64)  # 15 unannotated pixels at 0
    structural[2, 2] = 0.125
    maps = torch.stack([normal, logical, structural]).unsqueeze(1)
    result = mvtec_loco_spro(maps, samples, loco_category / "defects_config.json", fpr_limit=0.25)
    # logical (s = 2, 16 + 12 negatives): sPRO 1/2 on FPR [1/28, 2/28], 1 from 2/28 -> 1 - 6/28
    # structural (s = 1, 16 + 15 negatives): sPRO 1 from FPR 3/31 (0.13, 0.14, 0.15 beat 0.125) -> 1 - 12/31
    # overall (m = 2, 43 negatives): 1/4 on [1/43, 2/43], 1/2 on [2/43, 3/43], 1 from 3/43 -> 1 - 9/43
    assert result == pytest.approx({"logical": 1 - 6 / 28, "structural": 1 - 12 / 31,
                                    "mean": (2 - 6 / 28 - 12 / 31) / 2, "overall": 1 - 9 / 43})


def test_without_saturation_it_is_anomalibs_aupro() -> None:
    """With s_i = |A_i| and one connected region per image, sPRO is PRO; the FPR rule (every unannotated pixel
    is a negative) is then anomalib's too."""
    from anomalib.metrics.aupro import _AUPRO

    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.random((5, 16, 16)))
    masks = torch.zeros(5, 16, 16, dtype=torch.bool)
    regions = []
    for image in (2, 3, 4):
        row, col = rng.integers(0, 10, 2)
        masks[image, row:row + 4, col:col + 5] = True
        maps[image][masks[image]] += 0.3
        regions.append(SaturatedRegion(image, masks[image].clone(), float(masks[image].sum())))
    for limit in (0.05, 0.3):
        reference = _AUPRO(fpr_limit=limit)
        reference.update(maps.float(), masks.int())
        assert auspro(maps, torch.ones(5, dtype=torch.bool), regions, fpr_limit=limit) == pytest.approx(
            float(reference.compute()), abs=1e-6)
