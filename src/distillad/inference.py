"""Score image files in a stream: the body of ``distillad predict``, for PyTorch runs and exported models.

Nothing here imports Lightning or anomalib; the model is any :data:`BatchScorer`, a function from a
float32 image batch (B, 3, S, S) in [0, 1] to anomaly maps and scores: a run's PyTorch model
(:func:`distillad.pipeline.predict`) or an exported one (:mod:`distillad.runtime`).

:func:`predict_images` reads the images with a ``DataLoader`` (``batch_size``, ``num_workers``),
writes every ``predictions.csv`` row as soon as its batch is scored (into a temporary file that replaces
``predictions.csv`` once every image is scored, so an interrupted run leaves the previous file intact) and
keeps no maps or rows, so memory does not grow with the number of images. Unreadable files get an
``error`` row and the run goes on. Images are resized to S x S with antialiasing, as in training and testing.

Calibrated decisions. The decision threshold (``is_anomalous``) is the (1 - false-alarm rate) quantile,
the 99th percentile by default (linear interpolation), of the image scores of a run's held-out normal
training images (and of any ``--calibration-dir``): it flags about 1% of normal images and never looks at
test labels. ``normalized_score`` in [0, 1] maps the lowest held-out
normal score to 0 and the threshold to 0.5, linearly, and clips at 1 (anomalib's min-max rule with the
threshold at 0.5; the maximum is taken symmetric to the minimum because no anomalous image is seen
before testing), so ``normalized_score >= 0.5`` is exactly ``is_anomalous``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import resize
from tqdm.auto import tqdm

from distillad.data.io import IMAGE_EXTENSIONS, is_image_file, read_image
from distillad.errors import DistilladError
from distillad.runtime import load_exported
from distillad.storage import atomic_writer

THRESHOLD_QUANTILE = 0.99
PREDICTION_COLUMNS = ["path", "score", "normalized_score", "is_anomalous", "error"]

#: Images (B, 3, S, S) in [0, 1] -> anomaly maps (B, 1, S, S), scores (B,) and, when asked for, component maps.
BatchScorer = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]]


def overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, map_range: tuple[float, float]) -> np.ndarray:
    """A BGR picture: the image blended with the JET-coloured map (red = at or above the decision threshold)."""
    low, high = map_range
    scaled = np.clip((anomaly_map - low) / (high - low), 0, 1)
    scaled = cv2.resize(scaled.astype(np.float32), (image_rgb.shape[1], image_rgb.shape[0]))
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), 0.5, heat, 0.5, 0)


def unique_name(path: str, used: set[str]) -> str:
    """A file stem for ``path``'s pictures (parent folder + stem), made unique against ``used`` (updated)."""
    parts = Path(path).parts
    name = "_".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    stem = Path(name).stem
    candidate, index = stem, 1
    while candidate in used:
        candidate, index = f"{stem}_{index}", index + 1
    used.add(candidate)
    return candidate


class ImageFiles(Dataset):
    """Images given by path, read robustly; unreadable files yield an error string instead of failing the run.

    Items are ``(path, image or None, error)`` with the image a float (3, S, S) tensor in [0, 1].
    """

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str]:
        path = self.paths[index]
        try:
            image = torch.from_numpy(read_image(path)).permute(2, 0, 1).float() / 255
        except DistilladError as error:
            return str(path), None, str(error)
        return str(path), resize(image, [self.size, self.size], antialias=True), ""


def collate(items: list[tuple]) -> tuple[list[str], torch.Tensor | None, list[str]]:
    """Batch :class:`ImageFiles` items: paths, the stacked readable images (or ``None``), errors."""
    paths, images, errors = zip(*items)
    good = [image for image in images if image is not None]
    return list(paths), torch.stack(good) if good else None, list(errors)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); stray non-image files are ignored."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                msg = f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}; pass a folder with images"
                raise DistilladError(msg)
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            msg = f"input {item} does not exist; pass image files or folders to --input"
            raise DistilladError(msg)
    return paths


def component_grid(image_rgb: np.ndarray, fused: np.ndarray, components: dict[str, np.ndarray],
                   map_range: tuple[float, float], tile: int = 192) -> np.ndarray:
    """A BGR grid: the fused overlay, then every component map on one shared colour scale (paper Fig. 8).

    Rows are the branches (one row per name prefix, e.g. ``ngm`` and ``aim``), columns the stages; the
    first column holds the image and the fused-map overlay.
    """
    image = cv2.resize(image_rgb, (tile, tile))
    fused_tile = overlay(image, cv2.resize(fused, (tile, tile)), map_range)
    top = max(float(m.max()) for m in components.values()) or 1.0
    rows: dict[str, list[np.ndarray]] = {}
    for name, component in components.items():
        scaled = np.clip(cv2.resize(component, (tile, tile)) / top, 0, 1)
        picture = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
        cv2.putText(picture, name, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        rows.setdefault(name.split("_")[0], []).append(picture)
    first_column = [cv2.cvtColor(image, cv2.COLOR_RGB2BGR), fused_tile]
    lines = [np.hstack([first_column[i % 2], *tiles]) for i, tiles in enumerate(rows.values())]
    width = max(line.shape[1] for line in lines)
    return np.vstack([np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0))) for line in lines])


