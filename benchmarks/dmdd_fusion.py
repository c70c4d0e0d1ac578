"""DMDD fusion on a trained run: the MSN's map against plain smoothed sums of the distance maps it fuses.

    python benchmarks/dmdd_fusion.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/dmdd_fusion

RUN_DIR is a finished DMDD run (``distillad fit`` or a ``distillad benchmark`` cell). On its test split it scores
one teacher/student pass (``forward_with_components``) five ways: the MSN's probability map (the model's output),
the Gaussian-smoothed sum of all 8 cosine-distance maps (the ``msn=False`` scoring), of the 4 NGM maps, of the 4
AIM maps, and of the NGM maps of stages 1-3. Image score = map maximum for the sums (the MSN has its own top-k
score). It shows whether the MSN, trained on synthetic anomalies only, localises real defects better than the
maps it fuses. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import resize

from distillad.data import one_pass
from distillad.models.base import image_score
from distillad.pipeline import Predictions, build_datamodule, evaluate, load_model

FUSIONS = {
    "sum of 8 maps (msn=False scoring)": [f"{branch}_{stage}" for branch in ("ngm", "aim") for stage in range(1, 5)],
    "sum of NGM maps": [f"ngm_{stage}" for stage in range(1, 5)],
    "sum of AIM maps": [f"aim_{stage}" for stage in range(1, 5)],
    "sum of NGM maps 1-3": [f"ngm_{stage}" for stage in range(1, 4)],
}


@torch.no_grad()
def fusion_metrics(run_dir: Path) -> dict[str, dict]:
    model, config = load_model(run_dir)
    datamodule = build_datamodule(config, test_limit=config.test_limit)
    datamodule.setup()
    outputs: dict[str, list] = {"MSN (model output)": [], **{name: [] for name in FUSIONS}}
    paths, labels, masks = [], [], []
    for batch in one_pass(datamodule.test_dataloader(), "scoring"):
        output, components = model.model.forward_with_components(model.model_inputs(batch.image))
        outputs["MSN (model output)"].append((output.pred_score, output.anomaly_map))
        for name, keys in FUSIONS.items():
            anomaly_map = model.model.blur(sum(components[key] for key in keys))
            outputs[name].append((image_score(anomaly_map), anomaly_map))
        paths.extend(str(p) for p in batch.image_path)
        labels.append(batch.gt_label)
        masks.append(resize(batch.gt_mask.unsqueeze(1), list(output.anomaly_map.shape[-2:]), antialias=False).squeeze(1))
    results = {}
    for name, parts in outputs.items():
        predictions = Predictions(paths, torch.cat([s for s, _ in parts]), torch.cat([m for _, m in parts]),
                                  torch.cat(labels), torch.cat(masks))
        metrics = evaluate(predictions, threshold=float("inf"))
        results[name] = {key: metrics[key] for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dmdd_fusion")
    args = parser.parse_args()
    rows = {str(run): fusion_metrics(run) for run in args.runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = ["# DMDD fusion on trained runs: the MSN against plain sums of its input maps", "",
             "Test split of each run; I-AUROC / P-AUROC / AUPRO in %.", "",
             "| run | fusion | I-AUROC | P-AUROC | AUPRO |", "|---|---|---|---|---|"]
    for run, results in rows.items():
        for name, metrics in results.items():
            values = " | ".join(f"{100 * metrics[key]:.1f}" for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))
            lines.append(f"| {Path(run).parent.name}/{Path(run).name} | {name} | {values} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
