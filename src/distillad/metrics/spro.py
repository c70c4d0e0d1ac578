"""Saturated per-region overlap (sPRO) of MVTec LOCO AD (Bergmann et al., IJCV 2022, Sec. 5).

anomalib 2.7 has no sPRO (its ``AUPRO`` is the unsaturated PRO of MVTec AD), so it lives here.

For a threshold t with predicted region P_t = {pixels scoring >= t} and the m ground-truth regions A_i
of the evaluated images, each with a saturation threshold s_i (pixels, 0 < s_i <= |A_i|):

    sPRO(t) = 1/m * sum_i min(|A_i ∩ P_t| / s_i, 1)
    FPR(t)  = |P_t ∩ N| / |N|,   N = every pixel of the evaluated images outside all their regions

A region counts as fully detected once s_i of its pixels are found, which is what logical anomalies
(a missing object annotated by the whole area where it could be) need. With s_i = |A_i| sPRO is PRO.
AU-sPRO is the area under sPRO over FPR from 0 to the integration limit (0.05 for MVTec LOCO), divided
by the limit. Computed exactly over every distinct score (no threshold sampling).

MVTec LOCO specifics (its official evaluation code):
- each anomalous image has one mask file per defect region (``ground_truth/<type>/<stem>/000.png``,
  ``001.png``, ...); a file's pixel value names its defect in the category's ``defects_config.json``
  (``defect_name``, ``pixel_value``, ``saturation_threshold``, ``relative_saturation``); a file is one
  region even when it has several connected components;
- s_i = ``int(saturation_threshold * |A_i|)`` pixels (rounded down) when ``relative_saturation``, else
  min(``saturation_threshold``, |A_i|) pixels;
- negatives (``get_fp_areas_for_thresholds``) are the pixels that no region of their image covers, in the
  anomaly-free images *and* in the anomalous ones: a detector that fires all over an anomalous image pays
  for it in FPR;
- logical and structural anomalies (the ``logical_anomalies`` / ``structural_anomalies`` test folders)
  are scored separately (``get_auc_spros_per_subdir``), each on the anomaly-free test images plus that
  folder's images; ``overall`` scores every test image at once.

Deviation: the official code evaluates at the masks' full resolution (about 1600 x 1100). Here the
regions are resampled to the anomaly maps' resolution (area interpolation, a pixel belongs to a region
when at least half of it is covered; a region smaller than that keeps its best-covered pixel) and
absolute saturation thresholds are scaled by the ratio of pixel areas, which keeps memory bounded for
a whole test set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from distillad.data.io import _decode, mask_files
from distillad.errors import DistilladError
from distillad.metrics.ranking import auroc

LOCO_FPR_LIMIT = 0.05
"""Integration limit of AU-sPRO in MVTec LOCO AD."""


@dataclass(frozen=True)
class DefectConfig:
    """One entry of MVTec LOCO's ``defects_config.json``."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def saturation_area(self, region_area: float, area_scale: float = 1.0) -> float:
        """s_i for a region of ``region_area`` pixels; ``area_scale`` converts config pixels to region pixels."""
        if self.relative_saturation:  # rounded down as MVTec LOCO's code does (int()), at least one pixel
            return float(max(1, int(self.saturation_threshold * region_area)))
        return min(self.saturation_threshold * area_scale, region_area)


@dataclass(frozen=True)
class SaturatedRegion:
    """A ground-truth region A_i: the index of its anomaly map, its mask there, and its saturation s_i.

    Attributes:
        image: Index of the image (anomaly map) the region belongs to.
        mask: Boolean (H, W) mask at the anomaly maps' resolution; not empty.
        saturation: s_i in pixels of ``mask``, in (0, mask.sum()].
        defect: Defect type name (informational).
    """

    image: int
    mask: torch.Tensor
    saturation: float
    defect: str = ""


