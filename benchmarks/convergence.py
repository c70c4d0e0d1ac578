"""Convergence evidence: learning curves and final metrics of long ``distillad benchmark`` runs beside the peers.

Reads one or more benchmark output folders (``OUT/cells/CATEGORY/MODEL``) of a long schedule, e.g.::

    distillad benchmark --models rd,aand,dskd,dmdd --peers patchcore,padim --root ../shared/data \\
        --categories weld --epochs 200 --out runs/convergence_weld
    distillad benchmark ... --categories mtd --max-steps 1000 --out runs/convergence_mtd
    python benchmarks/convergence.py runs/convergence_weld runs/convergence_mtd --out benchmarks/results/convergence

and writes ``OUT.{json,md}`` and ``OUT_CATEGORY.png``: per model the training loss and the validation score on
held-out normal images + synthetic anomalies (:mod:`distillad.models.validation`; never a test image) per epoch,
the final test metrics, and the issue's bars (every model against RD at equal steps and against PaDiM, DMDD's
pixel AUROC against PatchCore's). A cell still training is shown with its curve so far and no test metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
PEERS = ("patchcore", "padim")


def epoch_log(cell: Path) -> list[dict]:
    """Per epoch: step, training loss and validation scores from every ``logs/*/metrics.csv`` of ``cell``."""
    rows: dict[int, dict] = {}
    for path in sorted(cell.glob("logs/*/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                entry = rows.setdefault(int(row["epoch"]), {"epoch": int(row["epoch"])})
                entry["step"] = int(row["step"])
                if row.get("stage"):  # AAND: stage 1 (amplifier) and stage 2 (student) train different losses
                    entry["stage"] = int(float(row["stage"]))
                for source, target in (("train_loss_epoch", "train_loss"),
                                       ("val_synthetic_image_AUROC", "val_image_AUROC"),
                                       ("val_synthetic_pixel_AUROC", "val_pixel_AUROC")):
                    if row.get(source):
                        entry[target] = float(row[source])
    return [rows[epoch] for epoch in sorted(rows)]


def cell_summary(cell: Path) -> dict:
    """A cell's final metrics (when it finished) and its per-epoch log."""
    summary = {"category": cell.parent.name, "model": cell.name, "curve": epoch_log(cell)}
    result = cell / "result.json"
    if result.is_file():
        metrics = json.loads(result.read_text())
        summary.update({key: metrics.get(key) for key in (*METRICS, "train_steps", "train_epochs", "seconds_per_step",
                                                          "train_seconds", "max_steps", "error")})
        summary["finished"] = "error" not in metrics
    else:
        summary["finished"] = False
    return summary


def epochs_trained(cell: dict) -> int | str:
    """Epochs the run trained: ``metrics.json``'s count, else the epochs its log reached (runs from before the count;
    the config's ``epochs`` is not it when ``--max-steps`` bounds the run)."""
    if cell.get("train_epochs"):
        return cell["train_epochs"]
    return cell["curve"][-1]["epoch"] + 1 if cell["curve"] else ""


def bars(cells: list[dict]) -> list[str]:
    """The issue's bars, checked per category on the finished cells."""
    lines = []
    for category in dict.fromkeys(cell["category"] for cell in cells):
        done = {cell["model"]: cell for cell in cells if cell["category"] == category and cell["finished"]}
        if "rd" in done:
            for model in (m for m in done if m not in ("rd", *PEERS)):
                wins = [key for key in METRICS if done[model][key] > done["rd"][key]]
                lines.append(f"- {category}: {model} {'beats' if wins else 'does not beat'} RD at equal steps"
                             + (f" ({', '.join(wins)})" if wins else ""))
        if "padim" in done:
            for model in (m for m in done if m not in PEERS):
                below = all(done[model][key] < done["padim"][key] for key in METRICS)
                lines.append(f"- {category}: {model} is {'below' if below else 'not below'} PaDiM on every metric")
        if "dmdd" in done and "patchcore" in done:
            dmdd, patchcore = done["dmdd"]["pixel_AUROC"], done["patchcore"]["pixel_AUROC"]
            lines.append(f"- {category}: DMDD pixel AUROC {100 * dmdd:.1f} against PatchCore {100 * patchcore:.1f}: "
                         f"{'above' if dmdd > patchcore else 'not above'}")
    return lines


