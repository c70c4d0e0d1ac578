"""``distillad benchmark``: train and test every model on every category, then tabulate like the papers.

Peers (``--peers patchcore,padim``, :mod:`distillad.peers`) are cells like the models', fitted by anomalib on the
same data, encoder and image size and measured by the same code.

Each (category, model) *cell* trains in its own spawned process through the same
:func:`distillad.pipeline.fit` as ``distillad fit``, so peak memory is per cell and a crash or a bad
category costs only that cell. The output folder::

    OUT/benchmark.json                settings every cell shares (a rerun with other settings is refused)
    OUT/cells/CATEGORY/MODEL/         the cell's run directory (``distillad predict --run`` works on it)
    OUT/cells/CATEGORY/MODEL/result.json  written last: a cell with it is finished and skipped on rerun
    OUT/results.json|csv|md           every cell: I-AUROC / P-AUROC / PRO / F1-max, timings, memory
    OUT/plots/roc_CATEGORY.png        image and pixel ROC curves of every model
    OUT/plots/pro_CATEGORY.png        PRO curves (FPR <= 0.3)
    OUT/plots/examples_CATEGORY.png   image, ground truth and each model's anomaly map (papers' Fig. 7)

A rerun skips finished cells; an interrupted cell resumes from its last epoch checkpoint; a failed cell
is reported in the tables with its error and retried on the next run.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import platform
import queue
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from distillad.errors import DistilladError
from distillad.storage import atomic_writer, write_json, write_text

EXAMPLES_PER_CATEGORY = 4


@dataclass
class BenchmarkSettings:
    """What every cell of one benchmark shares; stored in ``OUT/benchmark.json``."""

    root: str
    dataset: str = "mvtec_ad"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 256
    epochs: int = 1
    batch_size: int = 16
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    options: dict[str, dict] = field(default_factory=dict)
    max_steps: int | None = None
    precision: str = "32"
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    preset: str | None = None

    def check_compatible(self, out: Path) -> None:
        """Refuse to mix cells trained with other settings into ``out``; record the settings otherwise."""
        path = out / "benchmark.json"
        current = json.loads(json.dumps(asdict(self)))
        if path.is_file():
            stored = json.loads(path.read_text())
            defaults = {f.name: f.default for f in fields(self)}  # settings added later read as their default
            changed = sorted(key for key in current if stored.get(key, defaults[key]) != current[key])
            if changed:
                msg = (f"{out} holds a benchmark with other settings ({', '.join(changed)} differ); "
                       "pass another --out, or the same settings to resume it")
                raise DistilladError(msg)
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, current)


def cell_dir(out: Path, category: str, model: str) -> Path:
    """Run directory of one cell."""
    return out / "cells" / category / model


def time_calls(call: Callable[[], object], repeats: int, min_seconds: float = 0.0) -> tuple[int, float]:
    """One warm-up call, then calls until ``min_seconds`` have passed and ``repeats`` were made: (calls, seconds)."""
    call()
    calls, started = 0, time.perf_counter()
    while calls < repeats or time.perf_counter() - started < min_seconds:
        call()
        calls += 1
    return calls, time.perf_counter() - started


def latency_ms(model: torch.nn.Module, image_size: int, batch_size: int, repeats: int) -> float:
    """Mean milliseconds per image of the torch model on random input, after one warm-up pass."""
    images = torch.rand(batch_size, 3, image_size, image_size)
    with torch.no_grad():
        calls, seconds = time_calls(lambda: model(images), repeats)
    return 1000 * seconds / (calls * batch_size)


def _example_images(run_dir: Path, count: int) -> list[tuple[str, str]]:
    """(image, mask) paths of anomalous test images, one defect type after another, in path order."""
    from distillad.data.layouts import dataset_layout

    config = json.loads((run_dir / "config.json").read_text())
    with (run_dir / "test_scores.csv").open() as handle:
        tested = {row["path"] for row in csv.DictReader(handle) if row["label"] == "1"}
    samples = dataset_layout(config["data"].get("kind", "mvtec_ad")).samples(config["data"]["root"], config["data"]["category"])
    anomalous = samples[samples.image_path.isin(tested)].sort_values("image_path")
    per_type = [list(zip(group.image_path, group.mask_path)) for _, group in anomalous.groupby("label", sort=True)]
    picked: list[tuple[str, str]] = []
    while len(picked) < count and any(per_type):
        for remaining in per_type:
            if remaining and len(picked) < count:
                picked.append(remaining.pop(0))
    return picked


@torch.no_grad()
def _save_examples(model: torch.nn.Module, run_dir: Path, image_size: int) -> None:
    from distillad.inference import ImageFiles, collate

    picked = _example_images(run_dir, EXAMPLES_PER_CATEGORY)
    if not picked:
        return
    dataset = ImageFiles([Path(path) for path, _ in picked], image_size)
    _, images, _ = collate([dataset[index] for index in range(len(dataset))])  # test images: all were readable
    maps = model(images).anomaly_map[:, 0].numpy().astype(np.float32)
    np.savez_compressed(run_dir / "examples.npz", maps=maps, images=np.array([p for p, _ in picked]),
                        masks=np.array([m for _, m in picked]))


def cell_config(settings: BenchmarkSettings, category: str, model_name: str):
    """The :class:`~distillad.pipeline.RunConfig` of one cell. With ``preset="paper"`` each model takes its own
    paper's backbone, image size, batch size and epochs (AAND 220, the others 200) instead of the shared ones."""
    from distillad.models.registry import MODELS
    from distillad.pipeline import RunConfig

    paper = MODELS[model_name].paper if settings.preset == "paper" and model_name in MODELS else {}
    return RunConfig(model=model_name, model_options=settings.options.get(model_name, {}),
                     data={"kind": settings.dataset, "root": settings.root, "category": category},
                     backbone=paper.get("backbone", settings.backbone), pretrained=settings.pretrained,
                     image_size=paper.get("image_size", settings.image_size),
                     epochs=paper.get("epochs", settings.epochs), batch_size=paper.get("batch_size", settings.batch_size),
                     seed=settings.seed, max_steps=None if paper else settings.max_steps, precision=settings.precision,
                     accelerator=settings.accelerator, devices=settings.devices, strategy=settings.strategy)


