"""distillad: fit, test and predict with knowledge-distillation anomaly detectors.

Errors a user can fix print one line (``distillad: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import warnings
from pathlib import Path

from distillad.errors import DistilladError
from distillad.memory import retain_freed_memory
from distillad.runtime import MODEL_FILES as EXPORT_FORMATS
from distillad.training import ACCELERATORS, PRECISIONS, STRATEGIES

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DATASET_HELP = ("layout of --root: mvtec_ad (default), mpdd, btad, mvtec_loco (sPRO), mvtec_ad2, visa (its 1cls split), "
                "realiad, kolektor; or folder (--normal-dir ...); see README")
DEFAULT_IMAGE_SIZE = 256
DEFAULT_BATCH_SIZE = 16
DEFAULT_FIT_EPOCHS = 10
DEFAULT_BENCHMARK_EPOCHS = 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        msg = f"must be a positive integer, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _image_size(text: str) -> int:
    value = int(text)
    if value < 32 or value % 32:
        msg = f"must be a multiple of 32 and at least 32 (the encoders downsample by 32), got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        msg = f"must be a number in [0, 1), got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        msg = f"expected KEY=VALUE, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip().replace("-", "_"), value


def _name_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        msg = f"expected a comma-separated list of names, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return names


def _model_option(text: str) -> tuple[str, tuple[str, object]]:
    model, separator, assignment = text.partition(":")
    if not separator:
        msg = f"expected MODEL:KEY=VALUE, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return model.strip(), _option(assignment)


class _OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes print one line naming the option and exit 2 (``--help`` still shows everything)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_training_options(parser: argparse.ArgumentParser, default_epochs: int) -> None:
    """Encoder, input size, schedule and subset options that ``fit`` and ``benchmark`` share.

    Unset values stay ``None`` so that ``fit --preset`` can fill them; the defaults in the help are applied
    after parsing.
    """
    parser.add_argument("--backbone", help=f"timm encoder name (default: {DEFAULT_BACKBONE}, works offline)")
    parser.add_argument("--no-pretrained", action="store_true", help="random encoder weights (for comparisons only)")
    parser.add_argument("--image-size", type=_image_size, help=f"square input size in pixels (default: {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--epochs", type=_positive_int, help=f"training epochs (default: {default_epochs})")
    parser.add_argument("--batch-size", type=_positive_int,
                        help=f"training and evaluation batch size (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--max-steps", type=_positive_int,
                        help="train for this many optimiser steps instead of --epochs (the same amount of training "
                             "on small and large datasets)")
    parser.add_argument("--precision", choices=PRECISIONS, default="32",
                        help="training precision (default: 32; bf16-mixed / 16-mixed use autocast; inference stays 32)")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="training device kind (default: auto)")
    parser.add_argument("--devices", type=_positive_int, default=1,
                        help="devices (GPUs, or CPU processes) to train on; needs --strategy ddp above 1 (default: 1)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto",
                        help="'ddp': distributed data parallel over --devices; --batch-size is the total (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; runs are deterministic on CPU (default: 0)")
    parser.add_argument("--train-limit", type=_positive_int, help="use only this many training images (quick runs)")
    parser.add_argument("--test-limit", type=_positive_int, help="use only this many test images (quick runs)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from distillad.models.registry import MODELS

    parser = _OneLineErrorParser(prog="distillad", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrorParser)

    fit = commands.add_parser("fit", help="train a model on normal images, then test it on the test split",
                              description="Train on a category's normal images, calibrate the decision threshold "
                                          "on held-out normal images, test, and write the run directory.")
    fit.add_argument("--model", default="rd", choices=sorted(MODELS), help="method to train (default: rd)")
    source = fit.add_argument_group("data (a dataset: --root and --category; or a plain folder: --normal-dir)")
    source.add_argument("--root", type=Path, help="dataset root, as its authors distribute it (see --dataset)")
    source.add_argument("--dataset", default="mvtec_ad", help=DATASET_HELP)
    source.add_argument("--category", type=_name_list,
                        help="category under --root; a comma list or 'all' trains one run per category in OUT/<category>")
    source.add_argument("--normal-dir", type=Path, help="folder of normal training images (instead of --root)")
    source.add_argument("--abnormal-dir", type=Path, help="folder of anomalous test images (with --normal-dir)")
    source.add_argument("--mask-dir", type=Path, help="masks for --abnormal-dir, paired by stem (<stem>_mask.png)")
    source.add_argument("--normal-test-dir", type=Path, help="folder of normal test images (with --normal-dir)")
    fit.add_argument("--preset", choices=["paper"], help="'paper': the paper's backbone, image size and epochs")
    _add_training_options(fit, DEFAULT_FIT_EPOCHS)
    calibration = fit.add_argument_group(
        "decision threshold (the (1 - false-alarm rate) quantile of held-out normal image scores; see README)")
    calibration.add_argument("--false-alarm-rate", type=_fraction, default=0.01,
                             help="share of normal images the threshold may flag (default: 0.01)")
    calibration.add_argument("--val-split-ratio", type=_fraction, default=0.1,
                             help="share of the normal training images held out from training to calibrate the "
                                  "threshold (default: 0.1)")
    calibration.add_argument("--calibration-dir", type=Path,
                             help="extra normal images (never trained on) to calibrate the threshold with")
    fit.add_argument("--weights", type=Path, help="explicit encoder weights file (state_dict)")
    fit.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    fit.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                     help="model option, repeatable (e.g. --option lr=0.001); 'distillad models' lists them")
    fit.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory (default: runs/latest)")
    replace = fit.add_mutually_exclusive_group()
    replace.add_argument("--resume", action="store_true",
                         help="continue the run in --out (same settings) from RUN/checkpoints/last.ckpt if present")
    replace.add_argument("--overwrite", action="store_true",
                         help="replace the run in --out (a folder that holds a run is refused otherwise)")
    fit.add_argument("--no-heatmaps", action="store_true", help="do not write heatmap overlays of test images")

    test = commands.add_parser("test", help="re-evaluate a saved run on its test split")
    test.add_argument("--run", type=Path, required=True, help="run directory written by 'distillad fit'")
    test.add_argument("--no-heatmaps", action="store_true", help="do not write heatmap overlays")

    predict = commands.add_parser("predict", help="score images with a trained run or an exported model",
                                  description="Writes OUT/predictions.csv (path, score, normalized_score, is_anomalous, "
                                              "error) row by row and OUT/heatmaps/*.png. is_anomalous uses the threshold "
                                              "calibrated at fit time (the 99th percentile of held-out normal scores by default, "
                                              "see fit --false-alarm-rate); "
                                              "normalized_score maps it to 0.5 (empty for runs saved without a score floor). "
                                              "--exported runs an export folder in its runtime instead of the PyTorch "
                                              "checkpoint (no Lightning module involved).")
    model_source = predict.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--run", type=Path, help="run directory written by 'distillad fit' (PyTorch)")
    model_source.add_argument("--exported", type=Path, metavar="DIR",
                              help="export folder written by 'distillad export' (e.g. RUN/export/onnx): ONNX Runtime, "
                                   "OpenVINO or torch.export, as its metadata.json says")
    predict.add_argument("--input", type=Path, nargs="+", required=True, help="image files and/or folders")
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    predict.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (default: 16)")
    predict.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    predict.add_argument("--component-maps", action="store_true",
                         help="also save the per-stage, per-branch maps (DMDD: 4 NGM + 4 AIM) as OUT/components/*.png")
    predict.add_argument("--no-heatmaps", action="store_true", help="do not write heatmap overlays (faster)")
    predict.add_argument("--threads", type=_positive_int, help="inference threads (default: the runtime's, all cores)")

    export = commands.add_parser("export", help="export a run to ONNX, OpenVINO or torch.export, checked against PyTorch",
                                 description="Writes OUT/FORMAT/ for each --format: the model file and metadata.json "
                                             "(the run's threshold and normalisation, input/output names, versions and "
                                             "the measured parity). Fails if the exported model differs from PyTorch "
                                             "by more than 1e-4 (of the output's scale when it exceeds 1) on real "
                                             "images. Run it with 'distillad predict --exported OUT/FORMAT' or "
                                             "distillad.runtime.load_exported.")
    export.add_argument("--run", type=Path, required=True, help="run directory written by 'distillad fit'")
    export.add_argument("--format", dest="formats", nargs="+", required=True, choices=sorted(EXPORT_FORMATS),
                        help="one or more formats; several share one trace")
    export.add_argument("--out", type=Path, help="output folder (default: RUN/export)")
    export.add_argument("--images", type=Path, nargs="+",
                        help="images or folders for the parity check (default: up to 8 of the run's test images)")
    export.add_argument("--threads", type=_positive_int, help="runtime threads of the parity check (default: all cores)")

    bench = commands.add_parser("benchmark", help="train and test models on categories; tables and plots like the papers'",
                                description="Trains and tests every model on every category (one process per cell), "
                                            "then writes OUT/results.json|csv|md and OUT/plots/*.png. A rerun with the "
                                            "same --out skips finished cells; a failing cell is reported, the others go on.")
    bench.add_argument("--models", type=_name_list, default=["rd"], help="comma-separated models (default: rd)")
    bench.add_argument("--peers", type=_name_list, default=[],
                       help="anomalib models to run beside them on the same data and encoder: patchcore, padim")
    bench.add_argument("--root", type=Path, required=True, help="dataset root, as its authors distribute it")
    bench.add_argument("--dataset", default="mvtec_ad", help=DATASET_HELP)
    bench.add_argument("--categories", type=_name_list, required=True,
                       help="comma-separated categories under --root, or 'all'")
    _add_training_options(bench, DEFAULT_BENCHMARK_EPOCHS)
    bench.add_argument("--preset", choices=["paper"],
                       help="'paper': every model with its paper's backbone, image size, batch size and epochs")
    bench.add_argument("--option", type=_model_option, action="append", default=[], metavar="MODEL:KEY=VALUE",
                       help="option for one model, repeatable (e.g. dmdd:msn=False)")
    bench.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="output folder (default: runs/benchmark)")
    bench.add_argument("--no-plots", action="store_true", help="skip the ROC/PRO/example figures")

    commands.add_parser("models", help="list models and their options")
    return parser


def _fit_config(args: argparse.Namespace, category: str | None = None):
    from distillad.models.registry import MODELS
    from distillad.pipeline import RunConfig

    if args.dataset == "folder" and args.normal_dir is None:
        raise DistilladError("--dataset folder reads plain folders: pass --normal-dir DIR (and --abnormal-dir, "
                             "--mask-dir, --normal-test-dir) instead of --root")
    if args.normal_dir is not None:
        if args.root is not None:
            raise DistilladError("give either --root/--category or --normal-dir, not both")
        data = {"kind": "folder", "normal_dir": str(args.normal_dir),
                **{key: str(value) for key in ("abnormal_dir", "mask_dir", "normal_test_dir")
                   if (value := getattr(args, key)) is not None}}
    elif args.root is not None and category:
        data = {"kind": args.dataset, "root": str(args.root), "category": category}
    else:
        raise DistilladError("no data given; pass --root DIR --category NAME (MVTec layout) or --normal-dir DIR")
    preset = MODELS[args.model].paper if args.preset == "paper" else {}
    return RunConfig(
        model=args.model,
        model_options=dict(args.option),
        data=data,
        backbone=args.backbone or preset.get("backbone", DEFAULT_BACKBONE),
        pretrained=not args.no_pretrained,
        weights=str(args.weights) if args.weights else None,
        image_size=args.image_size or preset.get("image_size", DEFAULT_IMAGE_SIZE),
        epochs=args.epochs or preset.get("epochs", DEFAULT_FIT_EPOCHS),
        batch_size=args.batch_size or preset.get("batch_size", DEFAULT_BATCH_SIZE),
        seed=args.seed,
        num_workers=args.num_workers,
        val_split_ratio=args.val_split_ratio,
        false_alarm_rate=args.false_alarm_rate,
        calibration_dir=str(args.calibration_dir) if args.calibration_dir else None,
        **_trainer_settings(args),
    )


def _fit(args: argparse.Namespace, pipeline) -> None:
    """One run in ``--out``; or, for several categories (a comma list or ``all``), one run per category in
    ``OUT/<category>`` and ``OUT/categories.{json,md}`` with their metrics and the mean. A category that fails
    is reported; the others go on."""
    categories = [None]
    if args.normal_dir is None and args.root is not None and args.category and args.dataset != "folder":
        from distillad.data.layouts import resolve_categories

        categories = resolve_categories(args.dataset, args.root, args.category)

    def fit_one(category: str | None, out: Path) -> dict:
        return pipeline.fit(_fit_config(args, category), out, resume=args.resume, train_limit=args.train_limit,
                            test_limit=args.test_limit, heatmaps=not args.no_heatmaps, overwrite=args.overwrite)

    if len(categories) == 1:
        print(json.dumps(fit_one(categories[0], args.out), indent=2))
        print(f"run written to {args.out}")
        return
    rows = []
    for category in categories:
        print(f"[{category}] training into {args.out / category}", file=sys.stderr)
        try:
            metrics = fit_one(category, args.out / category)
            rows.append({"category": category, **{key: value for key, value in metrics.items()
                                                   if isinstance(value, int | float) and not isinstance(value, bool)}})
        except DistilladError as error:
            print(f"[{category}] failed: {error}", file=sys.stderr)
            rows.append({"category": category, "error": str(error)})
    table = pipeline.write_category_summary(rows, args.out)
    print(table)
    failed = [row["category"] for row in rows if "error" in row]
    if failed:
        raise DistilladError(f"{len(failed)} of {len(rows)} categories failed ({', '.join(failed)}); see "
                             f"{args.out / 'categories.md'}, fix the cause and rerun with --resume")


def _trainer_settings(args: argparse.Namespace) -> dict:
    """How ``fit`` and ``benchmark`` train: schedule in steps, precision and devices."""
    return {"max_steps": args.max_steps, "precision": args.precision, "accelerator": args.accelerator,
            "devices": args.devices, "strategy": args.strategy}


def _benchmark(args: argparse.Namespace) -> None:
    from distillad.benchmark import BenchmarkSettings, run_benchmark
    from distillad.models.registry import MODELS, check_model_options

    options: dict[str, dict] = {}
    for model, (key, value) in args.option:
        if model not in args.models:
            raise DistilladError(f"--option {model}:{key}=... names a model not in --models ({','.join(args.models)})")
        options.setdefault(model, {})[key] = value
    for model, model_options in options.items():
        if model in MODELS:
            check_model_options(model, model_options)
    from distillad.data.layouts import resolve_categories

    categories = resolve_categories(args.dataset, args.root, args.categories)
    settings = BenchmarkSettings(root=str(args.root), dataset=args.dataset, backbone=args.backbone or DEFAULT_BACKBONE,
                                 pretrained=not args.no_pretrained, image_size=args.image_size or DEFAULT_IMAGE_SIZE,
                                 epochs=args.epochs or DEFAULT_BENCHMARK_EPOCHS,
                                 batch_size=args.batch_size or DEFAULT_BATCH_SIZE, seed=args.seed,
                                 train_limit=args.train_limit, test_limit=args.test_limit, options=options,
                                 preset=args.preset,
                                 **_trainer_settings(args))
    from distillad.peers import PEERS

    unknown = [peer for peer in args.peers if peer not in PEERS]
    if unknown:
        raise DistilladError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(sorted(PEERS))}")
    models = [*args.models, *(peer for peer in args.peers if peer not in args.models)]
    rows = run_benchmark(settings, models, categories, args.out, plots=not args.no_plots)
    print((args.out / "results.md").read_text())
    failed = [f"{row['category']}/{row['model']}" for row in rows if "error" in row]
    if failed:
        raise DistilladError(f"{len(failed)} cell(s) failed ({', '.join(failed)}); see {args.out / 'results.md'}, "
                             "fix the cause and rerun the same command to retry only those")


def _predict(args: argparse.Namespace) -> None:
    if args.exported is not None:
        from distillad.inference import predict_exported

        if args.component_maps:
            raise DistilladError("--component-maps needs the PyTorch model (--run RUN); exported models give the fused map only")
        summary = predict_exported(args.exported, args.input, args.out, args.batch_size, args.num_workers,
                                            heatmaps=not args.no_heatmaps, threads=args.threads)
    else:
        from distillad import pipeline

        summary = pipeline.predict(args.run, args.input, args.out, args.batch_size, args.num_workers,
                                   args.component_maps, heatmaps=not args.no_heatmaps, threads=args.threads)
    basis = f" (threshold from {summary.calibration_images} normal images)" if summary.calibration_images else ""
    print(f"{summary.images} images, {summary.anomalous} anomalous{basis}, {summary.unreadable} unreadable; "
          f"see {summary.csv_path}")


def _export(args: argparse.Namespace) -> None:
    from distillad.export import export_formats

    files = export_formats(args.run, args.formats, args.out, args.images, args.threads)
    for fmt, path in files.items():
        parity = json.loads((path.parent / "metadata.json").read_text())["parity"]
        print(f"{fmt}: {path} (max |difference| to PyTorch on {parity['images']} images: anomaly map "
              f"{parity['max_abs_anomaly_map']:.1e}, score {parity['max_abs_pred_score']:.1e})")


def _list_models() -> None:
    from distillad.models.registry import MODELS, get_model_class, model_options

    for name in sorted(MODELS):
        options = model_options(get_model_class(name))
        print(f"{name}: " + ", ".join(f"{key}={param.default!r}" for key, param in options.items()))


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command in ("fit", "test"):
        from distillad import pipeline  # Lightning loads only for the commands that need it
    if args.command == "fit":
        _fit(args, pipeline)
    elif args.command == "test":
        print(json.dumps(pipeline.test(args.run, heatmaps=not args.no_heatmaps), indent=2))
    elif args.command == "predict":
        _predict(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "benchmark":
        _benchmark(args)
    else:
        _list_models()
    return 0


#: What to tell a user who pressed Ctrl-C, by command: training keeps its checkpoints, benchmarks their cells.
INTERRUPTED_HINTS = {
    "fit": "rerun the same 'distillad fit' command with --resume to continue from the last checkpoint",
    "benchmark": "rerun the same 'distillad benchmark' command to finish the remaining cells",
    "predict": "predictions.csv was left as it was; rerun the same command",
}


def _command(argv: list[str]) -> str | None:
    return next((word for word in argv if not word.startswith("-")), None)


def main() -> None:
    """Console entry point: one-line errors instead of tracebacks for user mistakes."""
    # Deprecation notices inside timm and anomalib are for their developers, not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    retain_freed_memory()
    try:
        sys.exit(run())
    except DistilladError as error:
        print(f"distillad: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"distillad: interrupted; {INTERRUPTED_HINTS.get(_command(sys.argv[1:]), 'nothing was lost')}",
              file=sys.stderr)
        sys.exit(130)

