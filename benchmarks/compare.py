"""Merge benchmark result files (lists of runs with a ``name``) into one comparison table (JSON + markdown).

    python benchmarks/compare.py benchmarks/results/rd_mtd_1epoch.json benchmarks/results/dmdd_mtd_paper_lr.json \\
        --out benchmarks/results/dmdd_mtd --title "DMDD vs RD on mtd"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillad.benchmark import detail_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, nargs="+", help="result JSON files (lists of runs)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    parser.add_argument("--title", required=True)
    parser.add_argument("--rename", action="append", default=[], metavar="FILE_STEM:RUN=NEW",
                        help="rename a run in one input, e.g. dmdd_mtd_lr5e-4:dmdd='dmdd (lr 5e-4)'")
    args = parser.parse_args()
    renames = {}
    for text in args.rename:
        stem, assignment = text.split(":", 1)
        old, new = assignment.split("=", 1)
        renames[(stem, old)] = new
    rows = []
    for path in args.inputs:
        for row in json.loads(path.read_text()):
            rows.append({**row, "name": renames.get((path.stem, row["name"]), row["name"])})
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    text = f"# {args.title}\n\n{detail_table(rows, ('name', 'epochs'))}\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