def load_defects_config(path: str | Path) -> dict[int, DefectConfig]:
    """Read a ``defects_config.json`` (a list of defect entries) into ``{pixel_value: DefectConfig}``."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
        configs = [DefectConfig(str(e["defect_name"]), int(e["pixel_value"]), float(e["saturation_threshold"]),
                                bool(e["relative_saturation"])) for e in entries]
    except (OSError, ValueError, TypeError, KeyError) as error:
        msg = (f"cannot read defects config {path} ({type(error).__name__}: {error}); pass MVTec LOCO's "
               "defects_config.json: a list of {defect_name, pixel_value, saturation_threshold, relative_saturation}")
        raise DistilladError(msg) from error
    return {config.pixel_value: config for config in configs}


def spro_curve(anomaly_maps: torch.Tensor, evaluated: torch.Tensor,
               regions: Sequence[SaturatedRegion]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (FPR, sPRO) curve over every distinct score, from (0, 0) to FPR 1 (see the module docstring).

    Exact: sorting all relevant pixels by score, the k-th best pixel of region i raises sPRO by
    (min(k / s_i, 1) - min((k - 1) / s_i, 1)) / m, and every negative pixel raises FPR by 1/|N|; the curve
    is read after the last pixel of each distinct score.

    Args:
        anomaly_maps: (N, H, W) or (N, 1, H, W) scores.
        evaluated: (N,) booleans, ``True`` for the images that take part: their pixels outside every region
            of their own image are the negatives.
        regions: The ground-truth regions; each must belong to an evaluated image.
    """
    maps = anomaly_maps.reshape(len(anomaly_maps), *anomaly_maps.shape[-2:]).double()
    evaluated = evaluated.bool()
    annotated = torch.zeros_like(maps, dtype=torch.bool)
    for region in regions:
        if not evaluated[region.image]:
            msg = f"a region of image {region.image} is given, but that image is not among the evaluated ones"
            raise DistilladError(msg)
        annotated[region.image] |= region.mask.bool()
    negatives = maps[evaluated][~annotated[evaluated]]
    if len(negatives) == 0 or not regions:
        msg = "sPRO needs pixels outside every region (for the FPR) and at least one ground-truth region"
        raise DistilladError(msg)
    scores = [negatives]
    fp_weights = [torch.full_like(negatives, 1 / len(negatives))]
    overlap_weights = [torch.zeros_like(negatives)]
    for region in regions:
        values = maps[region.image][region.mask.bool()].sort(descending=True).values
        ranks = torch.arange(1, len(values) + 1, dtype=torch.float64)
        gains = (ranks / region.saturation).clamp(max=1) - ((ranks - 1) / region.saturation).clamp(max=1)
        scores.append(values)
        fp_weights.append(torch.zeros_like(values))
        overlap_weights.append(gains / len(regions))
    scores = torch.cat(scores)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    fpr = torch.cumsum(torch.cat(fp_weights)[order], 0)
    spro = torch.cumsum(torch.cat(overlap_weights)[order], 0)
    last_of_score = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_score[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fpr[last_of_score]]).clamp(max=1), torch.cat([zero, spro[last_of_score]]).clamp(max=1)


def area_under_curve(x: torch.Tensor, y: torch.Tensor, x_max: float) -> float:
    """Trapezoidal area under a curve with non-decreasing ``x`` from ``x[0]`` to ``x_max`` (y interpolated there)."""
    inside = int(torch.searchsorted(x, torch.tensor([x_max], dtype=x.dtype), right=True))
    xs, ys = x[:inside], y[:inside]
    if inside < len(x) and xs[-1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs = torch.cat([xs, xs.new_tensor([x_max])])
        ys = torch.cat([ys, (y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)).reshape(1)])
    return float(torch.trapezoid(ys, xs))


def auspro(anomaly_maps: torch.Tensor, evaluated: torch.Tensor, regions: Sequence[SaturatedRegion],
           fpr_limit: float = LOCO_FPR_LIMIT) -> float:
    """Normalised area under the sPRO curve up to ``fpr_limit`` (0.05 for MVTec LOCO); see :func:`spro_curve`."""
    if not 0 < fpr_limit <= 1:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}"
        raise DistilladError(msg)
    fpr, spro = spro_curve(anomaly_maps, evaluated, regions)
    return area_under_curve(fpr, spro, fpr_limit) / fpr_limit


def auspro_per_group(anomaly_maps: torch.Tensor, groups: Sequence[str | None], regions: Sequence[SaturatedRegion],
                     fpr_limit: float = LOCO_FPR_LIMIT) -> dict[str, float]:
    """AU-sPRO per group of anomalous images (e.g. logical / structural), over all of them, and the groups' mean.

    Args:
        anomaly_maps: (N, H, W) or (N, 1, H, W) scores of all test images.
        groups: Per image, ``None`` for an anomaly-free image or its group name.
        regions: Ground-truth regions of the anomalous images.
        fpr_limit: Integration limit.

    Returns:
        ``{group: AU-sPRO}`` on the anomaly-free images plus that group's images (their regions, and their
        unannotated pixels as negatives), ``"overall"`` on every image, and ``"mean"``, the mean over the
        groups (MVTec LOCO's reported mean).
    """
    if len(groups) != len(anomaly_maps):
        msg = f"{len(groups)} group labels for {len(anomaly_maps)} anomaly maps; give one per image"
        raise DistilladError(msg)
    results = {}
    for name in sorted({group for group in groups if group is not None}):
        evaluated = torch.tensor([group is None or group == name for group in groups])
        members = [region for region in regions if groups[region.image] == name]
        results[name] = auspro(anomaly_maps, evaluated, members, fpr_limit)
    results["mean"] = float(np.mean(list(results.values())))
    results["overall"] = auspro(anomaly_maps, torch.ones(len(groups), dtype=torch.bool), regions, fpr_limit)
    return results


