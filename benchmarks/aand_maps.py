"""AAND's anomaly map on a trained run, taken apart: which teacher features the student is compared with, per level.

    python benchmarks/aand_maps.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/aand_maps

RUN_DIR is a finished AAND run (``distillad fit`` or a ``distillad benchmark`` cell). On its test split it scores
one pass several ways: the model's map (Eq. 13-14: the RAA-amplified teacher features against the student), the
vanilla teacher features against the same student output, each level of the amplified comparison alone, and the
RAA modules' gate maps (Table V (a), ``score="mrg"``). Image score = map maximum. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import resize

from distillad.components import cosine_distance_map, upsampled_sum
from distillad.data import one_pass
from distillad.models.base import image_score
from distillad.pipeline import Predictions, build_datamodule, evaluate, load_model


@torch.no_grad()
def map_metrics(run_dir: Path) -> dict[str, dict]:
    lightning_module, config = load_model(run_dir)
    model = lightning_module.model
    datamodule = build_datamodule(config, test_limit=config.test_limit)
    datamodule.setup()
    maps: dict[str, list[torch.Tensor]] = {}
    paths, labels, masks = [], [], []
    for batch in one_pass(datamodule.test_dataloader(), "scoring"):
        images = lightning_module.model_inputs(batch.image)
        size = images.shape[-2:]
        vanilla = model.encode(images)
        outputs = model.amplify(vanilla)
        amplified = [output.amplified for output in outputs]
        student = model.decoder(model.bottleneck(amplified))
        variants = {
            "amplified vs student (model output)": model.anomaly_map(amplified, student, size),
            "vanilla vs student": model.anomaly_map(vanilla, student, size),
            **{f"amplified vs student, level {level + 1} only": model.anomaly_map.blur(
                upsampled_sum([cosine_distance_map(amplified[level], student[level])], size)) for level in range(3)},
            "RAA gates (score=mrg)": model._gate_map([output.gate for output in outputs], size),
        }
        for name, anomaly_map in variants.items():
            maps.setdefault(name, []).append(anomaly_map)
        paths.extend(str(p) for p in batch.image_path)
        labels.append(batch.gt_label)
        masks.append(resize(batch.gt_mask.unsqueeze(1), list(size), antialias=False).squeeze(1))
    results = {}
    for name, parts in maps.items():
        anomaly_map = torch.cat(parts)
        metrics = evaluate(Predictions(paths, image_score(anomaly_map), anomaly_map, torch.cat(labels), torch.cat(masks)),
                           threshold=float("inf"))
        results[name] = {key: metrics[key] for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aand_maps")
    args = parser.parse_args()
    rows = {str(run): map_metrics(run) for run in args.runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = ["# AAND's anomaly map on trained runs, taken apart", "", "Test split of each run; I-AUROC / P-AUROC / "
             "AUPRO in %.", "", "| run | map | I-AUROC | P-AUROC | AUPRO |", "|---|---|---|---|---|"]
    for run, results in rows.items():
        for name, metrics in results.items():
            values = " | ".join(f"{100 * metrics[key]:.1f}" for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))
            lines.append(f"| {Path(run).parent.name}/{Path(run).name} | {name} | {values} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
