"""Train, evaluate and predict with a run directory; what the ``distillad`` CLI and the benchmarks call.

A run directory holds everything a trained model needs::

    RUN/config.json           model name and options, data spec, training settings, calibration, versions
    RUN/model.ckpt            the final Lightning checkpoint (teacher included, so no weights are needed offline)
    RUN/checkpoints/last.ckpt written every epoch; ``fit --resume`` continues from it
    RUN/training.json         seconds, epochs and optimiser steps trained by the last ``fit``
    RUN/metrics.json          test metrics (image/pixel AUROC, AUPRO, F1-max, timings), the per-epoch synthetic
                          validation scores of held-out training images (``validation_curve``)
    RUN/test_scores.csv       per test image: path, label, score, normalised score, decision
    RUN/curves.json           image ROC, pixel ROC and PRO curves of the test split
    RUN/heatmaps/*.png        anomaly-map overlays of the test images

Training runs in Lightning's ``Trainer`` with the run's ``precision`` (``32``, ``bf16-mixed``, ``16-mixed``),
``accelerator``, ``devices`` and ``strategy`` (``ddp`` for several devices or CPU processes; ``batch_size`` is the
total over the devices), for ``epochs`` or, when given, ``max_steps`` optimiser steps. Calibration, test and
inference run in float32 in the calling process.

Calibration (rule in :mod:`distillad.inference`): at the end of ``fit`` the decision threshold (the
``1 - false_alarm_rate`` quantile of normal scores) and the normalisation floor come from the held-out normal
training images (``val_split_ratio`` of train/good, 10% by default), or from the training images when none
are held out, plus the images of ``calibration_dir``; ``calibration_images`` says how many, and fewer than
:data:`MIN_CALIBRATION_IMAGES` draw a warning. The F1-optimal threshold on the test
split is reported beside it in ``metrics.json`` but never used for decisions, because it looks at test
labels.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import shutil
import signal
import threading
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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import resize
from tqdm.auto import tqdm

from distillad.data import DistilladDataModule, FolderLayout, one_pass, read_image
from distillad.data.io import check_readable
from distillad.data.layouts import dataset_layout
from distillad.errors import DistilladError
from distillad.inference import (
    ImageFiles,
    PredictionSummary,
    Scorer,
    collate,
    decision_threshold,
    expand_inputs,
    overlay,
    predict_images,
    score_normalizer,
    unique_name,
)
from distillad.metrics import aupro, auroc, f1_max, mvtec_loco_metrics, pro_curve, roc_curve
from distillad.models.registry import check_model_options, get_model_class, model_options
from distillad.storage import atomic_writer, read_checkpoint, write_json, write_text
from distillad.training import ACCELERATORS, PRECISIONS, STRATEGIES, cpu_has_native_bf16

DISABLED_COMPONENTS = {"post_processor": False, "evaluator": False, "visualizer": False}


def normalized_data(data: dict) -> dict:
    """``config.data`` with the old dataset name ``mvtec`` (runs saved before ``--dataset``) as ``mvtec_ad``."""
    return {**data, "kind": "mvtec_ad"} if data.get("kind") == "mvtec" else data


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
    max_steps: int | None = None
    precision: str = "32"
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    val_split_ratio: float = 0.1
    false_alarm_rate: float = 0.01
    calibration_dir: str | None = None
    threshold: float | None = None
    threshold_source: str = ""
    calibration_images: int | None = None
    score_floor: float | None = None
    map_range: tuple[float, float] = (0.0, 1.0)
    versions: dict = field(default_factory=dict)
    train_limit: int | None = None
    test_limit: int | None = None

    def __post_init__(self) -> None:
        self.data = normalized_data(self.data)

    def save(self, run_dir: Path) -> None:
        write_json(run_dir / "config.json", asdict(self))

    @property
    def device_batch_size(self) -> int:
        """Training images per device and step: ``batch_size`` is the total over ``devices``."""
        return self.batch_size // self.devices

    def check_training(self) -> None:
        """One-line errors for settings the trainer would reject late or silently misread."""
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.accelerator not in ACCELERATORS:
            problems.append(f"accelerator '{self.accelerator}' is not one of {', '.join(ACCELERATORS)}")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy '{self.strategy}' is not one of {', '.join(STRATEGIES)}")
        if self.devices < 1:
            problems.append(f"devices must be >= 1, got {self.devices}")
        elif self.batch_size % self.devices:
            problems.append(f"batch size {self.batch_size} is not divisible by {self.devices} devices "
                            "(the batch size is the total over all devices)")
        if self.devices > 1 and self.strategy == "auto":
            problems.append(f"--devices {self.devices} needs --strategy ddp")
        if self.accelerator == "gpu" and torch.cuda.device_count() < self.devices:
            problems.append(f"--accelerator gpu with {self.devices} device(s), but {torch.cuda.device_count()} CUDA GPU(s) "
                            "are visible; use --accelerator cpu (or auto), or fewer --devices")
        if not 0 < self.false_alarm_rate < 0.5:
            problems.append(f"false_alarm_rate must be in (0, 0.5), got {self.false_alarm_rate}")
        if self.calibration_dir is not None and not Path(self.calibration_dir).is_dir():
            problems.append(f"calibration_dir {self.calibration_dir} is not a folder; pass a folder of normal images")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if problems:
            raise DistilladError("; ".join(problems))

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
    """The datamodule described by ``config.data``: ``kind`` ``folder`` (plain folders) or a dataset of
    :data:`distillad.data.layouts.DATASETS` with ``root`` and ``category``."""
    data = dict(config.data)
    kind = data.pop("kind")
    common = {"image_size": (config.image_size, config.image_size), "train_batch_size": config.device_batch_size,
              "eval_batch_size": config.batch_size, "num_workers": config.num_workers, "seed": config.seed,
              "val_split_ratio": config.val_split_ratio,
              "train_limit": train_limit, "test_limit": test_limit}
    if kind == "folder":
        return FolderLayout(data["normal_dir"], data.get("abnormal_dir"), data.get("mask_dir"),
                            data.get("normal_test_dir"), **common)
    samples = dataset_layout(kind).samples(data["root"], data["category"])
    return DistilladDataModule(samples, category=data["category"], **common)


def build_model(config: RunConfig) -> torch.nn.Module:
    """A fresh model for ``config`` (encoder weights resolved offline-first)."""
    check_model_options(config.model, config.model_options)
    model_class = get_model_class(config.model)
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
    if config.threshold is None:
        msg = (f"{run_dir} stopped after training, before calibration (config.json has no threshold); rerun "
               f"'distillad fit ... --out {run_dir} --resume' to finish it")
        raise DistilladError(msg)
    fix = f"rerun 'distillad fit ... --out {run_dir} --resume' on the machine that trained it, or train again"
    model = restore(config.model, read_checkpoint(checkpoint, fix), fix)
    return model.eval(), config


def restore(model_name: str, checkpoint: dict, fix: str) -> torch.nn.Module:
    """The ``model_name`` model that ``checkpoint`` (from :func:`~distillad.storage.read_checkpoint`) holds, built from
    its own hyperparameters without resolving encoder weights again (the checkpoint holds them)."""
    model_class = get_model_class(model_name)
    options = {key: value for key, value in checkpoint.get("hyper_parameters", {}).items()
               if key in model_options(model_class) or key in ("backbone", "image_size")}
    try:
        model = model_class(**options, pretrained=False, weights=None, **DISABLED_COMPONENTS)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0][:160]
        msg = f"the checkpoint does not hold a '{model_name}' model as its config.json says ({reason}); {fix}"
        raise DistilladError(msg) from error
    return model


@torch.no_grad()
def collect(model: torch.nn.Module, dataloader: DataLoader, description: str) -> Predictions:
    """Run ``model`` over an anomalib dataloader and gather scores, maps and ground truth."""
    model.eval()
    paths, scores, maps, labels, masks = [], [], [], [], []
    for batch in one_pass(dataloader, description):
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


@dataclass
class Calibration:
    """What ``fit`` learns from held-out normal images to turn raw outputs into decisions and pictures."""

    threshold: float
    score_floor: float
    map_range: tuple[float, float]


def calibrate(normal: Predictions, false_alarm_rate: float = 0.01) -> Calibration:
    """Decision threshold (the ``1 - false_alarm_rate`` quantile of the scores), normalisation floor and overlay
    range from held-out normal predictions."""
    threshold = decision_threshold(normal.scores, 1 - false_alarm_rate)
    low = float(torch.quantile(normal.maps.flatten()[:: max(1, normal.maps.numel() // 1_000_000)].double(), 0.01))
    return Calibration(threshold, float(normal.scores.min()), (low, max(threshold, low + 1e-6)))


@torch.no_grad()
def collect_folder(model: torch.nn.Module, folder: Path, image_size: int, batch_size: int) -> Predictions:
    """Scores and maps of the images in ``folder``, read and resized as ``predict`` reads them."""
    paths = expand_inputs([folder])
    check_readable((path, "image") for path in paths)
    scores, maps = [], []
    for _, images, _ in DataLoader(ImageFiles(paths, image_size), batch_size=batch_size, collate_fn=collate):
        output = model.model(model.model_inputs(images))
        scores.append(output.pred_score.float().cpu())
        maps.append(output.anomaly_map.float().cpu())
    return Predictions([str(path) for path in paths], torch.cat(scores), torch.cat(maps))


#: Fewer held-out normal images than this and the CLI warns that the threshold is a rough guess: a quantile
#: estimated from n scores moves by about one score's gap whenever one image is added or removed.
MIN_CALIBRATION_IMAGES = 20


def calibrate_run(model: torch.nn.Module, config: RunConfig, datamodule) -> None:
    """Calibrate ``config`` (threshold, floor, overlay range, their source and image count) on the held-out
    normal training images, or the training images when none are held out, plus ``config.calibration_dir``."""
    has_val = getattr(datamodule, "val_data", None) is not None and len(datamodule.val_data) > 0
    normal = collect(model, datamodule.val_dataloader() if has_val else datamodule.train_dataloader(), "calibrating")
    sources = ["held-out normal images" if has_val else "training images (no held-out split)"]
    if config.calibration_dir is not None:
        extra = collect_folder(model, Path(config.calibration_dir), config.image_size, config.batch_size)
        normal = Predictions(normal.paths + extra.paths, torch.cat([normal.scores, extra.scores]),
                             torch.cat([normal.maps, extra.maps]))
        sources.append(f"normal images in {config.calibration_dir}")
    calibration = calibrate(normal, config.false_alarm_rate)
    config.threshold, config.score_floor, config.map_range = (calibration.threshold, calibration.score_floor,
                                                              calibration.map_range)
    config.threshold_source, config.calibration_images = " and ".join(sources), len(normal.paths)
    if len(normal.paths) < MIN_CALIBRATION_IMAGES:
        logging.getLogger(__name__).warning(
            "the decision threshold rests on %d normal image(s) only (fewer than %d), so the false-alarm rate it "
            "aims at (%g) is a rough guess; give more with --calibration-dir FOLDER (normal images not used for "
            "training) or a larger --val-split-ratio", len(normal.paths), MIN_CALIBRATION_IMAGES,
            config.false_alarm_rate)


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
    # float64: float32 holds integers exactly only up to 2^24, and a pixel ROC curve can have more points (30M for
    # DSKD on mtd), where the last index rounded past the end
    keep = torch.linspace(0, len(x) - 1, min(points, len(x)), dtype=torch.float64).round().long()
    return {"x": [round(float(v), 6) for v in x[keep]], "y": [round(float(v), 6) for v in y[keep]]}


def curves(predictions: Predictions, points: int = 300) -> dict[str, dict[str, list[float]]]:
    """Image ROC, pixel ROC and PRO (FPR <= 0.3) curves, thinned to ``points`` points, for plots."""
    labels = predictions.labels.long()
    result = {"image_ROC": _thinned(*roc_curve(predictions.scores, labels), points)}
    if predictions.masks is not None and predictions.masks.sum() > 0:
        result["pixel_ROC"] = _thinned(*roc_curve(predictions.maps, predictions.masks), points)
        result["PRO"] = _thinned(*pro_curve(predictions.maps, predictions.masks, fpr_limit=0.3), points)
    return result


def write_heatmaps(predictions: Predictions, out_dir: Path, map_range: tuple[float, float]) -> None:
    """One overlay PNG per image, at the image's original resolution."""
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path, anomaly_map in tqdm(list(zip(predictions.paths, predictions.maps)), desc="heatmaps", leave=False):
        image = read_image(path)
        cv2.imwrite(str(out_dir / f"{unique_name(path, used)}.png"), overlay(image, anomaly_map[0].numpy(), map_range))


