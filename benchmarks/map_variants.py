"""A trained run's anomaly map taken apart: its test split scored from one pass several ways.

    python benchmarks/map_variants.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/map_variants

RUN_DIR is a finished RD, DMDD, AAND or DSKD run (``distillad fit`` or a ``distillad benchmark`` cell). The ways,
per model (:data:`VARIANTS`), image score = map maximum unless the model has its own:

- RD: the model's map against each level alone and against a Euclidean distance (each level's ``|F_T - F_S|`` over
  its mean ``|F_T|``, summed): cosine distance ignores a change of feature magnitude, Euclidean (PatchCore's) does;
- DMDD: the MSN's map (the model's output) against Gaussian-smoothed sums of the cosine-distance maps it fuses
  (all 8 = the ``msn=False`` scoring, the 4 NGM maps, the 4 AIM maps, NGM stages 1-3);
- AAND: the model's map (Eq. 13-14, RAA-amplified teacher against the student), the vanilla teacher against the
  same student output, each level alone, and the RAA gate maps (Table V (a), ``score="mrg"``);
- DSKD: the fused map (Eq. 8) against each student's standardised map alone.

It shows which part of a model finds real defects, after training on normal images and synthetic anomalies only,
and (second table) on which defect type (test folder) each map gains or loses. ``--peers patchcore,padim`` also fits
each named anomalib peer on the first run's data, encoder and image size and scores it the same way (row
``CATEGORY/PEER``), so a model's loss to a peer can be traced to defect types. Writes ``OUT.json`` and ``OUT.md``;
runs already in ``OUT.json`` are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torchvision.transforms.v2.functional import resize

from distillad.components import upsampled_sum
from distillad.data import one_pass
from distillad.metrics import auroc
from distillad.models.base import image_score
from distillad.peers import fit_peer
from distillad.pipeline import Predictions, RunConfig, build_datamodule, evaluate, load_model

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


def single_levels(model, teacher: list[torch.Tensor], student: list[torch.Tensor], size: torch.Size,
                  label: str) -> dict[str, torch.Tensor]:
    """Each level's smoothed cosine-distance map alone: ``model.anomaly_map`` of that level's pair."""
    return {f"{label}, level {level + 1} only": model.anomaly_map([teacher[level]], [student[level]], size)
            for level in range(len(teacher))}


def relative_euclidean_map(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``|F_T - F_S|`` per pixel over the level's mean ``|F_T|`` (levels of different widths weigh alike)."""
    return (teacher - student).norm(dim=1, keepdim=True) / teacher.norm(dim=1).mean()


def rd_variants(model, images: torch.Tensor) -> dict[str, InferenceBatch | torch.Tensor]:
    teacher = model.encode(images)
    student = model.decoder(model.bottleneck(teacher))
    size = images.shape[-2:]
    euclidean = upsampled_sum([relative_euclidean_map(t, s) for t, s in zip(teacher, student)], size)
    return {"model output": model.anomaly_map(teacher, student, size),  # RD's eval forward, without a second pass
            **single_levels(model, teacher, student, size, "teacher vs student"),
            "Euclidean instead of cosine distance": model.anomaly_map.blur(euclidean)}


def dmdd_variants(model, images: torch.Tensor) -> dict[str, InferenceBatch | torch.Tensor]:
    output, components = model.forward_with_components(images)
    sums = {"sum of 8 maps (msn=False scoring)": [f"{b}_{s}" for b in ("ngm", "aim") for s in range(1, 5)],
            "sum of NGM maps": [f"ngm_{s}" for s in range(1, 5)], "sum of AIM maps": [f"aim_{s}" for s in range(1, 5)],
            "sum of NGM maps 1-3": [f"ngm_{s}" for s in range(1, 4)]}
    return {"MSN (model output)": output,
            **{name: model.blur(sum(components[key] for key in keys)) for name, keys in sums.items()}}


def aand_variants(model, images: torch.Tensor) -> dict[str, InferenceBatch | torch.Tensor]:
    size = images.shape[-2:]
    vanilla = model.encode(images)
    outputs = model.amplify(vanilla)
    amplified = [output.amplified for output in outputs]
    student = model.decoder(model.bottleneck(amplified))
    return {"amplified vs student (model output)": model.anomaly_map(amplified, student, size),
            "vanilla vs student": model.anomaly_map(vanilla, student, size),
            **single_levels(model, amplified, student, size, "amplified vs student"),
            "RAA gates (score=mrg)": model._gate_map([output.gate for output in outputs], size)}