def run_cell(settings: BenchmarkSettings, category: str, model_name: str, run_dir: Path) -> dict:
    """Train, test and time one cell in this process; writes and returns its ``result.json``."""
    from distillad.peers import PEERS, run_peer
    from distillad.pipeline import fit, load_model

    started = time.perf_counter()
    config = cell_config(settings, category, model_name)
    if model_name in PEERS:
        metrics, module = run_peer(config, run_dir, settings.train_limit, settings.test_limit)
        model = module
    else:
        metrics = fit(config, run_dir, resume=True, heatmaps=False, train_limit=settings.train_limit,
                      test_limit=settings.test_limit)
        module, config = load_model(run_dir)
        model = module.model
    _save_examples(model, run_dir, config.image_size)
    result = {
        "category": category, "model": model_name, **metrics,
        "infer_ms_per_image_batch1": latency_ms(model, config.image_size, 1, 10),
        "infer_ms_per_image_batch32": latency_ms(model, config.image_size, 32, 2),
        "peak_memory_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters_M": sum(p.numel() for p in module.parameters()) / 1e6,
        "trainable_parameters_M": sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6,
        "torch_threads": torch.get_num_threads(),
        "cell_seconds": time.perf_counter() - started,
        "versions": config.versions,
    }
    write_json(run_dir / "result.json", result)
    return result


