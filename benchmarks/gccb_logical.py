"""DSKD's GCCB on logical anomalies: the paper's pooled vector against a position-aware (GCAD-like) bottleneck.

MVTec LOCO cannot be shipped or downloaded here, so this script draws a LOCO-like category, a tray with four
parts in fixed slots (a red disc, a green square, a blue triangle, a yellow cross; each jittered in place, size,
angle and shade, on a noisy, shaded background), in MVTec layout:

- logical anomalies, every part locally normal: ``missing`` (a slot left empty), ``extra`` (a fifth part in the
  middle), ``swapped`` (two parts exchange slots), ``duplicated`` (one slot holds another slot's part);
- structural anomalies: ``scratch`` (a dark line across a part), ``stain`` (an off-colour blob on the tray).

Each variant (``gccb_pooling`` x which students) trains through :func:`distillad.pipeline.fit` for a fixed number
of optimiser steps and is scored per anomaly type (image AUROC against the good test images). Writes
``benchmarks/results/gccb_logical.{json,md}``::

    python benchmarks/gccb_logical.py --steps 200 --image-size 128 --seeds 0,1
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from distillad import pipeline

SIZE = 256
SLOTS = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))
COLOURS = ((200, 40, 40), (40, 170, 60), (40, 70, 200), (220, 200, 40))  # RGB, one per part kind
LOGICAL = ("missing", "extra", "swapped", "duplicated")
STRUCTURAL = ("scratch", "stain")
#: name -> DSKD options; ``-global``: the global student alone (``local_loss=None``), to see the GCCB's own effect.
VARIANTS = {
    "mean": {"gccb_pooling": "mean"},
    "positional": {"gccb_pooling": "positional"},
    "mean-global": {"gccb_pooling": "mean", "local_loss": None},
    "positional-global": {"gccb_pooling": "positional", "local_loss": None},
}


def part_polygon(kind: int, centre: np.ndarray, radius: float, angle: float) -> list[np.ndarray]:
    """Outline(s) of part ``kind`` (disc, square, triangle, cross) in pixel coordinates."""
    if kind == 0:
        corners = 32
    elif kind == 1:
        corners = 4
    elif kind == 2:
        corners = 3
    else:
        arm = np.array([[-1, -0.28], [1, -0.28], [1, 0.28], [-1, 0.28]]) * radius
        rotations = (angle, angle + np.pi / 2)
        return [np.round(centre + arm @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])).astype(np.int32)
                for a in rotations]
    theta = angle + np.arange(corners) * 2 * np.pi / corners
    return [np.round(centre + radius * np.stack([np.cos(theta), np.sin(theta)], 1)).astype(np.int32)]


def draw_part(image: np.ndarray, mask: np.ndarray | None, kind: int, slot: tuple[float, float],
              rng: np.random.Generator) -> list[np.ndarray]:
    """Draw a jittered part of ``kind`` at ``slot``; mark it in ``mask`` when given. Returns its outline(s)."""
    centre = np.array(slot) * SIZE + rng.normal(0, 3, 2)
    polygons = part_polygon(kind, centre, SIZE * 0.1 * rng.uniform(0.92, 1.08), rng.uniform(0, 2 * np.pi))
    shade = rng.uniform(0.85, 1.1)
    colour = tuple(int(min(255, c * shade)) for c in COLOURS[kind])
    for polygon in polygons:  # one call each: fillPoly fills overlapping outlines even-odd
        cv2.fillPoly(image, [polygon], colour, lineType=cv2.LINE_AA)
        if mask is not None:
            cv2.fillPoly(mask, [polygon], 255)
    return polygons


def tray(rng: np.random.Generator) -> np.ndarray:
    """A shaded, noisy grey tray with a darker rim."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    tilt = rng.uniform(-1, 1, 2)
    grey = 150 + 20 * (tilt[0] * xs + tilt[1] * ys) + rng.normal(0, 4, (SIZE, SIZE))
    image = np.repeat(np.clip(grey, 0, 255)[..., None], 3, 2).astype(np.uint8)
    cv2.rectangle(image, (8, 8), (SIZE - 9, SIZE - 9), (95, 95, 95), 6)
    return image


