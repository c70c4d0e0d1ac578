"""DSKD's students scored alone and fused (Eq. 8): how much each one's map carries on a trained run's test split.

    python benchmarks/dskd_students.py runs/bench/cells/weld/dskd runs/bench/cells/mtd/dskd

Each run directory is a finished DSKD run (``distillad fit`` or a ``distillad benchmark`` cell). Its model scores
the run's own test split three ways, through the pipeline's metric code: the local student's standardised map
alone, the global student's alone, and their sum (the model's output), each smoothed by the model's Gaussian
with the maximum as the image score. Writes ``OUT.json`` and ``OUT.md`` (default
``benchmarks/results/dskd_students``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from distillad import pipeline
from distillad.models.base import image_score


class EveryMap(nn.Module):
    """A DSKD model whose output holds, per channel, one combination of its students' standardised maps, blurred:
    each student alone, then (with two students) their sum, the model's own map."""

    def __init__(self, dskd: nn.Module) -> None:
        super().__init__()
        self.dskd = dskd
        names = tuple(dskd.students)
        self.combinations = [(name,) for name in names] + ([names] if len(names) > 1 else [])

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        maps = self.dskd.standardized_maps(images)
        blurred = [self.dskd.blur(sum(maps[name] for name in students)) for students in self.combinations]
        return InferenceBatch(pred_score=torch.stack([image_score(m) for m in blurred], dim=1),
                              anomaly_map=torch.cat(blurred, dim=1))


class Scored(nn.Module):
    """The interface :func:`distillad.pipeline.collect` reads: ``model`` and ``model_inputs``."""

    def __init__(self, module: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model_inputs = module.model_inputs


def score_run(run_dir: Path) -> list[dict]:
    """One pass over the run's test split; the metrics of each combination of student maps."""
    module, config = pipeline.load_model(run_dir)
    datamodule = pipeline.build_datamodule(config, test_limit=config.test_limit)
    datamodule.setup()
    every_map = EveryMap(module.model)
    with torch.no_grad():
        predictions = pipeline.collect(Scored(module, every_map), datamodule.test_dataloader(), "testing")
    rows = []
    for index, students in enumerate(every_map.combinations):
        one = pipeline.Predictions(predictions.paths, predictions.scores[:, index],
                                   predictions.maps[:, index:index + 1], predictions.labels, predictions.masks)
        metrics = pipeline.evaluate(one, threshold=float("inf"))
        rows.append({"run": str(run_dir), "category": config.data.get("category"), "maps": "+".join(students),
                     **{key: metrics.get(key) for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")}})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# DSKD's students alone and fused (Eq. 8), I-AUROC / P-AUROC / AUPRO (%)", "",
             "| category | maps | I-AUROC | P-AUROC | AUPRO | run |", "|---|---|---|---|---|---|"]
    for row in rows:
        values = " | ".join("" if row[key] is None else f"{100 * row[key]:.1f}"
                            for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))
        lines.append(f"| {row['category']} | {row['maps']} | {values} | {row['run']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished DSKD run directories")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dskd_students")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for run in args.runs for row in score_run(run)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
