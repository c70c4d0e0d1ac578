"""DMDD with foreground-aware synthesis (FAS) for the student's pairs too, against the default (whole-image anomalies
for the student, FAS for the MSN only). Same settings as ``benchmarks/results/dmdd_msn.md``, so its
"msn_lr 0.0005 (default)" rows are the baseline::

    python benchmarks/dmdd_fas_both.py   # writes benchmarks/results/dmdd_fas_both.{json,md}
"""

from __future__ import annotations

import json
from pathlib import Path

from distillad.models.dmdd import lightning_model
from distillad.pipeline import RunConfig, fit
from distillad.synthesis import AnomalySynthesizer

BASELINE = Path("benchmarks/results/dmdd_msn.json")
DEFAULT = "G per pixel, msn_lr 0.0005 (default)"


def main() -> None:
    original = lightning_model.DMDD.__init__

    def fas_for_both(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        self.synthesizer = AnomalySynthesizer(foreground="grabcut", texture_dir=self.hparams.texture_dir,
                                              seed=self.hparams.seed)

    lightning_model.DMDD.__init__ = fas_for_both
    rows = [{**row, "variant": "student: whole image, MSN: FAS (default)"}
            for row in json.loads(BASELINE.read_text()) if row["variant"] == DEFAULT]
    for seed in (0, 1):
        for category in ("mtd", "weld"):
            config = RunConfig(model="dmdd", model_options={}, image_size=128, max_steps=64, batch_size=8, seed=seed,
                               data={"kind": "mvtec_ad", "root": "../shared/data", "category": category})
            metrics = fit(config, Path("runs/dmdd_fas_both") / f"{category}-{seed}", train_limit=128, test_limit=120,
                          heatmaps=False)
            rows.append({"variant": "student and MSN: FAS", "category": category, "seed": seed,
                         **{key: metrics[key] for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")},
                         "fas_whole_image_share": metrics.get("fas_whole_image_share")})
    out = Path("benchmarks/results/dmdd_fas_both")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = ["# DMDD: FAS for the student too (64 steps, batch 8, 128 px, 128 training images, 120 test images)", "",
             "| category | seed | variant | I-AUROC | P-AUROC | AUPRO |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["category"], r["seed"], r["variant"])):
        lines.append(f"| {row['category']} | {row['seed']} | {row['variant']} | {100 * row['image_AUROC']:.1f} | "
                     f"{100 * row['pixel_AUROC']:.1f} | {100 * row['pixel_AUPRO']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
