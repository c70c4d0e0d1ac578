"""Training speed: images/s per model x precision x threads, and the limit each model's step could reach.

    python benchmarks/train_speed.py                                    # rd,dmdd,dskd,aand x 32,bf16-mixed x 1,2 threads
    python benchmarks/train_speed.py --models dmdd --precisions 32 --threads 1 --label before --out /tmp/before
    python benchmarks/train_speed.py --quick --out /tmp/speed           # a check that it runs (64 px, 2 steps an epoch)
    python benchmarks/train_speed.py --models dmdd --threads 2 --num-workers 0,2   # synthesis in the step / in workers
    python benchmarks/train_speed.py --models dmdd --precisions 32 --option bf16_frozen_passes=True
    python benchmarks/train_speed.py --precisions 32 --threads 2 --epochs 2 --profile   # + where the step's time goes
    python benchmarks/train_speed.py --accelerator gpu --models dmdd --precisions 32,16-mixed --threads 4 \
        --num-workers 0,8 --images 200 --label "one GPU"               # GPU busy with synthesis in the step / in workers

Each cell runs in its own process with ``torch.set_num_threads(threads)``: Lightning's ``Trainer`` trains the
model for ``--epochs`` epochs on ``--images`` training images of ``--root/--category`` (batch ``--batch-size``,
``--image-size`` px). The first epoch is a warm-up (allocator, oneDNN kernel choice, GrabCut foregrounds);
training images/s = images of the later epochs / their wall time, everything the model does in an epoch included
(DMDD's MSN epoch, synthesis, Lightning). AAND is timed in stage 2, the longer of its stages, once its teacher
cache is full (``--epochs 3`` trains it 5 epochs: 2 + 3, the last 2 timed).

The limit: the same step taken apart, each part timed alone on one batch of real images in the cell's
precision: the frozen passes that remain once the teacher features of the training images are cached
(:class:`~distillad.components.FrozenFeatureCache`: DMDD's teacher on the anomalous twins, in the student step
and in the MSN epoch, and the MSN epoch's no-grad student pass; AAND's fixed RAA modules; none for RD and
DSKD) and the trainable passes (forward + backward of what trains, losses included). ``step / limit``
close to 1 means nothing but compute is left. ``--profile`` runs those parts once more under ``torch.profiler`` and
reports each operator group's share of their CPU time (:data:`OP_GROUPS`).

The script uses only APIs that also exist before the speed work (``RunConfig``, ``build_model``,
``build_datamodule``), so ``PYTHONPATH=OLD_CHECKOUT/src`` measures an older version (``--no-limits``).
Writes ``OUT.json`` and ``OUT.md`` (default ``benchmarks/results/train_speed``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

MODELS = ("rd", "dmdd", "dskd", "aand")
#: Operator groups of the profile, first match wins: a group's keywords are searched in the operator's name.
OP_GROUPS = {
    "convolution": ("conv",),
    "batch norm": ("batch_norm",),
    "activation": ("hardtanh", "relu", "silu", "sigmoid", "gelu"),
    "matrix multiply": ("aten::mm", "bmm", "addmm", "matmul", "linear"),
    "softmax": ("softmax",),
    "copy and pad": ("copy_", "fill_", "pad", "aten::cat", "clone", "contiguous"),
    "elementwise and reductions": ("aten::",),
}


def _option(text: str) -> tuple[str, object]:
    from distillad.cli import _option as parse

    return parse(text)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _synchronize() -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(call: Callable[[], object], repeats: int = 2) -> float:
    """Seconds of one call after a warm-up call (mean of ``repeats``)."""
    call()
    _synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    _synchronize()
    return (time.perf_counter() - started) / repeats


class GpuBusy:
    """Mean GPU utilisation while running: NVML's share of each sample period in which a kernel ran, read by a
    background thread every ``period`` seconds (``torch.cuda.utilization``)."""

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(torch.cuda.utilization())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> float:
        """Stops sampling; returns the mean utilisation in [0, 1]."""
        self._stop.set()
        self._thread.join()
        return sum(self.samples) / (100 * max(len(self.samples), 1))


def step_parts(module, images: torch.Tensor, paths: list[str]) -> dict[str, float]:
    """Seconds per batch of the frozen and trainable passes of one training step of ``module`` (in train mode)."""
    model = module.model
    model.train()
    name = type(module).__name__
    no_grad = torch.no_grad()
    if name == "DMDD":
        normal, anomalous, masks = module.synthesizer(images, keys=paths)
        pair = torch.cat([normal, anomalous])
        no_grad(model.pair_teacher_features)(normal, anomalous)  # fills the cache the way training does (float32)
        frozen_passes = getattr(module, "frozen_passes", nullcontext)  # the precision training gives these passes
        with frozen_passes():
            frozen = _timed(lambda: model.teacher_features(anomalous))
        trainable = _timed(lambda: sum(module.distillation_losses(normal, anomalous, masks).values()).backward()) - frozen
        if model.msn is not None:
            with no_grad:
                maps = model.distance_maps(pair)
            with frozen_passes():
                frozen += _timed(lambda: no_grad(model.distance_maps)(pair, model.pair_teacher_features(normal, anomalous)))
            pair_masks = torch.cat([torch.zeros_like(masks), masks])
            trainable += _timed(lambda: module.segmentation_loss(*model.msn(maps, pair.shape[-2:]), pair_masks).backward())
        return {"frozen_s": frozen, "trainable_s": trainable}
    with no_grad:
        teacher = model.encode(images)
    if name == "AAND":  # stage 2: the fixed RAA modules on the cached teacher features, then the student
        frozen = _timed(lambda: no_grad(lambda: [o.amplified for o in model.amplify(teacher)])())
        with no_grad:
            features = [o.amplified for o in model.amplify(teacher)]
        trainable = _timed(lambda: module.distillation_loss(features, model.decoder(model.bottleneck(features)))[0].backward())
    elif name == "DSKD":
        frozen = 0.0
        trainable = _timed(lambda: module.loss(teacher, {k: s(teacher) for k, s in model.students.items()}).backward())
    else:
        frozen = 0.0
        trainable = _timed(lambda: module.loss(teacher, model.decoder(model.bottleneck(teacher))).backward())
    return {"frozen_s": frozen, "trainable_s": trainable}


def op_shares(call: Callable[[], object]) -> dict[str, float]:
    """Share of the CPU time of ``call`` spent in each operator group of :data:`OP_GROUPS` (the rest: ``other``)."""
    from torch.profiler import profile

    with profile() as profiler:
        call()
    seconds = dict.fromkeys([*OP_GROUPS, "other"], 0.0)
    for event in profiler.key_averages():
        group = next((g for g, keys in OP_GROUPS.items() if any(k in event.key for k in keys)), "other")
        seconds[group] += event.self_cpu_time_total
    total = sum(seconds.values())
    return {group: value / total for group, value in seconds.items()}


def _mvtec_kind() -> str:
    """The run config's ``kind`` of an MVTec AD folder in the version measured (``mvtec`` before the registry of
    dataset layouts)."""
    return "mvtec_ad" if importlib.util.find_spec("distillad.data.layouts") else "mvtec"


def _time_synthetic_validation() -> list[float]:
    """Seconds of each epoch's synthetic validation (:mod:`distillad.models.validation`), appended to the list
    returned; it stays empty for versions without it."""
    seconds: list[float] = []
    try:
        from distillad.models.validation import SyntheticValidation
    except ImportError:
        return seconds
    score = SyntheticValidation.on_train_epoch_end

    def timed(self, trainer, pl_module) -> None:
        started = time.perf_counter()
        score(self, trainer, pl_module)
        seconds.append(time.perf_counter() - started)

    SyntheticValidation.on_train_epoch_end = timed  # this process trains one cell only
    return seconds


def _epochs_to_train(module, timed_epochs: int) -> int:
    """Epochs to train so that the last ``timed_epochs`` follow a warm-up: one epoch, and for AAND its whole
    stage 1 and stage 2's first epoch, which fills the stage-2 teacher cache (split by ``stage1_epoch_count``)."""
    epochs = timed_epochs + 1
    if type(module).__name__ != "AAND" or module.hparams.stage2_epochs == 0:
        return epochs
    from distillad.models.aand.lightning_model import stage1_epoch_count

    shares = (module.hparams.stage1_epochs, module.hparams.stage2_epochs)
    while epochs - stage1_epoch_count(epochs, *shares) - 1 < timed_epochs:
        epochs += 1
    return epochs


