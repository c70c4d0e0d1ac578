"""Export a trained run to ONNX, OpenVINO IR or a ``torch.export`` program, checked against PyTorch.

What is exported is the run's torch model (``module.model``) behind :class:`ExportWrapper`: the graph
takes float32 RGB images in [0, 1] of shape (B, 3, S, S), B dynamic, and returns ``anomaly_map``
(B, 1, S, S) and ``pred_score`` (B,). Encoders normalise inside the model, so no pre-processing is left
outside the graph but the resize to S x S; thresholding and normalisation stay outside, driven by the
run's calibration in ``metadata.json`` (see :mod:`distillad.runtime` for the folder layout).

Formats: ``onnx`` (``torch.onnx.export`` with the dynamo exporter, opset 18, weights inside the file
below 2 GB), ``openvino`` (that ONNX graph through ``openvino.convert_model``, saved in FP32) and
``torch`` (the ``torch.export`` program as ``.pt2``: loading it needs torch only, not Lightning, anomalib
or distillad's classes; TorchScript is no option, see below). All formats come from one
``torch.export`` trace, so :func:`export_formats` traces once for several formats.

Parity: after writing a format, the file is loaded into its runtime and run on real images (up to
:data:`PARITY_IMAGES` of the run's test images, or the images given), as one batch and as a batch of
one; the largest absolute difference to PyTorch of the anomaly maps and of the scores, each divided by
its output's scale ``max(1, max |PyTorch output|)``, must be at most :data:`TOLERANCE`, otherwise
:class:`~distillad.errors.DistilladError` is raised and the folder's ``metadata.json`` is removed. For
outputs within [-1, 1] (rd, dmdd, aand) this is an absolute 1e-4. The scale matters for DSKD, whose
maps are z-scores (divided by the normal-image standard deviation, Eq. 8), which magnifies float32
rounding: a DSKD trained for 2 epochs on mtd at 256 px differed by 1.2e-4 in absolute terms on maps
reaching 7.6, i.e. 1.6e-5 of the scale (even its ``torch.export`` program, run by torch itself, differs from
eager PyTorch by 7.7e-5). The absolute and scaled differences are both recorded in
``metadata.json``.

Why not anomalib's ``ExportMixin`` (``to_torch``/``to_onnx``/``to_openvino``; tried on anomalib 2.7,
torch 2.14 with all four models):

- ``to_torch`` pickles the whole Lightning module (``torch.save({"model": self})``); loading it needs
  Lightning, anomalib and distillad's classes, which is what a deployment wants to avoid.
- ``to_onnx`` exports ``AnomalibModule.forward``, i.e. the pre-processor (here a resize to S x S) and
  post-processor around the model, with the output names and order of anomalib's ``InferenceBatch``
  (``pred_score`` first) and no way to name them (it passes ``output_names`` itself). Its batch axis is
  dynamic and its maps matched PyTorch to 1.4e-6 for rd, dmdd and aand, but it asks for opset 14, which
  the ONNX version converter cannot reach from the dynamo graph (it logs "No Adapter To Version $17 for
  Pad" and leaves opset 18).
- ``to_openvino`` is ``to_onnx`` followed by ``openvino.convert_model``, with the same limits.
- For dskd every graph export failed, anomalib's included: DSKD keeps its students in a ``ModuleDict``
  under ``"local"`` and ``"global"``, and ``global`` is a Python keyword, so the code that torch.export
  (and TorchScript) generate, ``self.students.global``, does not compile. The exporter here exports a
  copy whose keyword-named submodules are renamed (``global_``, :func:`keyword_safe_copy`); the parity
  check shows that the copy computes the same.

So this module traces ``module.model`` with ``torch.export`` itself and hands the program to the same
dynamo ONNX exporter and OpenVINO converter that anomalib uses. OpenVINO's own PyTorch frontend is no
shortcut: it has no conversion for ``aten::cosine_similarity``. FX stack-trace recording is switched off
while tracing (``torch.fx.config.do_not_emit_stack_traces``): it only serves debugging and took about a
third of the ONNX export time (21 s -> 14 s for rd at 64 px on one thread).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import keyword
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distillad.errors import DistilladError
from distillad.inference import ImageFiles, collate, expand_inputs
from distillad.pipeline import RunConfig, load_model, versions
from distillad.runtime import INPUT_NAME, METADATA_FILE, MODEL_FILES, OUTPUT_NAMES, load_exported, require
from distillad.storage import write_json

FORMATS = tuple(MODEL_FILES)
#: Largest difference to PyTorch allowed for the anomaly maps and the scores, as a share of max(1, max |output|).
TOLERANCE = 1e-4
#: Real images the parity check runs on.
PARITY_IMAGES = 8
_ONNX_SIZE_LIMIT = 2**31  # protobuf's limit; larger models keep their weights in model.onnx.data


class ExportWrapper(nn.Module):
    """A distillad torch model as an export graph: images in [0, 1] -> ``(anomaly_map, pred_score)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (B, 1, S, S) and scores (B,) of images (B, 3, S, S)."""
        output = self.model(images)
        return output.anomaly_map, output.pred_score


def keyword_safe_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode whose submodules named like Python keywords get a trailing ``_``.

    Generated graph code refers to submodules by attribute (``self.students.global``), which does not
    compile for keywords; see the module docstring. The order of the submodules is kept.
    """
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if any(keyword.iskeyword(name) for name in module._modules):
            module._modules = {f"{name}_" if keyword.iskeyword(name) else name: child
                               for name, child in module._modules.items()}
    return model