def _cell_process(settings: BenchmarkSettings, category: str, model_name: str, run_dir: Path,
                  results: multiprocessing.Queue) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        results.put(run_cell(settings, category, model_name, run_dir))
    except DistilladError as error:
        results.put({"error": str(error)})
    except Exception as error:  # any crash is this cell's result; the other cells go on
        where = traceback.extract_tb(error.__traceback__)[-1]
        results.put({"error": f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"})


def run_isolated(settings: BenchmarkSettings, category: str, model_name: str, run_dir: Path) -> dict:
    """:func:`run_cell` in a fresh spawned process; a failure comes back as ``{"error": ...}``."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_cell_process, args=(settings, category, model_name, run_dir, results))
    process.start()
    result = None
    while result is None and (process.is_alive() or not results.empty()):
        try:
            result = results.get(timeout=1)
        except queue.Empty:
            continue
    process.join()
    if result is None:
        result = {"error": f"the cell's process died with exit code {process.exitcode} (out of memory?)"}
    return {"category": category, "model": model_name, **result}


def run_benchmark(settings: BenchmarkSettings, models: list[str], categories: list[str], out: Path,
                  plots: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Every cell of ``categories`` x ``models`` (finished ones are read back), then tables and plots.

    Progress lines go to ``log`` (default: printed and flushed at once, so a redirected log stays current).
    """
    log = log or (lambda line: print(line, flush=True))
    from distillad.models.registry import get_model_class
    from distillad.peers import PEERS

    for name in models:
        if name not in PEERS:
            get_model_class(name)
    out = Path(out)
    settings.check_compatible(out)
    rows = []
    for category in categories:
        for model_name in models:
            run_dir = cell_dir(out, category, model_name)
            finished = run_dir / "result.json"
            if finished.is_file():
                log(f"[{category} / {model_name}] finished earlier; skipped")
                rows.append(json.loads(finished.read_text()))
            else:
                log(f"[{category} / {model_name}] training {schedule(settings)}")
                rows.append(run_isolated(settings, category, model_name, run_dir))
                if "error" in rows[-1]:
                    log(f"[{category} / {model_name}] failed: {rows[-1]['error']}")
            write_tables(rows, settings, models, categories, out)
    if plots:
        from distillad.plots import plot_category

        for category in categories:
            plot_category(out, category, [row for row in rows if row["category"] == category and "error" not in row])
        write_tables(rows, settings, models, categories, out)
    log(f"results: {out / 'results.md'}")
    return rows


def schedule(settings: BenchmarkSettings) -> str:
    """How long every cell trains, in words."""
    if settings.preset == "paper":
        return "each paper's epochs (AAND 220, the others 200)"
    return f"{settings.max_steps} step(s)" if settings.max_steps else f"{settings.epochs} epoch(s)"


def _percent_triplet(row: dict) -> str:
    if "error" in row:
        return "failed"
    return "/".join(f"{100 * row[key]:.1f}" if key in row else "-" for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))


def _mean(rows: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the finished ``rows`` that have it."""
    values = [row[key] for row in rows if key in row]
    return sum(values) / len(values) if values else None


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


DETAIL_COLUMNS = [("image_AUROC", "I-AUROC"), ("pixel_AUROC", "P-AUROC"), ("pixel_AUPRO", "AUPRO"),
                  ("image_F1max", "I-F1max"), ("image_F1_at_threshold", "I-F1 @ calibrated thr."),
                  ("seconds_per_epoch", "train s/epoch"), ("seconds_per_step", "train s/step"),
                  ("infer_ms_per_image_batch1", "ms/img b1"),
                  ("infer_ms_per_image_batch32", "ms/img b32"), ("peak_memory_MB", "peak MB"),
                  ("trainable_parameters_M", "trainable M")]


def detail_table(rows: list[dict], label_keys: tuple[str, ...] = ("category", "model")) -> str:
    """A markdown table with one line per run: quality, speed and memory, or the run's error."""
    lines = ["| " + " | ".join([*label_keys, *(title for _, title in DETAIL_COLUMNS)]) + " |",
             "|" + "---|" * (len(label_keys) + len(DETAIL_COLUMNS))]
    for row in rows:
        labels = [str(row.get(key, "")) for key in label_keys]
        if "error" in row:
            cells = [f"failed: {row['error']}"] + [""] * (len(DETAIL_COLUMNS) - 1)
        else:
            cells = [_format(row.get(key)) for key, _ in DETAIL_COLUMNS]
        lines.append("| " + " | ".join(labels + cells) + " |")
    return "\n".join(lines)


#: MVTec LOCO's columns (the DSKD paper's table): AU-sPRO and image AUROC, logical / structural / mean.
LOCO_KEYS = [f"{metric}_{group}" for metric in ("sPRO", "image_AUROC") for group in ("logical", "structural", "mean")]


def _loco_section(by_cell: dict, models: list[str], categories: list[str]) -> list[str]:
    """The MVTec LOCO table, when the cells report sPRO; else nothing."""
    if not any("sPRO_mean" in row for row in by_cell.values()):
        return []

    def cell(row: dict | None) -> str:
        if row is None or "sPRO_mean" not in row:
            return "-"
        return " · ".join("/".join(f"{100 * row[f'{metric}_{group}']:.1f}" for group in ("logical", "structural", "mean"))
                          for metric in ("sPRO", "image_AUROC"))

    lines = ["## MVTec LOCO: AU-sPRO (FPR 0.05) · image AUROC, logical / structural / mean (%)", "",
             "| category | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    lines += [f"| {category} | " + " | ".join(cell(by_cell.get((category, m))) for m in models) + " |"
              for category in categories]
    means = []
    for model_name in models:
        done = [by_cell[(c, model_name)] for c in categories if "sPRO_mean" in by_cell.get((c, model_name), {})]
        means.append(cell({key: _mean(done, key) for key in LOCO_KEYS}) if done else "-")
    return [*lines, "| **mean** | " + " | ".join(means) + " |", ""]


def markdown(rows: list[dict], settings: BenchmarkSettings, models: list[str], categories: list[str],
             plots: list[str] | None = None) -> str:
    """``results.md``: the papers' I-AUC/P-AUC/PRO table with category means, then every run in detail."""
    by_cell = {(row["category"], row["model"]): row for row in rows}
    versions = next((row["versions"] for row in rows if "versions" in row), {})
    encoder = ("each paper's encoder, image size and batch size" if settings.preset == "paper"
               else f"{settings.backbone}, {settings.image_size} px, batch {settings.batch_size}")
    limits = ", ".join(f"{name} {value}" for name, value in (("train limit", settings.train_limit),
                                                              ("test limit", settings.test_limit)) if value)
    lines = [
        f"# distillad benchmark: {', '.join(models)} on {', '.join(categories)}", "",
        f"{encoder} ({'ImageNet weights' if settings.pretrained else 'random weights'}), {schedule(settings)}, "
        f"seed {settings.seed}, "
        f"precision {settings.precision}"
        + (f", {settings.devices} devices ({settings.strategy})" if settings.devices > 1 else "")
        + (f", {limits}" if limits else "") + (f", options {settings.options}" if settings.options else "")
        + f"; {platform.machine()} with {os.cpu_count()} CPU cores"
        + (f", {rows[0].get('torch_threads')} torch thread(s)" if rows and "torch_threads" in rows[0] else "") + ".",
        "Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()) + ".", "",
        "## Image AUROC / pixel AUROC / PRO (%)", "",
        "| category | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1),
    ]
    for category in categories:
        lines.append(f"| {category} | " + " | ".join(_percent_triplet(by_cell[(category, m)]) if (category, m) in by_cell
                                                      else "pending" for m in models) + " |")
    means = []
    for model_name in models:
        done = [by_cell[(c, model_name)] for c in categories if "error" not in by_cell.get((c, model_name), {"error": ""})]
        triplet = "/".join(f"{100 * value:.1f}" if (value := _mean(done, key)) is not None else "-"
                           for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))
        means.append(triplet + ("" if len(done) == len(categories) else f" ({len(done)} of {len(categories)})"))
    lines += ["| **mean** | " + " | ".join(means) + " |", ""]
    lines += _loco_section(by_cell, models, categories)
    lines += ["## Every run", "", detail_table(rows), "",
              "I-F1max uses the F1-optimal threshold on the test split (reported only); I-F1 @ calibrated thr. uses the "
              "decision threshold from held-out normal images (99th percentile), which `distillad predict` applies. "
              "ms/img: torch inference on random input after a warm-up; peak MB: the cell process's maximum RSS.", ""]
    if plots:
        lines += ["Plots: " + ", ".join(f"`{name}`" for name in plots), ""]
    return "\n".join(lines)


CSV_FIELDS = ["category", "model", "image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1max", "image_F1max_threshold",
              "image_F1_at_threshold", "threshold", "train_seconds", "seconds_per_epoch", "seconds_per_step", "train_steps",
              "test_ms_per_image",
              "infer_ms_per_image_batch1", "infer_ms_per_image_batch32", "peak_memory_MB", "parameters_M",
              "trainable_parameters_M", "backbone", "image_size", "epochs", "seed", "torch_threads", *LOCO_KEYS,
              "sPRO_overall", "error"]


def write_tables(rows: list[dict], settings: BenchmarkSettings, models: list[str], categories: list[str], out: Path) -> None:
    """``results.json``, ``results.csv`` and ``results.md`` for the cells done so far."""
    write_json(out / "results.json", {"settings": asdict(settings), "cells": rows})
    with atomic_writer(out / "results.csv", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plots = sorted(f"plots/{path.name}" for path in (out / "plots").glob("*.png"))
    write_text(out / "results.md", markdown(rows, settings, models, categories, plots))