def run_cell(args: argparse.Namespace, model_name: str, precision: str, threads: int, workers: int = 0) -> dict:
    """Train one model in this process and time its epochs (and its parts, unless ``--no-limits``)."""
    import warnings

    warnings.filterwarnings("ignore")
    if importlib.util.find_spec("distillad.memory"):  # as the command line does; older versions had malloc's defaults
        from distillad.memory import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(threads)
    accelerator = args.accelerator
    from lightning.pytorch import Callback, Trainer, seed_everything

    from distillad.pipeline import RunConfig, build_datamodule, build_model

    class EpochTimes(Callback):
        """Epoch start times, and from the first timed epoch on the seconds the loop waits for its next batch
        (from one batch's end, or its epoch's start, to the next batch's start: the DataLoader, with the synthesis
        that runs in its workers, and the copy to the device) and, on a GPU, its utilisation."""

        def __init__(self, first_timed_epoch: int) -> None:
            self.first_timed_epoch = first_timed_epoch
            self.starts: list[float] = []
            self.end = 0.0
            self.loader_wait = 0.0
            self._ready = 0.0
            self.gpu_busy = GpuBusy() if accelerator == "gpu" else None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.starts.append(time.perf_counter())
            self._ready = self.starts[-1]
            if self.gpu_busy is not None and trainer.current_epoch == self.first_timed_epoch:
                self.gpu_busy.start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.current_epoch >= self.first_timed_epoch:
                self.loader_wait += time.perf_counter() - self._ready

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._ready = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            self.end = time.perf_counter()

    validation = _time_synthetic_validation()
    timed_epochs = args.epochs - 1
    seed_everything(0, verbose=False)
    config = RunConfig(model=model_name, model_options=dict(args.option), data={"kind": _mvtec_kind(), "root": args.root,
                                                                 "category": args.category},
                       image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                       num_workers=workers)
    datamodule = build_datamodule(config, train_limit=args.images, test_limit=1)
    datamodule.setup()
    module = build_model(config)
    epochs = _epochs_to_train(module, timed_epochs)
    timer = EpochTimes(first_timed_epoch=epochs - timed_epochs)
    trainer = Trainer(max_epochs=epochs, precision=precision, accelerator=accelerator, devices=1, callbacks=[timer],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                      deterministic="warn", enable_model_summary=False, **module.trainer_arguments)
    trainer.fit(module, datamodule=datamodule)
    images = len(datamodule.train_data)
    seconds = timer.end - timer.starts[-timed_epochs]
    validation_seconds = sum(validation[-timed_epochs:])
    result = {"model": model_name, "precision": precision, "threads": threads, "workers": workers,
              "train_images": images,
              "steps_per_epoch": -(-images // args.batch_size), "epochs_timed": timed_epochs,
              "seconds_per_epoch": seconds / timed_epochs,
              "validation_s_per_epoch": validation_seconds / timed_epochs,
              "images_per_s": images * timed_epochs / seconds, "loader_wait_share": timer.loader_wait / seconds}
    if timer.gpu_busy is not None:
        result["gpu_busy"] = timer.gpu_busy.stop()
    if not args.no_limits:
        device = torch.device("cuda" if accelerator == "gpu" else "cpu")
        module.to(device)  # Lightning hands the module back on the CPU after fit
        batch = next(iter(datamodule.train_dataloader()))
        inputs = module.model_inputs(batch.image.to(device))
        autocast = torch.autocast(device.type, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16,
                                  enabled=precision != "32")
        paths = [str(p) for p in batch.image_path]
        with autocast:
            parts = step_parts(module, inputs, paths)
            if args.profile:
                result["op_shares"] = op_shares(lambda: step_parts(module, inputs, paths))
        limit = parts["frozen_s"] + parts["trainable_s"]
        result.update({**parts, "limit_images_per_s": len(inputs) / limit,
                       "seconds_per_step": (seconds - validation_seconds)
                       / (timed_epochs * result["steps_per_epoch"])})
        result["step_over_limit"] = result["seconds_per_step"] / limit
    return result


def _cell_process(args: argparse.Namespace, model: str, precision: str, threads: int, workers: int, queue) -> None:
    try:
        queue.put(run_cell(args, model, precision, threads, workers))
    except Exception as error:  # one failing cell is reported, the others go on
        queue.put({"model": model, "precision": precision, "threads": threads, "workers": workers,
                   "error": f"{type(error).__name__}: {error}"})


def _gpu_name(args: argparse.Namespace) -> str:
    return f" and one {torch.cuda.get_device_name()}" if args.accelerator == "gpu" else ""


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# Training speed ({args.label})", "",
             f"{args.category} from {args.root}, tf_efficientnet_lite0, {args.image_size} px, batch {args.batch_size}, "
             f"{rows[0].get('train_images', '?')} training images, the last {args.epochs - 1} epochs timed after a warm-up epoch "
             f"(AAND: after its stage 1 and stage 2's first epoch); "
             f"one process per cell on {os.cpu_count()} CPU cores{_gpu_name(args)}, nothing else running.", "",
             "| model | precision | threads | workers | train images/s | loader wait % | GPU busy % | validation s/epoch | "
             "s/step | frozen s/batch | trainable s/batch | limit images/s | step / limit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def number(row: dict, key: str, digits: int = 2, scale: float = 1) -> str:
        return f"{scale * row[key]:.{digits}f}" if key in row else "-"

    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['precision']} | {row['threads']} | {row.get('workers', 0)} | "
                         f"failed: {row['error']} ||||||||| ")
            continue
        lines.append(f"| {row['model']} | {row['precision']} | {row['threads']} | {row.get('workers', 0)} | "
                     f"{number(row, 'images_per_s')} | {number(row, 'loader_wait_share', 1, 100)} | "
                     f"{number(row, 'gpu_busy', 1, 100)} | {number(row, 'validation_s_per_epoch')} | "
                     f"{number(row, 'seconds_per_step')} | {number(row, 'frozen_s')} | {number(row, 'trainable_s')} | "
                     f"{number(row, 'limit_images_per_s')} | {number(row, 'step_over_limit')} |")
    lines += ["", "frozen / trainable: one batch's no-grad passes left after the teacher-feature cache / forward + "
              "backward of what trains (DMDD: the teacher on the anomalous twins and the MSN epoch's no-grad pass "
              "are frozen, the distillation and MSN steps trainable; AAND: stage 2). limit = batch / (frozen + "
              "trainable). train images/s counts everything an epoch does, the per-epoch synthetic validation included; s/step "
              "and step / limit leave that validation out (it scores the held-out images once an epoch, whatever the "
              "number of steps, so it weighs most on small datasets: here 2 steps an epoch). loader wait: share of "
              "the timed epochs the loop spent waiting for its next batch (DataLoader, synthesis in its workers, copy "
              "to the device); GPU busy: NVML's utilisation over the timed epochs, sampled every 0.1 s."]
    profiled = [row for row in rows if "op_shares" in row]
    if profiled:
        groups = [*OP_GROUPS, "other"]
        lines += ["", "## Where the step's time goes", "",
                  "Share (%) of the CPU time of the frozen and trainable passes above (each run 3 times), by operator "
                  "group (`torch.profiler`, self time).", "",
                  f"| model | precision | threads | {' | '.join(groups)} |", "|---|---|---|" + "---|" * len(groups)]
        lines += [f"| {row['model']} | {row['precision']} | {row['threads']} | "
                  + " | ".join(f"{100 * row['op_shares'][g]:.1f}" for g in groups) + " |" for row in profiled]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_names, default=list(MODELS))
    parser.add_argument("--precisions", type=_names, default=["32", "bf16-mixed"])
    parser.add_argument("--threads", type=lambda text: [int(t) for t in _names(text)], default=[1, 2])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--category", default="mtd")
    parser.add_argument("--images", type=int, default=36, help="training-image limit (10%% are held out)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-workers", type=lambda text: [int(t) for t in _names(text)], default=[0],
                        help="DataLoader workers per cell (comma-separated: one cell each); they run the synthesis")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="model option for every cell, repeatable (e.g. bf16_frozen_passes=True)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                        help="where to train (gpu: one CUDA device; also reports its utilisation)")
    parser.add_argument("--no-limits", action="store_true", help="skip timing the parts (for older versions)")
    parser.add_argument("--profile", action="store_true", help="also break the step's passes down by operator group")
    parser.add_argument("--label", default="after")
    parser.add_argument("--quick", action="store_true", help="64 px, 10 images, batch 4: a check that it runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_speed")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.images, args.batch_size = 64, 10, 4
    context = multiprocessing.get_context("spawn")
    rows = []
    for model in args.models:
        for precision in args.precisions:
            for threads in args.threads:
                for workers in args.num_workers:
                    queue = context.Queue()
                    process = context.Process(target=_cell_process,
                                              args=(args, model, precision, threads, workers, queue))
                    process.start()
                    row = queue.get()
                    process.join()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"label": args.label, "settings": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
