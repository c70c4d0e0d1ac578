"""Train, evaluate and predict with a run directory; what the ``distillad`` CLI and the benchmarks call.

A run directory holds everything a trained model needs::

    RUN/config.json           model name and options, data spec, training settings, calibration, versions
    RUN/model.ckpt            the final Lightning checkpoint (teacher included, so no weights are needed offline)
    RUN/checkpoints/last.ckpt written every epoch; ``fit --resume`` continues from it
    RUN/metrics.json          test metrics (image/pixel AUROC, AUPRO, F1-max, timings)
    RUN/test_scores.csv       per test image: path, label, score, normalised score, decision
RUN/curves.json           image ROC, pixel ROC and PRO curves of the test split
    RUN/heatmaps/*.png        anomaly-map overlays of the test images

Decision threshold (``predict``'s ``is_anomalous``): the 99th percentile (linear interpolation) of the
image scores of the held-out normal training images (``val_split_ratio`` of train/good, 10% by default),
computed at the end of ``fit``; it flags about 1% of normal images. Without held-out images it falls
back to the training images' scores. The F1-optimal threshold on the test split is reported beside it in
``metrics.json`` but never used for decisions, because it looks at test labels.

Normalised scores (``normalized_score``, in [0, 1]) map the lowest held-out normal score to 0 and the
threshold to 0.5, linearly, and clip at 1 (anomalib's min-max rule with the threshold at 0.5, where the
maximum is taken symmetric to the minimum because no anomalous image is seen before testing). So
``normalized_score >= 0.5`` is exactly ``is_anomalous``.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

import anomalib
import cv2
import lightning
import numpy as np
import timm
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import resize
from tqdm.auto import tqdm

from distillad.data import FolderLayout, MVTecLayout, is_image_file, read_image
from distillad.data.io import IMAGE_EXTENSIONS
from distillad.errors import DistilladError
from distillad.metrics import aupro, auroc, f1_max, pro_curve, roc_curve
from distillad.models.registry import get_model_class, model_options

THRESHOLD_QUANTILE = 0.99
DISABLED_COMPONENTS = {"post_processor": False, "evaluator": False, "visualizer": False}


@dataclass
class RunConfig:
    """Everything needed to rebuild, re-test and use a run."""

    model: str
    model_options: dict
    data: dict
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    image_size: int = 256
    epochs: int = 1
    batch_size: int = 16
    seed: int = 0
    num_workers: int = 0
    threshold: float | None = None
    threshold_source: str = ""
    score_floor: float | None = None
    map_range: tuple[float, float] = (0.0, 1.0)
    versions: dict = field(default_factory=dict)
    test_limit: int | None = None

    def save(self, run_dir: Path) -> None:
        (run_dir / "config.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> RunConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            msg = f"{run_dir} is not a distillad run (no config.json); pass the --out folder of a finished 'distillad fit'"
            raise DistilladError(msg)
        return cls(**json.loads(path.read_text()))


@dataclass
class Predictions:
    """Model outputs over a dataloader, on the CPU."""

    paths: list[str]
    scores: torch.Tensor
    maps: torch.Tensor
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None


def versions() -> dict:
    return {"distillad": package_version("distillad"), "anomalib": anomalib.__version__, "torch": torch.__version__,
            "lightning": lightning.__version__, "timm": timm.__version__, "python": platform.python_version()}


def build_datamodule(config: RunConfig, train_limit: int | None = None, test_limit: int | None = None):
    """The datamodule described by ``config.data`` (``kind`` ``mvtec`` or ``folder``)."""
    data = dict(config.data)
    kind = data.pop("kind")
    common = {"image_size": (config.image_size, config.image_size), "train_batch_size": config.batch_size,
              "eval_batch_size": config.batch_size, "num_workers": config.num_workers, "seed": config.seed,
              "train_limit": train_limit, "test_limit": test_limit}
    if kind == "mvtec":
        return MVTecLayout(data["root"], data["category"], **common)
    return FolderLayout(data["normal_dir"], data.get("abnormal_dir"), data.get("mask_dir"),
                        data.get("normal_test_dir"), **common)


def build_model(config: RunConfig) -> torch.nn.Module:
    """A fresh model for ``config`` (encoder weights resolved offline-first)."""
    model_class = get_model_class(config.model)
    allowed = model_options(model_class)
    unknown = sorted(set(config.model_options) - set(allowed))
    if unknown:
        msg = (f"unknown option(s) {', '.join(unknown)} for model '{config.model}'; "
               f"valid: {', '.join(sorted(allowed)) or 'none'}")
        raise DistilladError(msg)
    try:
        return model_class(backbone=config.backbone, pretrained=config.pretrained, weights=config.weights,
                           image_size=(config.image_size, config.image_size), **config.model_options,
                           **DISABLED_COMPONENTS)
    except (ValueError, TypeError) as error:
        msg = f"invalid option for model '{config.model}': {error}"
        raise DistilladError(msg) from error


def load_model(run_dir: Path) -> tuple[torch.nn.Module, RunConfig]:
    """The trained model of a run, in eval mode, without resolving encoder weights again."""
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir)
    checkpoint = run_dir / "model.ckpt"
    if not checkpoint.is_file():
        msg = f"{run_dir} has no model.ckpt (training did not finish); rerun 'distillad fit ... --out {run_dir} --resume'"
        raise DistilladError(msg)
    model_class = get_model_class(config.model)
    model = model_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False, pretrained=False,
                                             weights=None, **DISABLED_COMPONENTS)
    return model.eval(), config


@torch.no_grad()
def collect(model: torch.nn.Module, dataloader: DataLoader, description: str) -> Predictions:
    """Run ``model`` over an anomalib dataloader and gather scores, maps and ground truth."""
    model.eval()
    paths, scores, maps, labels, masks = [], [], [], [], []
    for batch in tqdm(dataloader, desc=description, unit="batch", leave=False):
        output = model.model(model.model_inputs(batch.image))
        paths.extend(str(p) for p in batch.image_path)
        scores.append(output.pred_score.float().cpu())
        maps.append(output.anomaly_map.float().cpu())
        if batch.gt_label is not None:
            labels.append(batch.gt_label.cpu())
        if batch.gt_mask is not None:
            mask = batch.gt_mask.cpu()
            masks.append(resize(mask.unsqueeze(1), list(output.anomaly_map.shape[-2:]), antialias=False).squeeze(1))
    return Predictions(paths, torch.cat(scores), torch.cat(maps),
                       torch.cat(labels) if labels else None, torch.cat(masks) if masks else None)


def decision_threshold(normal_scores: torch.Tensor, quantile: float = THRESHOLD_QUANTILE) -> float:
    """The calibrated decision threshold: the ``quantile`` of normal image scores (see module docstring)."""
    return float(torch.quantile(normal_scores.double().flatten(), quantile))


def normalize_scores(scores: torch.Tensor, threshold: float, floor: float) -> torch.Tensor:
    """Scores mapped to [0, 1]: ``floor`` -> 0, ``threshold`` -> 0.5, linear, clipped (module docstring)."""
    spread = max(threshold - floor, 1e-12)
    return (0.5 + 0.5 * (scores.double() - threshold) / spread).clamp(0, 1)


@dataclass
class Calibration:
    """What ``fit`` learns from held-out normal images to turn raw outputs into decisions and pictures."""

    threshold: float
    score_floor: float
    map_range: tuple[float, float]


def calibrate(normal: Predictions) -> Calibration:
    """Decision threshold, normalisation floor and overlay range from held-out normal predictions."""
    threshold = decision_threshold(normal.scores)
    low = float(torch.quantile(normal.maps.flatten()[:: max(1, normal.maps.numel() // 1_000_000)].double(), 0.01))
    return Calibration(threshold, float(normal.scores.min()), (low, max(threshold, low + 1e-6)))


def evaluate(predictions: Predictions, threshold: float) -> dict:
    """Image/pixel AUROC, AUPRO (FPR 0.3), image F1-max and the F1 of the calibrated threshold."""
    labels = predictions.labels.long()
    best_f1, best_threshold = f1_max(predictions.scores, labels)
    decisions = predictions.scores >= threshold
    true_positive = int((decisions & (labels == 1)).sum())
    precision = true_positive / max(int(decisions.sum()), 1)
    recall = true_positive / max(int((labels == 1).sum()), 1)
    metrics = {
        "image_AUROC": auroc(predictions.scores, labels),
        "image_F1max": best_f1,
        "image_F1max_threshold": best_threshold,
        "image_F1_at_threshold": 2 * precision * recall / max(precision + recall, 1e-12),
        "threshold": threshold,
        "num_test_images": len(labels),
        "num_anomalous": int((labels == 1).sum()),
    }
    if predictions.masks is not None and predictions.masks.sum() > 0:
        metrics["pixel_AUROC"] = auroc(predictions.maps, predictions.masks)
        metrics["pixel_AUPRO"] = aupro(predictions.maps, predictions.masks, fpr_limit=0.3)
    return metrics


def _thinned(x: torch.Tensor, y: torch.Tensor, points: int) -> dict[str, list[float]]:
    keep = torch.linspace(0, len(x) - 1, min(points, len(x))).round().long()
    return {"x": [round(float(v), 6) for v in x[keep]], "y": [round(float(v), 6) for v in y[keep]]}


def curves(predictions: Predictions, points: int = 300) -> dict[str, dict[str, list[float]]]:
    """Image ROC, pixel ROC and PRO (FPR <= 0.3) curves, thinned to ``points`` points, for plots."""
    labels = predictions.labels.long()
    result = {"image_ROC": _thinned(*roc_curve(predictions.scores, labels), points)}
    if predictions.masks is not None and predictions.masks.sum() > 0:
        result["pixel_ROC"] = _thinned(*roc_curve(predictions.maps, predictions.masks), points)
        result["PRO"] = _thinned(*pro_curve(predictions.maps, predictions.masks, fpr_limit=0.3), points)
    return result


def overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, map_range: tuple[float, float]) -> np.ndarray:
    """A BGR picture: the image blended with the JET-coloured map (red = at or above the decision threshold)."""
    low, high = map_range
    scaled = np.clip((anomaly_map - low) / (high - low), 0, 1)
    scaled = cv2.resize(scaled.astype(np.float32), (image_rgb.shape[1], image_rgb.shape[0]))
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), 0.5, heat, 0.5, 0)


def _unique_name(path: str, used: set[str]) -> str:
    parts = Path(path).parts
    name = "_".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    stem = Path(name).stem
    candidate, index = stem, 1
    while candidate in used:
        candidate, index = f"{stem}_{index}", index + 1
    used.add(candidate)
    return candidate


def write_heatmaps(predictions: Predictions, out_dir: Path, map_range: tuple[float, float]) -> None:
    """One overlay PNG per image, at the image's original resolution."""
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path, anomaly_map in tqdm(list(zip(predictions.paths, predictions.maps)), desc="heatmaps", leave=False):
        image = read_image(path)
        cv2.imwrite(str(out_dir / f"{_unique_name(path, used)}.png"), overlay(image, anomaly_map[0].numpy(), map_range))