class TrainingClock(Callback):
    """Wall time, epochs and optimiser steps trained in this run of ``fit``, written to ``RUN/training.json``.

    Only what this process (or, under DDP, this launch) trained is counted, so a resumed run times its own
    epochs; a process that trains nothing (resumed from a complete checkpoint) leaves the file as it was.
    Written by global rank 0 at the end of training, because DDP trains in worker processes whose trainer
    state does not come back to the caller.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.first_epoch, self.first_step, self.started = 0, 0, 0.0

    def on_train_start(self, trainer: Trainer, pl_module: torch.nn.Module) -> None:
        del pl_module
        self.first_epoch, self.first_step = trainer.current_epoch, trainer.global_step
        self.started = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: torch.nn.Module) -> None:
        del pl_module
        if trainer.is_global_zero and trainer.global_step > self.first_step:
            write_json(self.path, {
                "seconds": time.perf_counter() - self.started, "epochs": trainer.current_epoch - self.first_epoch,
                "steps": trainer.global_step - self.first_step, "total_steps": trainer.global_step,
                "total_epochs": trainer.current_epoch}, indent=None)

    def measured(self) -> dict:
        """What the last process that trained this run measured (this one, unless its checkpoint was complete)."""
        return json.loads(self.path.read_text()) if self.path.is_file() else {}


class CtrlC(Callback):
    """Makes a Ctrl-C during training end it at the next batch at the latest.

    Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be, and C code that
    suppresses errors (an attribute lookup through a Python ``__getattr__``, a dictionary key's ``__eq__``) can
    swallow it: then training went on to its last epoch. The handler installed here raises as Python's own does
    and also records the press, which nothing can swallow; every batch end checks the record. Installed only over
    Python's default handler (never over one a caller set) and only in the main thread.
    """

    def __init__(self) -> None:
        self.pressed = False
        self.previous_handler = None

    def interrupt(self, signum: int, frame: object) -> None:
        del signum, frame
        self.pressed = True
        raise KeyboardInterrupt

    def on_train_start(self, trainer: Trainer, pl_module: torch.nn.Module) -> None:
        del trainer, pl_module
        self.pressed = False
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous_handler = signal.signal(signal.SIGINT, self.interrupt)

    def on_train_batch_end(self, *args: object) -> None:
        del args
        if self.pressed:
            raise KeyboardInterrupt

    on_validation_batch_end = on_train_batch_end

    def teardown(self, trainer: Trainer, pl_module: torch.nn.Module, stage: str) -> None:
        del trainer, pl_module, stage
        # After a Ctrl-C Lightning ignores SIGINT until it has shut down; that choice is left alone.
        if self.previous_handler is not None and signal.getsignal(signal.SIGINT) == self.interrupt:
            signal.signal(signal.SIGINT, self.previous_handler)
        self.previous_handler = None


def validation_curve(run_dir: Path) -> list[dict]:
    """The per-epoch synthetic validation scores (:mod:`distillad.models.validation`) that every ``fit`` of the
    run logged to ``RUN/logs/*/metrics.csv``, by epoch (a resumed run's later logs win)."""
    rows: dict[int, dict] = {}
    for path in sorted(run_dir.glob("logs/*/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val_synthetic_image_AUROC"):
                    rows[int(row["epoch"])] = {"epoch": int(row["epoch"]), "step": int(row["step"]),
                                               "image_AUROC": float(row["val_synthetic_image_AUROC"]),
                                               "pixel_AUROC": float(row["val_synthetic_pixel_AUROC"])}
    return [rows[epoch] for epoch in sorted(rows)]


def _strategy(config: RunConfig) -> str | DDPStrategy:
    """``ddp`` runs its processes with the spawn start method: training happens in workers, and ``fit`` goes on
    in the calling process (calibration and test run once, there) with rank 0's weights. Unlike Lightning's
    default (re-running the command line for every rank) this works from Python, notebooks, pytest and the
    benchmark's cell processes. Unused parameters are allowed: DMDD's MSN and AAND's idle stage take no part in
    a training step."""
    if config.strategy == "ddp":
        return DDPStrategy(start_method="spawn", find_unused_parameters=True)
    return config.strategy


def _trainer(config: RunConfig, run_dir: Path, model: torch.nn.Module, clock: TrainingClock) -> Trainer:
    # save_last with save_top_k=0 never writes last.ckpt in Lightning 2.6: keep the single newest instead.
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1,
                                 enable_version_counter=False)
    schedule = ({"max_steps": config.max_steps, "max_epochs": -1} if config.max_steps
                else {"max_epochs": config.epochs})
    arguments = {**model.trainer_arguments, **schedule, "default_root_dir": run_dir,
                 "callbacks": [checkpoint, clock, CtrlC()], "logger": CSVLogger(run_dir, name="logs"), "limit_val_batches": 0,
                 "deterministic": "warn", "enable_model_summary": False, "precision": config.precision,
                 "accelerator": config.accelerator, "devices": config.devices, "strategy": _strategy(config)}
    return Trainer(**arguments)


