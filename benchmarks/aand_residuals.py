"""AAND's Fig. 8 on a real category: residual intensity on normal vs anomalous patches during stage 1.

Trains only the RAA modules (stage 1) on normal training images with pseudo-anomalies and, every few
steps, measures the mean squared gated residual |w * Delta|^2 (``residual_intensity``) on two fixed
evaluation sets: held-out normal images with synthetic anomalies, and real defective test images with
their ground-truth masks. Writes ``OUT.json`` and ``OUT.png``.

    python benchmarks/aand_residuals.py --dataset mtd --steps 60 --out benchmarks/results/aand_residuals_mtd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import torch
from torchvision.transforms.v2.functional import resize

from distillad.data import mvtec_samples, read_image, read_mask
from distillad.models.aand import AAND
from distillad.models.aand.analysis import residual_intensity
from distillad.synthesis import AnomalySynthesizer

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(paths: list[str], size: int) -> torch.Tensor:
    images = [torch.from_numpy(read_image(p)).permute(2, 0, 1).float() / 255 for p in paths]
    return torch.stack([resize(image, [size, size], antialias=True) for image in images])


def load_masks(paths: list[str], size: int) -> torch.Tensor:
    return torch.stack([torch.from_numpy(read_mask(p, (size, size))).float()[None] for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mtd")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/aand_residuals_mtd"))
    args = parser.parse_args()
    torch.manual_seed(0)
    samples = mvtec_samples(args.root, args.dataset)
    train = samples[samples.split == "train"].image_path.tolist()
    defective = samples[(samples.split == "test") & (samples.label_index == 1)].sample(32, random_state=0)
    held_out = load(train[-32:], args.image_size)
    synthetic = AnomalySynthesizer(foreground="threshold", seed=123)(held_out)
    real_images = load(defective.image_path.tolist(), args.image_size)
    real_masks = load_masks(defective.mask_path.tolist(), args.image_size)

    module = AAND(image_size=(args.image_size, args.image_size), post_processor=False, evaluator=False,
                  visualizer=False)
    optimizer = module.configure_optimizers()[0]
    train_paths = train[:-32]
    history = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            on_synthetic = residual_intensity(module.model, synthetic.anomalous, synthetic.mask)
            on_real = residual_intensity(module.model, real_images, real_masks)
            history.append({"step": step, "synthetic_normal": on_synthetic.normal,
                            "synthetic_anomalous": on_synthetic.anomalous, "real_normal": on_real.normal,
                            "real_anomalous": on_real.anomalous})
            print(history[-1])
        if step == args.steps:
            break
        start = (step * args.batch_size) % max(len(train_paths) - args.batch_size, 1)
        paths = train_paths[start:start + args.batch_size]
        module.model.train()
        loss, _ = module.amplification_step_loss(SimpleNamespace(image=load(paths, args.image_size), image_path=paths))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(history, indent=2))
    steps = [h["step"] for h in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, kind, title in [(axes[0], "synthetic", "held-out images + synthetic anomalies"),
                              (axes[1], "real", f"real {args.dataset} defects (ground-truth masks)")]:
        axis.plot(steps, [h[f"{kind}_normal"] for h in history], "o-", label="normal patches")
        axis.plot(steps, [h[f"{kind}_anomalous"] for h in history], "s-", label="anomalous patches")
        axis.set_title(title)
        axis.set_xlabel("stage-1 training step")
        axis.set_yscale("log")
        axis.legend()
    axes[0].set_ylabel("residual intensity |w·Δ|²")
    figure.suptitle(f"AAND residual intensity during stage 1 ({args.dataset}, tf_efficientnet_lite0, "
                    f"{args.image_size} px, batch {args.batch_size})")
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    main()
