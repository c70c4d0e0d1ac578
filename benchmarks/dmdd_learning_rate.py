"""DMDD's start of training: the paper's single learning rate against gentler schedules, with and without the
symmetry-breaking noise on the abnormality half of the decoupling convolutions.

Each variant trains DMDD without the MSN (so the student alone is compared; Table 4's scoring) for a fixed number
of optimiser steps through :func:`distillad.pipeline.fit`, records L_NGM and L_AIM of every step and tests on a
fixed stratified subset. Writes ``benchmarks/results/dmdd_learning_rate.{json,md}``::

    python benchmarks/dmdd_learning_rate.py --categories mtd,weld --steps 200 --image-size 128

Variants (``lr``: new layers; ``scale``: factor for the pretrained stages; ``noise``: the abnormality-half noise;
``warmup``: steps of linear warm-up of every rate): see :data:`VARIANTS`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from distillad import pipeline
from distillad.models.dmdd import lightning_model, torch_model

VARIANTS = {
    "paper, exact copy": {"lr": 0.005, "scale": 1.0, "noise": 0.0, "warmup": 0},
    "paper + noise (default)": {"lr": 0.005, "scale": 1.0, "noise": 0.1, "warmup": 0},
    "lr 5e-4": {"lr": 5e-4, "scale": 1.0, "noise": 0.1, "warmup": 0},
    "pretrained x0.1": {"lr": 0.005, "scale": 0.1, "noise": 0.1, "warmup": 0},
    "warm-up": {"lr": 0.005, "scale": 1.0, "noise": 0.1, "warmup": 50},
}


class LossRecorder(Callback):
    """L_NGM and L_AIM of every training step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        del trainer, outputs, batch, batch_idx
        self.steps.append(dict(module.last_losses))


def instrument(warmup: int) -> None:
    """Keep each step's losses on the module and, with ``warmup``, scale every rate linearly over that many steps."""
    losses = lightning_model.DMDD.distillation_losses

    def recorded(self, *args):
        result = losses(self, *args)
        self.last_losses = {name: round(float(value), 4) for name, value in result.items()}
        return result

    lightning_model.DMDD.distillation_losses = recorded
    if not warmup:
        return
    configure, step = lightning_model.DMDD.configure_optimizers, lightning_model.DMDD.training_step

    def configure_with_warmup(self):
        optimizers = configure(self)
        self.warmup = torch.optim.lr_scheduler.LambdaLR(optimizers[0], lambda s: min(1.0, (s + 1) / warmup))
        return optimizers

    def step_with_warmup(self, *args, **kwargs):
        output = step(self, *args, **kwargs)
        self.warmup.step()
        return output

    lightning_model.DMDD.configure_optimizers = configure_with_warmup
    lightning_model.DMDD.training_step = step_with_warmup


def run_variant(name: str, category: str, args: argparse.Namespace) -> dict:
    settings = VARIANTS[name]
    torch_model.ABNORMALITY_INIT_NOISE = settings["noise"]
    instrument(settings["warmup"])
    recorder = LossRecorder()
    make_trainer = pipeline._trainer

    def trainer_with_recorder(*trainer_args):
        trainer = make_trainer(*trainer_args)
        trainer.callbacks.append(recorder)
        return trainer

    pipeline._trainer = trainer_with_recorder
    config = pipeline.RunConfig(model="dmdd", model_options={"msn": False, "lr": settings["lr"],
                                                             "pretrained_lr_scale": settings["scale"]},
                                data={"kind": "mvtec_ad", "root": args.root, "category": category},
                                image_size=args.image_size, max_steps=args.steps, batch_size=args.batch_size, seed=0)
    started = time.perf_counter()
    metrics = pipeline.fit(config, args.runs / f"{category}-{name.replace(' ', '_')}", test_limit=args.test_limit,
                           heatmaps=False)
    steps = recorder.steps
    return {"variant": name, "category": category, **settings, "steps": args.steps,
            "image_AUROC": metrics["image_AUROC"], "pixel_AUROC": metrics["pixel_AUROC"],
            "pixel_AUPRO": metrics["pixel_AUPRO"], "seconds": time.perf_counter() - started,
            "loss_step1": steps[0], "loss_step2": steps[1], "loss_last": steps[-1],
            "validation_curve": metrics.get("validation_curve", [])}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# DMDD learning-rate schedules ({args.steps} steps, batch {args.batch_size}, {args.image_size} px, "
             f"no MSN, seed 0, test subset {args.test_limit})", "",
             "| category | variant | lr new / pretrained | noise | warm-up | L step 1 -> 2 -> last (NGM+AIM) | "
             "I-AUROC | P-AUROC | AUPRO |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        total = [sum(row[key].values()) for key in ("loss_step1", "loss_step2", "loss_last")]
        lines.append(f"| {row['category']} | {row['variant']} | {row['lr']:g} / {row['lr'] * row['scale']:g} | "
                     f"{row['noise']:g} | {row['warmup']} | {total[0]:.3f} -> {total[1]:.3f} -> {total[2]:.3f} | "
                     f"{100 * row['image_AUROC']:.1f} | {100 * row['pixel_AUROC']:.1f} | "
                     f"{100 * row['pixel_AUPRO']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--categories", default="mtd,weld")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--test-limit", type=int, default=120)
    parser.add_argument("--runs", type=Path, default=Path("runs/dmdd_learning_rate"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dmdd_learning_rate"))
    args = parser.parse_args()
    import multiprocessing

    rows = []
    for category in args.categories.split(","):
        for name in args.variants.split(","):
            # each variant patches module state: run it in a fresh process
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rows.append(pool.apply(run_variant, (name, category, args)))
            print(json.dumps({key: rows[-1][key] for key in ("category", "variant", "image_AUROC", "pixel_AUROC",
                                                              "pixel_AUPRO")}), flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, args))


if __name__ == "__main__":
    main()