def _trainer(config: RunConfig, run_dir: Path, model: torch.nn.Module) -> Trainer:
    # save_last with save_top_k=0 never writes last.ckpt in Lightning 2.6: keep the single newest instead.
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1,
                                 enable_version_counter=False)
    arguments = {**model.trainer_arguments, "max_epochs": config.epochs, "default_root_dir": run_dir,
                 "callbacks": [checkpoint], "logger": CSVLogger(run_dir, name="logs"), "limit_val_batches": 0,
                 "deterministic": "warn", "enable_model_summary": False}
    return Trainer(**arguments)


def fit(config: RunConfig, run_dir: Path, resume: bool = False, train_limit: int | None = None,
        test_limit: int | None = None, heatmaps: bool = True) -> dict:
    """Train ``config`` into ``run_dir``, calibrate the threshold, test, and write the run files."""
    run_dir = Path(run_dir)
    get_model_class(config.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.versions = versions()
    config.test_limit = test_limit  # so that 'distillad test' re-evaluates the same test images
    seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config, train_limit, test_limit)
    datamodule.setup()
    model = build_model(config)
    config.save(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer = _trainer(config, run_dir, model)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=last if resume and last.is_file() else None)
    train_seconds = time.perf_counter() - started
    trainer.save_checkpoint(run_dir / "model.ckpt")
    model.eval()
    has_val = getattr(datamodule, "val_data", None) is not None and len(datamodule.val_data) > 0
    normal_loader = datamodule.val_dataloader() if has_val else datamodule.train_dataloader()
    calibration = calibrate(collect(model, normal_loader, "calibrating"))
    config.threshold, config.score_floor, config.map_range = calibration.threshold, calibration.score_floor, calibration.map_range
    config.threshold_source = "held-out normal images" if has_val else "training images (no held-out split)"
    config.save(run_dir)
    metrics = test(run_dir, model=model, config=config, datamodule=datamodule, heatmaps=heatmaps)
    metrics["train_seconds"] = train_seconds
    metrics["seconds_per_epoch"] = train_seconds / max(trainer.current_epoch, 1)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def test(run_dir: Path, model: torch.nn.Module | None = None, config: RunConfig | None = None,
         datamodule=None, heatmaps: bool = True) -> dict:
    """Evaluate a run on its test split; writes metrics.json, test_scores.csv and heatmaps."""
    run_dir = Path(run_dir)
    if model is None:
        model, config = load_model(run_dir)
    if datamodule is None:
        datamodule = build_datamodule(config, test_limit=config.test_limit)
        datamodule.setup()
    started = time.perf_counter()
    predictions = collect(model, datamodule.test_dataloader(), "testing")
    seconds = time.perf_counter() - started
    if predictions.labels is None or predictions.labels.min() == predictions.labels.max():
        msg = "the test split needs both normal and anomalous images to compute metrics; add test/good and defect folders"
        raise DistilladError(msg)
    metrics = evaluate(predictions, config.threshold)
    (run_dir / "curves.json").write_text(json.dumps(curves(predictions)))
    metrics["test_ms_per_image"] = 1000 * seconds / len(predictions.paths)
    metrics.update({"model": config.model, "backbone": config.backbone, "image_size": config.image_size,
                    "epochs": config.epochs, "seed": config.seed})
    with (run_dir / "test_scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "score", "normalized_score", "is_anomalous"])
        floor = config.score_floor if config.score_floor is not None else float(predictions.scores.min())
        normalized = normalize_scores(predictions.scores, config.threshold, floor).tolist()
        for path, label, score, unit in zip(predictions.paths, predictions.labels.long().tolist(),
                                            predictions.scores.tolist(), normalized):
            writer.writerow([path, label, f"{score:.6f}", f"{unit:.6f}", int(score >= config.threshold)])
    if heatmaps:
        write_heatmaps(predictions, run_dir / "heatmaps", tuple(config.map_range))
    previous = run_dir / "metrics.json"
    if previous.is_file():  # keep what only training measured (train_seconds, seconds_per_epoch)
        metrics = {**json.loads(previous.read_text()), **metrics}
    previous.write_text(json.dumps(metrics, indent=2))
    return metrics


class _PathDataset(Dataset):
    """Images given by path, read robustly; unreadable files yield an error string instead of failing the run."""

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


def _collate(items: list[tuple]) -> tuple:
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


@torch.no_grad()
def predict(run_dir: Path, inputs: list[str | Path], out_dir: Path, batch_size: int = 16,
            num_workers: int = 0, component_maps: bool = False) -> list[dict]:
    """Score images with a trained run; writes predictions.csv and one heatmap overlay per image.

    With ``component_maps`` and a model that provides them (DMDD: the 4 NGM and 4 AIM maps), also
    writes ``OUT/components/<image>.png`` grids showing which branch and stage fired.
    """
    model, config = load_model(run_dir)
    out_dir = Path(out_dir)
    heatmap_dir = out_dir / "heatmaps"
    heatmap_dir.mkdir(parents=True, exist_ok=True)
    breakdown = component_maps and hasattr(model.model, "forward_with_components")
    if component_maps and not breakdown:
        msg = f"model '{config.model}' has no component maps; drop --component-maps (DMDD provides them)"
        raise DistilladError(msg)
    if breakdown:
        (out_dir / "components").mkdir(exist_ok=True)
    loader = DataLoader(_PathDataset(expand_inputs(inputs), config.image_size), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    rows, used = [], set()
    for paths, images, errors in tqdm(loader, desc="predicting", unit="batch"):
        output, components = None, None
        if images is not None:
            output, components = model.model.forward_with_components(images) if breakdown else (model.model(images), None)
        good_index = 0
        for path, error in zip(paths, errors):
            if error:
                rows.append({"path": path, "score": "", "is_anomalous": "", "error": error})
                continue
            score = float(output.pred_score[good_index])
            anomaly_map = output.anomaly_map[good_index, 0].numpy()
            image = read_image(path)
            name = _unique_name(path, used)
            cv2.imwrite(str(heatmap_dir / f"{name}.png"), overlay(image, anomaly_map, tuple(config.map_range)))
            if components is not None:
                maps = {key: value[good_index, 0].numpy() for key, value in components.items()}
                grid = component_grid(image, anomaly_map, maps, tuple(config.map_range))
                cv2.imwrite(str(out_dir / "components" / f"{name}.png"), grid)
            good_index += 1
            rows.append({"path": path, "score": f"{score:.6f}", "is_anomalous": int(score >= config.threshold),
                         "error": ""})
    with (out_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "score", "is_anomalous", "error"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