@contextlib.contextmanager
def _without_stack_traces() -> Iterator[None]:
    previous = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = previous


def _check_formats(formats: Sequence[str]) -> None:
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        msg = f"unknown export format '{', '.join(unknown) or '(none)'}'; choose from {', '.join(FORMATS)}"
        raise DistilladError(msg)
    if any(fmt in ("onnx", "openvino") for fmt in formats):
        for module_name in ("onnx", "onnxscript"):
            try:
                __import__(module_name)
            except ImportError as error:
                msg = (f"exporting to ONNX or OpenVINO needs the '{module_name}' package, which is not installed; "
                       "run 'pip install onnx onnxscript' (or 'pip install distillad[export]')")
                raise DistilladError(msg) from error
    for fmt in formats:
        require(fmt)


def _package_versions() -> dict[str, str]:
    found = {}
    for name in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = package_version(name)
    return found


def _write_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in program.state_dict.values())
    torch.onnx.export(program, f=str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                      external_data=weight_bytes >= _ONNX_SIZE_LIMIT, verbose=False)


def _write_openvino(onnx_path: Path, path: Path) -> None:
    openvino = require("openvino")
    openvino.save_model(openvino.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)


def _parity(folder: Path, images: torch.Tensor, reference: tuple[np.ndarray, np.ndarray], threads: int | None) -> dict:
    """Largest absolute differences between the exported model in ``folder`` and PyTorch's ``reference`` outputs."""
    reference_maps, reference_scores = reference
    exported = load_exported(folder, threads)
    maps, scores = exported(images.numpy())
    single_maps, single_scores = exported(images[:1].numpy())
    map_difference = max(abs(maps - reference_maps).max(), abs(single_maps - reference_maps[:1]).max())
    score_difference = max(abs(scores - reference_scores).max(), abs(single_scores - reference_scores[:1]).max())
    map_scale, score_scale = max(1.0, float(abs(reference_maps).max())), max(1.0, float(abs(reference_scores).max()))
    return {"images": len(images), "batch_sizes": [len(images), 1], "tolerance": TOLERANCE,
            "max_abs_anomaly_map": float(map_difference), "max_abs_pred_score": float(score_difference),
            "anomaly_map_scale": map_scale, "pred_score_scale": score_scale,
            "max_scaled_difference": float(max(map_difference / map_scale, score_difference / score_scale))}


def export_model(model: nn.Module, image_size: int, out_dirs: dict[str, Path], images: torch.Tensor,
                 metadata: dict, threads: int | None = None) -> dict[str, Path]:
    """Export a distillad torch model (``module.model``) to each format in ``out_dirs`` and check parity.

    Args:
        model: The torch model; its eval forward returns an ``InferenceBatch``.
        image_size: Side S of the square input.
        out_dirs: Output folder per format; each receives the model file(s) and ``metadata.json``.
        images: Real images (N, 3, S, S) in [0, 1] for the parity check.
        metadata: Entries for ``metadata.json`` (model, backbone, calibration, ...), stored with the
            format, file, input/output description, versions and parity numbers.
        threads: Runtime threads of the parity check (``None``: the runtime's default).

    Returns:
        The model file of each format.
    """
    _check_formats(list(out_dirs))
    wrapper = ExportWrapper(keyword_safe_copy(model)).eval()
    example = torch.full((2, 3, image_size, image_size), 0.5)  # size 1 would be specialised, not dynamic
    files = {}
    with _without_stack_traces(), tempfile.TemporaryDirectory() as scratch:
        with torch.no_grad():
            # Eager first: a cache filled while tracing (AAND's position encodings) would keep traced tensors.
            reference = tuple(tensor.numpy() for tensor in wrapper(images))
            program = torch.export.export(wrapper, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        onnx_path = None
        for fmt in sorted(out_dirs, key=lambda name: name != "onnx"):  # onnx first: openvino converts its file
            folder = Path(out_dirs[fmt])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / METADATA_FILE).unlink(missing_ok=True)
            path = folder / MODEL_FILES[fmt]
            if fmt == "torch":
                torch.export.save(program, str(path))
            elif fmt == "onnx":
                _write_onnx(program, path)
                onnx_path = path
            else:
                if onnx_path is None:
                    onnx_path = Path(scratch) / MODEL_FILES["onnx"]
                    _write_onnx(program, onnx_path)
                _write_openvino(onnx_path, path)
            files[fmt] = path
            _write_metadata(folder, fmt, image_size, metadata, parity=None)
            parity = _parity(folder, images, reference, threads)
            worst = parity["max_scaled_difference"]
            if not worst <= TOLERANCE:
                (folder / METADATA_FILE).unlink()
                msg = (f"{fmt} export in {folder} differs from PyTorch by {worst:.2e} of the output scale (> {TOLERANCE:g}) on "
                       f"{len(images)} images, so its {METADATA_FILE} was removed; use another format and report "
                       f"this with the model ({metadata.get('model')}) and package versions")
                raise DistilladError(msg)
            _write_metadata(folder, fmt, image_size, metadata, parity)
    return files


