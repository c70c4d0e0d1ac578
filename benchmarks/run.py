"""Benchmark distillad models on an MVTec-layout category: quality, speed and memory.

Each configuration trains in its own process (so peak memory is per run), through the same
``distillad.pipeline.fit`` the CLI uses, then measures inference latency at batch 1 and 32.
Writes ``OUT.json`` and ``OUT.md``.

Example::

    python benchmarks/run.py --models rd --dataset mtd --epochs 3 --out benchmarks/results/rd_mtd --random-init
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def latency_ms(model: torch.nn.Module, image_size: int, batch_size: int, repeats: int) -> float:
    """Mean milliseconds per image of ``model.model`` on random input (after one warm-up)."""
    images = torch.rand(batch_size, 3, image_size, image_size)
    with torch.no_grad():
        model.model(images)
        started = time.perf_counter()
        for _ in range(repeats):
            model.model(images)
    return 1000 * (time.perf_counter() - started) / (repeats * batch_size)


def _run_one(spec: dict, queue: multiprocessing.Queue) -> None:
    from distillad.pipeline import RunConfig, fit, load_model

    config = RunConfig(model=spec["model"], model_options=spec.get("options", {}),
                       data={"kind": "mvtec", "root": str(spec["root"]), "category": spec["dataset"]},
                       backbone=spec["backbone"], pretrained=spec["pretrained"], image_size=spec["image_size"],
                       epochs=spec["epochs"], batch_size=spec["batch_size"], seed=spec["seed"])
    metrics = fit(config, spec["run_dir"], resume=True, heatmaps=False, train_limit=spec.get("train_limit"))
    model, _ = load_model(spec["run_dir"])
    metrics["infer_ms_per_image_batch1"] = latency_ms(model, spec["image_size"], 1, 10)
    metrics["infer_ms_per_image_batch32"] = latency_ms(model, spec["image_size"], 32, 2)
    metrics["peak_memory_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["parameters_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    metrics["trainable_parameters_M"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    queue.put({**spec, "root": str(spec["root"]), "run_dir": str(spec["run_dir"]), **metrics})


def run_isolated(spec: dict) -> dict:
    """Train and measure ``spec`` in a child process; returns its metrics or the error."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_one, args=(spec, queue))
    process.start()
    process.join()
    if process.exitcode != 0 or queue.empty():
        return {**spec, "root": str(spec["root"]), "run_dir": str(spec["run_dir"]), "error": f"exit {process.exitcode}"}
    return queue.get()


COLUMNS = [("name", "run"), ("epochs", "epochs"), ("image_AUROC", "I-AUROC"), ("pixel_AUROC", "P-AUROC"),
           ("pixel_AUPRO", "AUPRO"), ("image_F1max", "I-F1max"), ("seconds_per_epoch", "s/epoch"),
           ("infer_ms_per_image_batch1", "ms/img b1"), ("infer_ms_per_image_batch32", "ms/img b32"),
           ("peak_memory_MB", "peak MB"), ("trainable_parameters_M", "trainable M")]


def markdown(rows: list[dict], title: str) -> str:
    """A markdown table of ``rows``."""
    lines = [f"# {title}", "", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key, row.get("error", ""))
            cells.append(f"{value:.4f}" if isinstance(value, float) and value < 10 else
                         f"{value:.1f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rd", help="comma-separated model names")
    parser.add_argument("--dataset", default="mtd", help="category under --root")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, help="train on this many images only (ablations)")
    parser.add_argument("--random-init", action="store_true", help="also run each model with a random encoder")
    parser.add_argument("--option", action="append", default=[], metavar="MODEL:KEY=VALUE",
                        help="model option for one model, e.g. dmdd:msn=False")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()

    options: dict[str, dict] = {}
    for text in args.option:
        model, assignment = text.split(":", 1)
        key, value = assignment.split("=", 1)
        options.setdefault(model, {})[key] = json.loads(value.lower() if value in {"True", "False"} else value)
    rows = []
    for model in args.models.split(","):
        for pretrained in [True, False] if args.random_init else [True]:
            name = model if pretrained else f"{model} (random encoder)"
            run_dir = Path("benchmarks/runs") / f"{args.out.name}-{model}-{'pre' if pretrained else 'rand'}"
            spec = {"name": name, "model": model, "dataset": args.dataset, "root": args.root, "epochs": args.epochs,
                    "image_size": args.image_size, "batch_size": args.batch_size, "backbone": args.backbone,
                    "seed": args.seed, "pretrained": pretrained, "options": options.get(model, {}),
                    "run_dir": run_dir, "train_limit": args.train_limit}
            rows.append(run_isolated(spec))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
            title = (f"{args.models} on {args.dataset} ({args.backbone}, {args.image_size} px, {args.epochs} epochs, "
                     f"seed {args.seed}, 2 CPU cores)")
            args.out.with_suffix(".md").write_text(markdown(rows, title))
    print(markdown(rows, args.out.name))


if __name__ == "__main__":
    main()