def markdown(cells: list[dict]) -> str:
    lines = ["# Convergence: long runs beside anomalib's PatchCore and PaDiM", "",
             "Lite0, 256 px, batch 16, seed 0, 2 CPU threads; validation = held-out training normals + synthetic "
             "anomalies on them (no test image), logged every epoch. s/step is wall time over the whole run, "
             "which shared the 2 cores with other work and was paused and resumed: not a speed measurement "
             "(`train_speed.md` is).", "",
             "| category | model | steps | epochs | s/step | I-AUROC | P-AUROC | AUPRO | validation P-AUROC first -> best "
             "-> last |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        curve = [row["val_pixel_AUROC"] for row in cell["curve"] if "val_pixel_AUROC" in row]
        trend = (f"{100 * curve[0]:.1f} -> {100 * max(curve):.1f} -> {100 * curve[-1]:.1f}" if curve else "")
        if cell["finished"]:
            values = " | ".join(f"{100 * cell[key]:.1f}" for key in METRICS)
            seconds = f"{cell['seconds_per_step']:.2f}" if cell.get("seconds_per_step") else ""
            lines.append(f"| {cell['category']} | {cell['model']} | {cell.get('train_steps') or ''} | "
                         f"{epochs_trained(cell)} | {seconds} | {values} | {trend} |")
        else:
            last = cell["curve"][-1] if cell["curve"] else {"epoch": -1, "step": 0}
            lines.append(f"| {cell['category']} | {cell['model']} | {last.get('step', 0)} so far | "
                         f"{last['epoch'] + 1} so far | | still training | | | {trend} |")
    lines += ["", "## Bars", "", *bars(cells), ""]
    return "\n".join(lines)


def plot(cells: list[dict], out: Path) -> None:
    for category in dict.fromkeys(cell["category"] for cell in cells):
        figure, (loss_axis, val_axis) = plt.subplots(1, 2, figsize=(11, 4))
        colours = {name: f"C{index}" for index, name in enumerate(sorted({c["model"] for c in cells}))}
        for cell in (c for c in cells if c["category"] == category and c["curve"]):
            colour = colours[cell["model"]]
            stages = dict.fromkeys(row.get("stage") for row in cell["curve"] if "train_loss" in row)
            for stage in stages:
                losses = [(row["step"], row["train_loss"]) for row in cell["curve"]
                          if "train_loss" in row and row.get("stage") == stage]
                first = abs(losses[0][1]) or 1.0
                label = cell["model"] if len(stages) == 1 else f"{cell['model']} stage {stage}"
                loss_axis.plot([s for s, _ in losses], [v / first for _, v in losses], label=label, color=colour,
                               linestyle=":" if stage == 1 and len(stages) > 1 else "-")
            scores = [(row["step"], row["val_pixel_AUROC"]) for row in cell["curve"] if "val_pixel_AUROC" in row]
            if scores:
                val_axis.plot([s for s, _ in scores], [v for _, v in scores], label=cell["model"], color=colour)
        loss_axis.set(xlabel="optimiser step", ylabel="training loss / |first epoch's|", title=f"{category}: loss")
        val_axis.set(xlabel="optimiser step", ylabel="pixel AUROC", title=f"{category}: validation (synthetic)")
        for axis in (loss_axis, val_axis):
            axis.legend()
            axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out.parent / f"{out.name}_{category}.png", dpi=100)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="benchmark output folders")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/convergence"))
    args = parser.parse_args()
    cells = [cell_summary(cell) for run in args.runs for cell in sorted(run.glob("cells/*/*")) if cell.is_dir()]
    args.out.with_suffix(".json").write_text(json.dumps(cells, indent=1))
    args.out.with_suffix(".md").write_text(markdown(cells))
    plot(cells, args.out)


if __name__ == "__main__":
    main()