def _write_metadata(folder: Path, fmt: str, image_size: int, metadata: dict, parity: dict | None) -> None:
    content = {
        "format": fmt,
        "file": MODEL_FILES[fmt],
        **metadata,
        "image_size": image_size,
        "inputs": {INPUT_NAME: {"shape": ["batch", 3, image_size, image_size], "dtype": "float32",
                                "content": "RGB in [0, 1], resized to image_size x image_size with antialiasing"}},
        "outputs": {OUTPUT_NAMES[0]: {"shape": ["batch", 1, image_size, image_size], "dtype": "float32"},
                    OUTPUT_NAMES[1]: {"shape": ["batch"], "dtype": "float32"}},
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {**versions(), **_package_versions()},
        "parity": parity,
    }
    write_json(folder / METADATA_FILE, content)


def parity_images(run_dir: Path, config: RunConfig, images: Sequence[str | Path] | None = None) -> torch.Tensor:
    """Up to :data:`PARITY_IMAGES` readable images: from ``images`` (files or folders) if given, else spread
    over the run's test images (``RUN/test_scores.csv``), resized as ``predict`` resizes them."""
    if images:
        paths, source = expand_inputs(list(images)), "the images given"
    else:
        scores_file = Path(run_dir) / "test_scores.csv"
        listed = []
        if scores_file.is_file():
            with scores_file.open(newline="") as handle:
                listed = [Path(row["path"]) for row in csv.DictReader(handle)]
        paths, source = [path for path in listed if path.is_file()], str(scores_file)
    paths = paths[:: max(1, len(paths) // PARITY_IMAGES)]
    dataset = ImageFiles(paths, config.image_size)
    items = [item for item in (dataset[index] for index in range(len(dataset))) if item[1] is not None]
    if not items:
        msg = f"no readable images for the parity check in {source}; pass a few of the run's kind of images with --images"
        raise DistilladError(msg)
    return collate(items[:PARITY_IMAGES])[1]


def _run_metadata(run_dir: Path, config: RunConfig) -> dict:
    return {"model": config.model, "backbone": config.backbone, "model_options": config.model_options,
            "threshold": config.threshold, "score_floor": config.score_floor, "map_range": list(config.map_range),
            "false_alarm_rate": config.false_alarm_rate, "calibration_images": config.calibration_images,
            "run": str(Path(run_dir).resolve())}


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it, so a bad ``--out`` fails before the slow trace (after the
    run loaded, so a run that cannot be exported leaves no folder behind)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        msg = f"cannot write the export folder {folder} ({error.strerror or error}); pass a writable folder with --out"
        raise DistilladError(msg) from error


def _export_run(run_dir: str | Path, out_dirs: dict[str, Path], images: Sequence[str | Path] | None,
                threads: int | None) -> dict[str, Path]:
    _check_formats(list(out_dirs))
    module, config = load_model(Path(run_dir))
    for folder in out_dirs.values():
        _check_writable(Path(folder))
    return export_model(module.model, config.image_size, out_dirs, parity_images(run_dir, config, images),
                        _run_metadata(run_dir, config), threads)


def export_formats(run_dir: str | Path, formats: Sequence[str], out_root: str | Path | None = None,
                   images: Sequence[str | Path] | None = None, threads: int | None = None) -> dict[str, Path]:
    """Export a run to several formats from one trace; format F goes to ``OUT_ROOT/F`` (default ``RUN/export/F``).

    Returns the model file of each format; see :func:`export_model` for the parity check.
    """
    root = Path(out_root) if out_root is not None else Path(run_dir) / "export"
    return _export_run(run_dir, {fmt: root / fmt for fmt in formats}, images, threads)


def export_run(run_dir: str | Path, fmt: str, out_dir: str | Path | None = None,
               images: Sequence[str | Path] | None = None, threads: int | None = None) -> Path:
    """Export a run to ``fmt`` (``onnx``, ``openvino`` or ``torch``) in ``out_dir`` (default ``RUN/export/FMT``).

    Writes the model file and ``metadata.json`` and returns the model file's path; raises
    :class:`~distillad.errors.DistilladError` when the export differs from PyTorch by more than :data:`TOLERANCE`.
    """
    folder = Path(out_dir) if out_dir is not None else Path(run_dir) / "export" / fmt
    return _export_run(run_dir, {fmt: folder}, images, threads)[fmt]