@dataclass(frozen=True)
class Scorer:
    """A model ready to score images, with what its run calibrated to turn outputs into decisions and pictures.

    ``normalize`` maps raw scores to [0, 1] (:func:`normalize_scores` with the run's threshold
    and floor); ``None`` for runs without a calibrated floor, whose ``normalized_score`` stays empty.
    """

    score_batch: BatchScorer
    image_size: int
    threshold: float
    map_range: tuple[float, float]
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    calibration_images: int | None = None


@dataclass(frozen=True)
class PredictionSummary:
    """Counts of a finished prediction and where its rows are."""

    images: int
    anomalous: int
    unreadable: int
    csv_path: Path
    calibration_images: int | None = None


def predict_images(scorer: Scorer, inputs: list[str | Path], out_dir: Path, batch_size: int = 16, num_workers: int = 0,
                   heatmaps: bool = True, component_maps: bool = False) -> PredictionSummary:
    """Score images and folders; writes ``OUT/predictions.csv`` row by row and ``OUT/heatmaps/*.png``.

    With ``component_maps`` (the scorer must return them), also writes ``OUT/components/<image>.png``.
    """
    out_dir = Path(out_dir)
    paths = expand_inputs(inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in (["heatmaps"] if heatmaps else []) + (["components"] if component_maps else []):
        (out_dir / folder).mkdir(exist_ok=True)
    loader = DataLoader(ImageFiles(paths, scorer.image_size), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate)
    used: set[str] = set()
    anomalous = unreadable = 0
    csv_path = out_dir / "predictions.csv"
    with atomic_writer(csv_path, newline="") as handle, tqdm(total=len(paths), desc="predicting", unit="img") as progress:
        writer = csv.DictWriter(handle, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        for batch_paths, images, errors in loader:
            maps, scores, components = scorer.score_batch(images) if images is not None else (None, None, None)
            normalized = None
            if scorer.normalize is not None and scores is not None:
                normalized = scorer.normalize(torch.from_numpy(scores)).tolist()
            good_index = 0
            for path, error in zip(batch_paths, errors):
                if error:
                    unreadable += 1
                    writer.writerow({"path": path, "score": "", "normalized_score": "", "is_anomalous": "", "error": error})
                    continue
                score = float(scores[good_index])  # compared in double precision, as normalize_scores does
                decision = int(score >= scorer.threshold)
                anomalous += decision
                if heatmaps or component_maps:
                    parts = None if components is None else {key: value[good_index, 0] for key, value in components.items()}
                    _write_pictures(out_dir, path, unique_name(path, used), maps[good_index, 0], parts, scorer.map_range,
                                    heatmaps)
                writer.writerow({"path": path, "score": f"{score:.6f}", "is_anomalous": decision, "error": "",
                                 "normalized_score": "" if normalized is None else repr(normalized[good_index])})
                good_index += 1
            handle.flush()
            progress.update(len(batch_paths))
    return PredictionSummary(len(paths), anomalous, unreadable, csv_path, scorer.calibration_images)


def _write_pictures(out_dir: Path, path: str, name: str, anomaly_map: np.ndarray, components: dict[str, np.ndarray] | None,
                    map_range: tuple[float, float], heatmap: bool) -> None:
    image = read_image(path)
    if heatmap:
        cv2.imwrite(str(out_dir / "heatmaps" / f"{name}.png"), overlay(image, anomaly_map, map_range))
    if components:
        cv2.imwrite(str(out_dir / "components" / f"{name}.png"), component_grid(image, anomaly_map, components, map_range))


def decision_threshold(normal_scores: torch.Tensor, quantile: float = THRESHOLD_QUANTILE) -> float:
    """The calibrated decision threshold: the ``quantile`` of normal image scores (see module docstring)."""
    return float(torch.quantile(normal_scores.double().flatten(), quantile))


def normalize_scores(scores: torch.Tensor, threshold: float, floor: float) -> torch.Tensor:
    """Scores mapped to [0, 1]: ``floor`` -> 0, ``threshold`` -> 0.5, linear, clipped (module docstring)."""
    spread = max(threshold - floor, 1e-12)
    return (0.5 + 0.5 * (scores.double() - threshold) / spread).clamp(0, 1)


def score_normalizer(threshold: float, floor: float | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """:func:`normalize_scores` bound to a run's calibration; ``None`` for runs saved before the floor existed."""
    return None if floor is None else partial(normalize_scores, threshold=threshold, floor=floor)


def predict_exported(export_dir: Path, inputs: list[str | Path], out_dir: Path, batch_size: int = 16,
                     num_workers: int = 0, heatmaps: bool = True, threads: int | None = None) -> PredictionSummary:
    """Score images with an exported model (:func:`distillad.runtime.load_exported`) and the calibration in its
    ``metadata.json``; the same outputs as :func:`distillad.pipeline.predict`, without Lightning."""
    model = load_exported(export_dir, threads)
    threshold = model.metadata["threshold"]

    def score_batch(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, None]:
        return (*model(images.numpy()), None)

    scorer = Scorer(score_batch, model.image_size, threshold, tuple(model.metadata["map_range"]),
                    score_normalizer(threshold, model.metadata.get("score_floor")),
                    model.metadata.get("calibration_images"))
    return predict_images(scorer, inputs, out_dir, batch_size, num_workers, heatmaps)