def scene(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image of ``kind`` (``good`` or an anomaly type) and its ground-truth mask."""
    image, mask = tray(rng), np.zeros((SIZE, SIZE), np.uint8)
    layout = list(range(4))  # layout[slot] = part kind in that slot, None = empty
    marked: set[int] = set()
    scratched = int(rng.integers(4)) if kind == "scratch" else None
    if kind == "missing":
        slot = int(rng.integers(4))
        layout[slot] = None
        polygons = part_polygon(slot, np.array(SLOTS[slot]) * SIZE, SIZE * 0.11, 0.0)
        cv2.fillPoly(mask, [cv2.convexHull(np.concatenate(polygons))], 255)
    elif kind == "swapped":
        first, second = rng.choice(4, 2, replace=False)
        layout[first], layout[second] = layout[second], layout[first]
        marked = {int(first), int(second)}
    elif kind == "duplicated":
        source, target = rng.choice(4, 2, replace=False)
        layout[target] = layout[source]
        marked = {int(target)}
    for slot, part in enumerate(layout):
        if part is not None:
            polygons = draw_part(image, mask if slot in marked else None, part, SLOTS[slot], rng)
            if slot == scratched:
                ends = np.concatenate(polygons)[rng.choice(len(np.concatenate(polygons)), 2, replace=False)]
                line = np.zeros_like(mask)
                cv2.line(line, tuple(map(int, ends[0])), tuple(map(int, ends[1])), 255, 3)
                image[line > 0] = (image[line > 0] * 0.35).astype(np.uint8)
                mask |= line
    if kind == "extra":
        draw_part(image, mask, int(rng.integers(4)), (0.5, 0.5), rng)
    if kind == "stain":
        centre = tuple(int(v) for v in rng.uniform(0.15, 0.85, 2) * SIZE)
        axes = tuple(int(v) for v in rng.uniform(9, 16, 2))
        blob = np.zeros_like(mask)
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        image[blob > 0] = (0.5 * image[blob > 0] + 0.5 * np.array([120, 80, 40])).astype(np.uint8)
        mask |= blob
    return image, mask


def write_category(root: Path, train: int, test_good: int, per_type: int, seed: int = 0) -> Path:
    """Write the ``parts`` category under ``root`` in MVTec layout (once; reused when present)."""
    category = root / "parts"
    if (category / "train").is_dir():
        return category
    rng = np.random.default_rng(seed)
    counts = {("train", "good"): train, ("test", "good"): test_good,
              **{("test", kind): per_type for kind in LOGICAL + STRUCTURAL}}
    for (split, kind), count in counts.items():
        (category / split / kind).mkdir(parents=True, exist_ok=True)
        if kind != "good":
            (category / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = scene(kind, rng)
            cv2.imwrite(str(category / split / kind / f"{index:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if kind != "good":
                cv2.imwrite(str(category / "ground_truth" / kind / f"{index:03d}_mask.png"), mask)
    return category


def per_type_auroc(run_dir: Path) -> dict[str, float]:
    """Image AUROC of each anomaly type against the good test images, from ``RUN/test_scores.csv``."""
    with (run_dir / "test_scores.csv").open(newline="") as handle:
        rows = [(Path(row["path"]).parent.name, float(row["score"])) for row in csv.DictReader(handle)]
    good = [score for kind, score in rows if kind == "good"]
    result = {}
    for kind in LOGICAL + STRUCTURAL:
        anomalous = [score for name, score in rows if name == kind]
        result[kind] = roc_auc_score([0] * len(good) + [1] * len(anomalous), good + anomalous)
    return result


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    kinds = LOGICAL + STRUCTURAL
    lines = [f"# DSKD GCCB: pooled vector against position-aware bottleneck on a LOCO-like category "
             f"({args.steps} steps, batch {args.batch_size}, {args.image_size} px, seeds "
             f"{', '.join(str(seed) for seed in dict.fromkeys(row['seed'] for row in rows))})", "",
             "Image AUROC (%) of each anomaly type against the good test images; logical: "
             + ", ".join(LOGICAL) + "; structural: " + ", ".join(STRUCTURAL) + ".", "",
             "| variant | seed | " + " | ".join(kinds) + " | logical mean | structural mean | P-AUROC | s |",
             "|---|---|" + "---|" * (len(kinds) + 4)]
    for row in rows:
        values = " | ".join(f"{100 * row['auroc'][kind]:.1f}" for kind in kinds)
        lines.append(f"| {row['variant']} | {row['seed']} | {values} | {100 * row['logical']:.1f} | "
                     f"{100 * row['structural']:.1f} | {100 * row['pixel_AUROC']:.1f} | {row['seconds']:.0f} |")
    lines += ["", "Means over seeds:", "", "| variant | logical mean | structural mean |", "|---|---|---|"]
    for variant in dict.fromkeys(row["variant"] for row in rows):
        chosen = [row for row in rows if row["variant"] == variant]
        lines.append(f"| {variant} | {100 * np.mean([r['logical'] for r in chosen]):.1f} | "
                     f"{100 * np.mean([r['structural'] for r in chosen]):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/gccb_logical/data"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", type=Path, default=Path("runs/gccb_logical"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gccb_logical"))
    args = parser.parse_args()
    write_category(args.data, train=120, test_good=40, per_type=20)
    results = args.out.with_suffix(".json")
    rows = json.loads(results.read_text()) if results.is_file() else []  # a rerun goes on where it stopped
    done = {(row["variant"], row["seed"]) for row in rows}
    for seed in (int(value) for value in args.seeds.split(",")):
        for variant in args.variants.split(","):
            if (variant, seed) in done:
                continue
            config = pipeline.RunConfig(model="dskd", model_options=VARIANTS[variant],
                                        data={"kind": "mvtec_ad", "root": str(args.data), "category": "parts"},
                                        image_size=args.image_size, max_steps=args.steps,
                                        batch_size=args.batch_size, seed=seed)
            run_dir = args.runs / f"seed{seed}-{variant}"
            started = time.perf_counter()
            metrics = pipeline.fit(config, run_dir, heatmaps=False, overwrite=True)
            auroc = per_type_auroc(run_dir)
            rows.append({"variant": variant, "seed": seed, "auroc": auroc,
                         "logical": float(np.mean([auroc[kind] for kind in LOGICAL])),
                         "structural": float(np.mean([auroc[kind] for kind in STRUCTURAL])),
                         "image_AUROC": metrics["image_AUROC"], "pixel_AUROC": metrics["pixel_AUROC"],
                         "seconds": time.perf_counter() - started,
                         "validation_curve": metrics.get("validation_curve", [])})
            print(json.dumps({key: rows[-1][key] for key in ("variant", "seed", "logical", "structural")}), flush=True)
            results.write_text(json.dumps(rows, indent=2))
            args.out.with_suffix(".md").write_text(markdown(rows, args))


if __name__ == "__main__":
    main()