#: Settings a ``--resume`` must share with the run it continues (the schedule and devices may change).
RESUME_KEYS = ("model", "model_options", "data", "backbone", "pretrained", "weights", "image_size", "batch_size", "seed",
               "train_limit", "val_split_ratio")
#: What ``fit`` writes into a run directory, and so what ``--overwrite`` removes (nothing else is touched).
RUN_ENTRIES = ("config.json", "model.ckpt", "training.json", "metrics.json", "test_scores.csv", "curves.json",
               "checkpoints", "logs", "heatmaps", "export")


def claim_run_dir(config: RunConfig, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make sure ``fit`` may write ``run_dir``: a folder holding another run is refused unless the user resumes
    the same run or asks to overwrite it (then that run's files are removed first)."""
    if not (run_dir / "config.json").is_file():
        return
    if overwrite:
        for name in RUN_ENTRIES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return
    try:
        previous = json.loads((run_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{run_dir / 'config.json'} is unreadable ({error}); pass --overwrite to replace that run, or another --out"
        raise DistilladError(msg) from error
    if not resume:
        msg = (f"{run_dir} already holds a '{previous.get('model')}' run; pass --resume to continue it, --overwrite to "
               "replace it, or another --out")
        raise DistilladError(msg)
    current = asdict(config)
    previous["data"] = normalized_data(previous.get("data", {}))
    changed = [key for key in RESUME_KEYS if json.loads(json.dumps(current[key])) != previous.get(key, current[key])]
    if changed:
        differences = ", ".join(f"{key} {previous.get(key)!r} -> {current[key]!r}" for key in changed)
        msg = (f"--resume continues the run in {run_dir} with its own settings, but these differ: {differences}; "
               "pass the run's settings, --overwrite to replace it, or another --out")
        raise DistilladError(msg)


def _resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """``last.ckpt`` when resuming from one, after checking that it loads as data."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (resume and last.is_file()):
        return None
    read_checkpoint(last, f"delete it to train {run_dir} from the start, or pass --overwrite")
    return last


def fit(config: RunConfig, run_dir: Path, resume: bool = False, train_limit: int | None = None,
        test_limit: int | None = None, heatmaps: bool = True, overwrite: bool = False) -> dict:
    """Train ``config`` into ``run_dir``, calibrate the threshold, test, and write the run files.

    A ``run_dir`` that holds a run already is refused unless ``resume`` (same settings, see :data:`RESUME_KEYS`)
    or ``overwrite``; everything is checked before the first file is written.
    """
    run_dir = Path(run_dir)
    get_model_class(config.model)
    config.check_training()
    if config.precision == "bf16-mixed" and config.accelerator != "gpu" and not torch.cuda.is_available() \
            and not cpu_has_native_bf16():
        logging.getLogger(__name__).warning(
            "this CPU has no native bfloat16 (no AMX or AVX512-BF16): bf16-mixed trains slower than --precision 32")
    config.versions = versions()
    config.train_limit = train_limit
    config.test_limit = test_limit  # so that 'distillad test' re-evaluates the same test images
    seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config, train_limit, test_limit)
    datamodule.setup()
    datamodule.check_files()
    model = build_model(config)
    schedule = (config.epochs, config.max_steps or -1)
    try:
        model.check_schedule(*schedule)
    except ValueError as error:
        raise DistilladError(f"invalid schedule for model '{config.model}': {error}") from error
    claim_run_dir(config, run_dir, resume, overwrite)
    last = _resume_checkpoint(run_dir, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir)
    clock = TrainingClock(run_dir / "training.json")
    trainer = _trainer(config, run_dir, model, clock)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=last, weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after ignoring SIGINT
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise
    trained = clock.measured()
    model.cpu()
    trainer.save_checkpoint(run_dir / "model.ckpt")
    model.eval()
    calibrate_run(model, config, datamodule)
    config.save(run_dir)
    metrics = test(run_dir, model=model, config=config, datamodule=datamodule, heatmaps=heatmaps)
    metrics.update(model.training_report(datamodule, *schedule))
    metrics["validation_curve"] = validation_curve(run_dir)
    if trained.get("steps"):
        metrics["train_seconds"] = trained["seconds"]
        metrics["train_steps"] = trained["total_steps"]
        metrics["train_epochs"] = trained["total_epochs"]
        metrics["seconds_per_step"] = trained["seconds"] / trained["steps"]
        if trained["epochs"]:
            metrics["seconds_per_epoch"] = trained["seconds"] / trained["epochs"]
    write_json(run_dir / "metrics.json", metrics)
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
    if config.data.get("kind") == "mvtec_loco":
        defects = Path(config.data["root"]) / config.data["category"] / "defects_config.json"
        metrics.update(mvtec_loco_metrics(predictions.maps, predictions.scores, datamodule.test_data.samples, defects))
    write_json(run_dir / "curves.json", curves(predictions), indent=None)
    metrics["test_ms_per_image"] = 1000 * seconds / len(predictions.paths)
    metrics.update({"model": config.model, "backbone": config.backbone, "image_size": config.image_size,
                    "epochs": config.epochs, "max_steps": config.max_steps, "precision": config.precision,
                    "devices": config.devices, "seed": config.seed, "false_alarm_rate": config.false_alarm_rate,
                    "calibration_images": config.calibration_images, "threshold_source": config.threshold_source})
    with atomic_writer(run_dir / "test_scores.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "score", "normalized_score", "is_anomalous"])
        normalize = score_normalizer(config.threshold, config.score_floor)
        normalized = [""] * len(predictions.paths) if normalize is None else [
            f"{unit:.6f}" for unit in normalize(predictions.scores).tolist()]
        for path, label, score, unit in zip(predictions.paths, predictions.labels.long().tolist(),
                                            predictions.scores.tolist(), normalized):
            writer.writerow([path, label, f"{score:.6f}", unit, int(score >= config.threshold)])
    if heatmaps:
        write_heatmaps(predictions, run_dir / "heatmaps", tuple(config.map_range))
    previous = run_dir / "metrics.json"
    if previous.is_file():  # keep what only training measured (train_seconds, seconds_per_epoch)
        metrics = {**json.loads(previous.read_text()), **metrics}
    write_json(previous, metrics)
    return metrics


#: The columns of ``categories.md`` (whichever a dataset's runs report), in this order.
SUMMARY_COLUMNS = {"image_AUROC": "I-AUROC", "pixel_AUROC": "P-AUROC", "pixel_AUPRO": "AUPRO",
                   "image_AUROC_logical": "I-AUROC log.", "image_AUROC_structural": "I-AUROC str.",
                   "sPRO_logical": "sPRO log.", "sPRO_structural": "sPRO str.", "sPRO_mean": "sPRO mean",
                   "sPRO_overall": "sPRO all"}


def write_category_summary(rows: list[dict], out: Path) -> str:
    """``OUT/categories.json`` and ``OUT/categories.md``: one row per category (metrics in %) and their mean over
    the categories that finished; returns the markdown table."""
    done = [row for row in rows if "error" not in row]
    columns = [key for key in SUMMARY_COLUMNS if any(key in row for row in done)]
    mean = {key: float(np.mean([row[key] for row in done if key in row])) for key in columns}
    lines = ["| category | " + " | ".join(SUMMARY_COLUMNS[key] for key in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = ([f"failed: {row['error']}"] + [""] * (len(columns) - 1) if "error" in row
                 else [f"{100 * row[key]:.1f}" if key in row else "" for key in columns])
        lines.append(f"| {row['category']} | " + " | ".join(cells) + " |")
    if done:
        lines.append("| **mean** | " + " | ".join(f"{100 * mean[key]:.1f}" for key in columns) + " |")
    table = "\n".join(lines) + "\n"
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / "categories.json", {"categories": rows, "mean": mean})
    write_text(Path(out) / "categories.md", table)
    return table


def predict(run_dir: Path, inputs: list[str | Path], out_dir: Path, batch_size: int = 16, num_workers: int = 0,
            component_maps: bool = False, heatmaps: bool = True, threads: int | None = None) -> PredictionSummary:
    """Score images with a trained run's PyTorch model; see :func:`distillad.inference.predict_images`.

    With ``component_maps`` and a model that provides them (DMDD: the 4 NGM and 4 AIM maps), also
    writes ``OUT/components/<image>.png`` grids showing which branch and stage fired. ``threads`` sets
    ``torch.set_num_threads``.
    """
    if threads:
        torch.set_num_threads(threads)
    model, config = load_model(run_dir)
    if component_maps and not hasattr(model.model, "forward_with_components"):
        msg = f"model '{config.model}' has no component maps; drop --component-maps (DMDD provides them)"
        raise DistilladError(msg)

    @torch.no_grad()
    def score_batch(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
        output, components = model.model.forward_with_components(images) if component_maps else (model.model(images), None)
        parts = {key: value.numpy() for key, value in components.items()} if components else None
        return output.anomaly_map.numpy(), output.pred_score.numpy(), parts

    return predict_images(Scorer(score_batch, config.image_size, config.threshold, tuple(config.map_range),
                                 score_normalizer(config.threshold, config.score_floor), config.calibration_images),
                          inputs, out_dir, batch_size, num_workers, heatmaps, component_maps)
