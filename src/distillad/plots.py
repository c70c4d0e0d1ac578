"""Benchmark figures: ROC and PRO curves per category, and example heatmaps like the papers' Fig. 7."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure

from distillad.data import read_image, read_mask


def _curves(run_dir: Path) -> dict:
    path = run_dir / "curves.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def plot_curves(category: str, runs: dict[str, Path], out_dir: Path) -> list[Path]:
    """``roc_CATEGORY.png`` (image and pixel ROC) and ``pro_CATEGORY.png``, one line per model."""
    curves = {model: _curves(run_dir) for model, run_dir in runs.items()}
    written = []
    figure = Figure(figsize=(10, 4.6))
    axes = figure.subplots(1, 2)
    for axis, key, title in ((axes[0], "image_ROC", "image ROC"), (axes[1], "pixel_ROC", "pixel ROC")):
        for model, curve in curves.items():
            if key in curve:
                axis.plot(curve[key]["x"], curve[key]["y"], label=model)
        axis.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        axis.set(title=f"{category}: {title}", xlabel="false-positive rate", ylabel="true-positive rate",
                 xlim=(0, 1), ylim=(0, 1.01))
        axis.legend(loc="lower right")
    written.append(_save(figure, out_dir / f"roc_{category}.png"))
    figure = Figure(figsize=(5.2, 4.6))
    axis = figure.subplots()
    for model, curve in curves.items():
        if "PRO" in curve:
            axis.plot(curve["PRO"]["x"], curve["PRO"]["y"], label=model)
    axis.set(title=f"{category}: PRO (FPR <= 0.3)", xlabel="pixel false-positive rate", ylabel="per-region overlap",
             xlim=(0, 0.3), ylim=(0, 1.01))
    axis.legend(loc="lower right")
    written.append(_save(figure, out_dir / f"pro_{category}.png"))
    return written


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_examples(category: str, runs: dict[str, Path], out_dir: Path) -> Path | None:
    """Rows of test images: the image, its ground truth, then each model's anomaly map (``examples_CATEGORY.png``).

    Every model's map is shown on its own calibrated scale (``map_range`` of the run: the 1st percentile of
    normal pixels to the decision threshold), so red means "at or above what this model calls anomalous".
    """
    examples = {model: np.load(run_dir / "examples.npz") for model, run_dir in runs.items()
                if (run_dir / "examples.npz").is_file()}
    if not examples:
        return None
    ranges = {model: json.loads((runs[model] / "config.json").read_text())["map_range"] for model in examples}
    first = next(iter(examples.values()))
    paths, masks = [str(p) for p in first["images"]], [str(m) for m in first["masks"]]
    columns = 2 + len(examples)
    figure = Figure(figsize=(2.2 * columns, 2.2 * len(paths)))
    axes = figure.subplots(len(paths), columns, squeeze=False)
    for row, (path, mask_path) in enumerate(zip(paths, masks)):
        image = read_image(path)
        size = first["maps"].shape[-1]
        picture = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        truth = read_mask(mask_path, (size, size))
        panels = [(picture, None, Path(path).parent.name), (truth, "gray", "ground truth")]
        for model, data in examples.items():
            low, high = ranges[model]
            panels.append((np.clip((data["maps"][row] - low) / (high - low), 0, 1), "jet", model))
        for column, (panel, colormap, title) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(panel, cmap=colormap, vmin=0, vmax=1 if colormap else None)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0 or column == 0:
                axis.set_title(title, fontsize=9)
    return _save(figure, out_dir / f"examples_{category}.png")


def plot_category(out: Path, category: str, rows: list[dict]) -> list[Path]:
    """All figures of one benchmark category from its finished cells."""
    from distillad.benchmark import cell_dir

    runs = {row["model"]: cell_dir(out, category, row["model"]) for row in rows}
    if not runs:
        return []
    written = plot_curves(category, runs, out / "plots")
    example_figure = plot_examples(category, runs, out / "plots")
    return [*written, example_figure] if example_figure else written