def _region_at(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A full-resolution boolean mask resampled to ``size`` (see the module docstring's deviation)."""
    coverage = F.interpolate(torch.from_numpy(mask).double()[None, None], size=size, mode="area")[0, 0]
    region = coverage >= 0.5
    return region if region.any() else coverage == coverage.max()


def loco_regions(mask_paths: Sequence[Sequence[str | Path]], defects: dict[int, DefectConfig],
                 size: tuple[int, int]) -> list[SaturatedRegion]:
    """MVTec LOCO regions at the anomaly maps' ``size``: one per mask file, its defect from the pixel value.

    Args:
        mask_paths: Per image, its mask files (empty for anomaly-free images).
        defects: ``load_defects_config(CATEGORY/defects_config.json)``.
        size: (H, W) of the anomaly maps.
    """
    regions = []
    for image, paths in enumerate(mask_paths):
        for path in paths:
            array = _decode(path, "mask")
            array = array[..., 0] if array.ndim == 3 else array
            values = array[array != 0]
            if values.size == 0:
                continue
            value = int(np.bincount(values.ravel().astype(np.int64)).argmax())
            if value not in defects:
                msg = f"mask {path} has pixel value {value}, which defects_config.json does not list; pass its config"
                raise DistilladError(msg)
            mask = _region_at(array != 0, size)
            area_scale = size[0] * size[1] / array.size
            saturation = defects[value].saturation_area(float(mask.sum()), area_scale)
            regions.append(SaturatedRegion(image, mask, saturation, defects[value].defect_name))
    return regions


def mvtec_loco_spro(anomaly_maps: torch.Tensor, samples: pd.DataFrame, defects_config: str | Path,
                    fpr_limit: float = LOCO_FPR_LIMIT) -> dict[str, float]:
    """Logical / structural / mean AU-sPRO of MVTec LOCO test predictions.

    Args:
        anomaly_maps: (N, H, W) or (N, 1, H, W) scores, in the order of ``samples``' rows.
        samples: The test samples of anomalib's ``MVTecLOCO`` datamodule (``datamodule.test_data.samples``):
            ``label`` is ``good``, ``logical_anomalies`` or ``structural_anomalies``; ``mask_path`` a list
            of mask files, or a string of them joined with :data:`~distillad.data.io.MASK_SEPARATOR` (or ``""``).
        defects_config: The category's ``defects_config.json``.
        fpr_limit: Integration limit (0.05 in MVTec LOCO).

    Returns:
        ``{"logical": ..., "structural": ..., "mean": ..., "overall": ...}`` (groups named after the test
        folders, without the ``_anomalies`` suffix; see :func:`auspro_per_group`).
    """
    if len(samples) != len(anomaly_maps):
        msg = f"{len(samples)} samples for {len(anomaly_maps)} anomaly maps; pass the maps in the samples' order"
        raise DistilladError(msg)
    groups = [None if label == "good" else str(label).removesuffix("_anomalies") for label in samples.label]
    paths = [mask_files(mask) if isinstance(mask, str) else list(mask) for mask in samples.mask_path]
    regions = loco_regions(paths, load_defects_config(defects_config), tuple(anomaly_maps.shape[-2:]))
    return auspro_per_group(anomaly_maps, groups, regions, fpr_limit)


def mvtec_loco_metrics(anomaly_maps: torch.Tensor, scores: torch.Tensor, samples: pd.DataFrame,
                       defects_config: str | Path, fpr_limit: float = LOCO_FPR_LIMIT) -> dict[str, float]:
    """The DSKD paper's MVTec LOCO columns: AU-sPRO and image AUROC for logical and structural anomalies (each
    against the anomaly-free images), their mean, and AU-sPRO over all anomalies (``sPRO_overall``)."""
    spro = mvtec_loco_spro(anomaly_maps, samples, defects_config, fpr_limit)
    metrics = {f"sPRO_{name}": value for name, value in spro.items()}
    labels = samples.label.astype(str).tolist()
    groups = sorted({label.removesuffix("_anomalies") for label in labels if label != "good"})
    for group in groups:
        chosen = torch.tensor([label in ("good", f"{group}_anomalies") for label in labels])
        anomalous = torch.tensor([label != "good" for label in labels])
        metrics[f"image_AUROC_{group}"] = auroc(scores[chosen], anomalous[chosen].long())
    metrics["image_AUROC_mean"] = float(np.mean([metrics[f"image_AUROC_{group}"] for group in groups]))
    return metrics
