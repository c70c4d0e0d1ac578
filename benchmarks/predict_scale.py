"""``distillad predict`` over a production-sized folder: memory, open files and throughput along 5,000 images.

    python benchmarks/predict_scale.py --root ../shared/data --category weld
    python benchmarks/predict_scale.py --root ../shared/data --category weld --images 300 --out /tmp/scale  # quick

Trains a small RD run (1 epoch, 256 px) unless ``--run`` is given, exports it to ONNX and OpenVINO, and writes
``--images`` files by copying the category's real test images under new names: every 7th copy resized to
another size (mixed sizes), every 500th a corrupt file. Then ``distillad predict`` runs on the folder three
times (``--run`` with PyTorch, ``--exported`` ONNX and OpenVINO, heatmaps on as by default) in a child
process whose resident memory (``VmRSS``) and open file descriptors are read from ``/proc`` every 0.2 s,
beside the number of rows it has written. Reported per backend: images/s, peak RSS, RSS after 500 images and
the largest RSS after them, as growth (the target: under 10%), open descriptors at 500 and at the end,
and whether every corrupt file got exactly one ``error`` row. Linux only (``/proc``). Writes ``OUT.json``
and ``OUT.md`` (default ``benchmarks/results/predict_scale``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from distillad.data.io import is_image_file

CLI = [sys.executable, "-c", "from distillad.cli import main; main()"]
WARM_UP_IMAGES = 500
CORRUPT_EVERY = 500
RESIZED_EVERY = 7


def write_images(source: Path, folder: Path, count: int) -> int:
    """``count`` images copied from ``source`` (cycled) under new names; returns how many are corrupt."""
    originals = sorted(p for p in source.rglob("*") if p.is_file() and is_image_file(p))
    folder.mkdir(parents=True)
    corrupt = 0
    for index in range(count):
        original = originals[index % len(originals)]
        target = folder / f"{index:05d}{original.suffix}"
        if index % CORRUPT_EVERY == CORRUPT_EVERY - 1:
            target.write_bytes(original.read_bytes()[:100])
            corrupt += 1
        elif index % RESIZED_EVERY == 0:
            image = cv2.imread(str(original), cv2.IMREAD_UNCHANGED)
            scale = 0.5 + (index % 3) * 0.4
            cv2.imwrite(str(target), cv2.resize(image, None, fx=scale, fy=scale))
        else:
            shutil.copy(original, target)
    return corrupt


def _rows_written(out: Path) -> int:
    files = [*out.glob(".predictions.csv.*.partial"), out / "predictions.csv"]
    for path in files:
        if path.is_file():
            with path.open("rb") as handle:
                return max(0, sum(1 for _ in handle) - 1)
    return 0


def _process_state(pid: int) -> tuple[float, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb / 1024, descriptors


def measure(arguments: list[str], out: Path, expected_errors: int, threads: int) -> dict:
    """Run ``distillad predict ARGUMENTS --out OUT`` and sample its memory and descriptors against its progress."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    process = subprocess.Popen([*CLI, "predict", *arguments, "--out", str(out), "--threads", str(threads)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    samples = []
    while process.poll() is None:
        state = _process_state(process.pid)
        if state is not None:
            samples.append((_rows_written(out), *state))
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"predict failed ({process.returncode}): {stderr[-2000:]}")
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    after_warm_up = [sample for sample in samples if sample[0] >= WARM_UP_IMAGES]
    at_warm_up, last = after_warm_up[0], samples[-1]
    return {
        "images": len(rows), "error_rows": sum(1 for row in rows if row["error"]), "expected_error_rows": expected_errors,
        "seconds": seconds, "images_per_second": len(rows) / seconds,
        "peak_rss_MB": max(sample[1] for sample in samples),
        "rss_MB_at_500": at_warm_up[1], "max_rss_MB_after_500": max(sample[1] for sample in after_warm_up),
        "rss_growth_percent": 100 * (max(sample[1] for sample in after_warm_up) - at_warm_up[1]) / at_warm_up[1],
        "open_fds_at_500": at_warm_up[2], "open_fds_at_end": last[2],
        "max_open_fds_after_500": max(sample[2] for sample in after_warm_up),
        "summary": stdout.strip().splitlines()[-1],
        "rss_curve": [[rows, round(rss, 1)] for rows, rss, _ in samples[:: max(1, len(samples) // 50)]],
    }


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        "# `distillad predict` at production scale",
        "",
        f"{settings['images']} images ({settings['corrupt']} corrupt, every {RESIZED_EVERY}th resized) copied from "
        f"{settings['source']}, RD at {settings['image_size']} px, heatmaps on, {settings['threads']} threads, "
        f"{settings['machine']}. Growth: largest RSS after image {WARM_UP_IMAGES} over RSS at it (target < 10%).",
        "",
        "| backend | images/s | peak RSS MB | RSS @500 MB | max RSS after 500 MB | growth % | fds @500 | fds end | "
        "max fds | error rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["backends"].items():
        lines.append(f"| {name} | {row['images_per_second']:.1f} | {row['peak_rss_MB']:.0f} | {row['rss_MB_at_500']:.0f} "
                     f"| {row['max_rss_MB_after_500']:.0f} | {row['rss_growth_percent']:+.1f} | "
                     f"{row['open_fds_at_500']} | {row['open_fds_at_end']} | {row['max_open_fds_after_500']} | "
                     f"{row['error_rows']} of {row['expected_error_rows']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="dataset root in MVTec layout")
    parser.add_argument("--category", required=True, help="category whose test images are copied")
    parser.add_argument("--run", type=Path, help="a trained run (default: train RD for 1 epoch)")
    parser.add_argument("--images", type=int, default=5000, help="images to predict (default: 5000)")
    parser.add_argument("--threads", type=int, default=2, help="inference threads (default: 2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/predict_scale"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="predict-scale-") as scratch:
        scratch = Path(scratch)
        run_dir = args.run
        if run_dir is None:
            run_dir = scratch / "run"
            subprocess.run([*CLI, "fit", "--model", "rd", "--root", str(args.root), "--category", args.category,
                            "--epochs", "1", "--no-heatmaps", "--out", str(run_dir)], check=True, capture_output=True)
        subprocess.run([*CLI, "export", "--run", str(run_dir), "--format", "onnx", "openvino", "--out",
                        str(scratch / "export")], check=True, capture_output=True)
        folder = scratch / "images"
        corrupt = write_images(args.root / args.category / "test", folder, args.images)
        backends = {"PyTorch (--run)": ["--run", str(run_dir)],
                    "ONNX Runtime (--exported)": ["--exported", str(scratch / "export" / "onnx")],
                    "OpenVINO (--exported)": ["--exported", str(scratch / "export" / "openvino")]}
        results = {"settings": {"images": args.images, "corrupt": corrupt, "source": f"{args.category}/test",
                                "image_size": json.loads((run_dir / "config.json").read_text())["image_size"],
                                "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"},
                   "backends": {}}
        for name, arguments in backends.items():
            out = scratch / name.split()[0].lower()
            results["backends"][name] = measure([*arguments, "--input", str(folder)], out, corrupt, args.threads)
            print(name, {key: value for key, value in results["backends"][name].items() if key != "rss_curve"},
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