def dskd_variants(model, images: torch.Tensor) -> dict[str, InferenceBatch | torch.Tensor]:
    teacher, students = model._features(images)
    summed = model.summed_maps(teacher, students, images.shape[-2:])
    standardized = {name: (summed[name] - model.students[name].map_mean) / model.students[name].map_std
                    for name in summed}
    return {"fused (model output, Eq. 8)": model.blur(sum(standardized.values())),
            **{f"{name} student only": model.blur(value) for name, value in standardized.items()}}


VARIANTS: dict[str, Callable[..., dict[str, InferenceBatch | torch.Tensor]]] = {
    "rd": rd_variants, "dmdd": dmdd_variants, "aand": aand_variants, "dskd": dskd_variants}


@torch.no_grad()
def scored_variants(config: RunConfig, model_inputs: Callable[[torch.Tensor], torch.Tensor],
                    variants: Callable[[torch.Tensor], dict[str, InferenceBatch | torch.Tensor]]) -> dict[str, dict]:
    """Metrics of each map ``variants(model_inputs(images))`` returns, over the test split of ``config``'s data."""
    datamodule = build_datamodule(config, test_limit=config.test_limit)
    datamodule.setup()
    scored: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    paths, labels, masks = [], [], []
    for batch in one_pass(datamodule.test_dataloader(), "scoring"):
        images = model_inputs(batch.image)
        for name, output in variants(images).items():
            pair = ((output.pred_score, output.anomaly_map) if isinstance(output, InferenceBatch)
                    else (image_score(output), output))
            scored.setdefault(name, []).append(pair)
        paths.extend(str(p) for p in batch.image_path)
        labels.append(batch.gt_label)
        masks.append(resize(batch.gt_mask.unsqueeze(1), list(images.shape[-2:]), antialias=False).squeeze(1))
    results = {}
    for name, parts in scored.items():
        predictions = Predictions(paths, torch.cat([s for s, _ in parts]), torch.cat([m for _, m in parts]),
                                  torch.cat(labels), torch.cat(masks))
        metrics = evaluate(predictions, threshold=float("inf"))
        results[name] = {key: metrics[key] for key in METRICS} | {"by_type": by_defect_type(predictions)}
    return results


def variant_metrics(run_dir: Path) -> dict[str, dict]:
    lightning_module, config = load_model(run_dir)
    return scored_variants(config, lightning_module.model_inputs,
                           lambda images: VARIANTS[config.model](lightning_module.model, images))


def peer_metrics(run_dir: Path, peer: str) -> dict[str, dict]:
    """Peer ``peer`` fitted on the data, encoder and image size of ``run_dir`` and scored like its model."""
    config = dataclasses.replace(RunConfig.load(run_dir), model=peer, model_options={})
    model, _, _ = fit_peer(config, config.train_limit, config.test_limit)
    return scored_variants(config, lambda images: images, lambda images: {"model output": model(images)})


def by_defect_type(predictions: Predictions) -> dict[str, dict[str, float]]:
    """Image and pixel AUROC of each defect type (test folder) against the good test images."""
    types = [Path(path).parent.name for path in predictions.paths]
    good = predictions.labels == 0
    results = {}
    for defect in sorted(set(types) - {"good"}):
        keep = good | torch.tensor([kind == defect for kind in types])
        results[defect] = {"image_AUROC": auroc(predictions.scores[keep], predictions.labels[keep].long()),
                           "pixel_AUROC": auroc(predictions.maps[keep], predictions.masks[keep])}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--peers", default="", help="comma-separated anomalib peers fitted on the first run's data")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "map_variants")
    args = parser.parse_args()
    # Runs already in OUT.json stay (a run given again is rescored), so one run can be added to a table at a time.
    rows_file = args.out.with_suffix(".json")
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else {}
    rows.update({str(run): variant_metrics(run) for run in args.runs})
    rows.update({str(args.runs[0].parent / peer): peer_metrics(args.runs[0], peer)
                 for peer in filter(None, args.peers.split(","))})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows_file.write_text(json.dumps(rows, indent=2))
    lines = ["# Trained maps taken apart", "", "Test split of each run; I-AUROC / P-AUROC / AUPRO in %.", "",
             "| run | map | I-AUROC | P-AUROC | AUPRO |", "|---|---|---|---|---|"]
    for run, results in rows.items():
        for name, metrics in results.items():
            values = " | ".join(f"{100 * metrics[key]:.1f}" for key in METRICS)
            lines.append(f"| {Path(run).parent.name}/{Path(run).name} | {name} | {values} |")
    lines += ["", "Pixel AUROC (%) by defect type, against the good test images:", ""]
    for run, results in rows.items():
        types = list(next(iter(results.values()))["by_type"])
        lines += ["", f"| {Path(run).parent.name}/{Path(run).name} | {' | '.join(types)} |",
                  "|---" * (len(types) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{100 * metrics['by_type'][t]['pixel_AUROC']:.1f}" for t in types) + " |"
                  for name, metrics in results.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
