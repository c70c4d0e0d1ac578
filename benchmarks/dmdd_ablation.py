"""DMDD ablations in the spirit of the paper's Tables 4 and 5, on one MVTec-layout category.

Table 4 rows (student-teacher architecture) use the plain sum of the maps (the paper's "w/o MSN" row of
Table 5 equals its last Table 4 row); Table 5 rows switch the MSN components. Short runs: this is for
relative comparisons, the epochs, image size and training subset are written into the table title.

    python benchmarks/dmdd_ablation.py --dataset mtd --epochs 1 --image-size 128 --train-limit 150
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillad.benchmark import BenchmarkSettings, detail_table, run_isolated

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"

TABLE_4 = [
    ("normality, no PMN", {"branches": "normality", "pmn_inner": False, "pmn_outer": False, "msn": False}),
    ("normality, PMN inner", {"branches": "normality", "pmn_inner": True, "pmn_outer": False, "msn": False}),
    ("normality, PMN inner+outer", {"branches": "normality", "msn": False}),
    ("abnormality, no PMN", {"branches": "abnormality", "pmn_inner": False, "pmn_outer": False, "msn": False}),
    ("abnormality, PMN inner", {"branches": "abnormality", "pmn_inner": True, "pmn_outer": False, "msn": False}),
    ("abnormality, PMN inner+outer", {"branches": "abnormality", "msn": False}),
    ("both (DMD), w/o MSN", {"msn": False}),
]
TABLE_5 = [
    ("w/ MSN", {}),
    ("-FAS", {"fas": False}),
    ("-PU", {"pyramid_upsampling": False}),
    ("-MM", {"multi_perception": False}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mtd")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train-limit", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dmdd_ablation_mtd"))
    args = parser.parse_args()
    rows = []
    for name, options in TABLE_4 + TABLE_5:
        settings = BenchmarkSettings(root=str(args.root), image_size=args.image_size, epochs=args.epochs,
                                     train_limit=args.train_limit, options={"dmdd": {**options, "lr": args.lr}})
        run_dir = Path("benchmarks/runs") / f"{args.out.name}-{len(rows)}"
        rows.append({"name": name, **run_isolated(settings, args.dataset, "dmdd", run_dir)})
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        title = (f"DMDD ablations on {args.dataset} (tf_efficientnet_lite0, {args.image_size} px, {args.epochs} epoch(s), "
                 f"first {args.train_limit} training images, lr {args.lr}, full test split, 2 CPU cores)")
        args.out.with_suffix(".md").write_text(f"# {title}\n\n{detail_table(rows, ('name',))}\n")


if __name__ == "__main__":
    main()
