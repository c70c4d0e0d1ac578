"""Run an exported distillad model with ONNX Runtime, OpenVINO or torch, without Lightning or anomalib.

An export folder (written by :mod:`distillad.export`, ``distillad export``) holds one model file and
``metadata.json``::

    onnx/      model.onnx               ONNX Runtime
    openvino/  model.xml + model.bin    OpenVINO IR (FP32)
    torch/     model.pt2                a ``torch.export`` program: needs torch only, not distillad's classes

Every format takes float32 RGB images in [0, 1] of shape (B, 3, S, S) with any batch size B, resized to
the run's ``image_size`` S (:class:`distillad.inference.ImageFiles` does that) and returns the anomaly maps
(B, 1, S, S) and the image scores (B,). ``metadata.json`` also carries the run's decision threshold,
normalisation floor and overlay range, so the folder is all a deployment needs.

This module imports numpy at load time and the runtime of the chosen format when a model is loaded.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from distillad.errors import DistilladError
from distillad.storage import check_program_archive, file_inside

METADATA_FILE = "metadata.json"
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torch": "model.pt2"}
#: The runtime package each format needs, and its ``pip install`` name.
RUNTIME_PACKAGES = {"onnx": ("onnxruntime", "onnxruntime"), "openvino": ("openvino", "openvino"), "torch": ("torch", "torch")}
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "pred_score")


def require(fmt: str) -> ModuleType:
    """The runtime package of ``fmt``, or a one-line error naming the ``pip install`` that provides it."""
    module_name, package = RUNTIME_PACKAGES[fmt]
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        msg = (f"the {fmt} format needs the '{module_name}' package, which is not installed; "
               f"run 'pip install {package}' (or 'pip install distillad[export]' for every format)")
        raise DistilladError(msg) from error


Predictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _onnx_predictor(path: Path, threads: int | None) -> Predictor:
    onnxruntime = require("onnx")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return maps, scores

    return run


def _openvino_predictor(path: Path, threads: int | None) -> Predictor:
    openvino = require("openvino")
    # f32 explicitly: on CPUs with bf16/AMX units OpenVINO otherwise infers in bf16 (about 1e-2 off).
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = openvino.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in OUTPUT_NAMES]

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = request.infer({INPUT_NAME: images})
        return results[outputs[0]].copy(), results[outputs[1]].copy()

    return run


def _torch_predictor(path: Path, threads: int | None) -> Predictor:
    torch = require("torch")
    check_program_archive(path)
    if threads:
        torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
    module = torch.export.load(str(path)).module()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            maps, scores = module(torch.from_numpy(images))
        return maps.numpy(), scores.numpy()

    return run


_PREDICTORS: dict[str, Callable[[Path, int | None], Predictor]] = {
    "onnx": _onnx_predictor, "openvino": _openvino_predictor, "torch": _torch_predictor,
}


def read_metadata(path: str | Path) -> tuple[Path, dict]:
    """The export folder for ``path`` (the folder or its model file) and its ``metadata.json``."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    metadata_path = folder / METADATA_FILE
    if not metadata_path.is_file():
        msg = (f"{path} is not a distillad export (no {METADATA_FILE}); "
               "pass the folder written by 'distillad export --run RUN --format FORMAT'")
        raise DistilladError(msg)
    try:
        metadata = json.loads(metadata_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{metadata_path} is not valid JSON ({error}); export the run again"
        raise DistilladError(msg) from error
    fmt = metadata.get("format") if isinstance(metadata, dict) else None
    if fmt not in MODEL_FILES:
        msg = f"{metadata_path} names format {fmt!r}, not one of {', '.join(MODEL_FILES)}; export the run again"
        raise DistilladError(msg)
    return folder, metadata


class ExportedModel:
    """An exported model loaded into its runtime; call it with a float32 (B, 3, S, S) array in [0, 1].

    Args:
        path: The export folder or its model file.
        threads: Inference threads (ONNX Runtime intra-op threads, OpenVINO ``INFERENCE_NUM_THREADS``,
            ``torch.set_num_threads``); ``None`` keeps the runtime's default (all cores).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        folder, self.metadata = read_metadata(path)
        self.format: str = self.metadata["format"]
        self.path = file_inside(folder, str(self.metadata.get("file", MODEL_FILES[self.format])),
                                f"{folder / METADATA_FILE}")
        if not self.path.is_file():
            msg = f"{self.path} is missing from the export folder {folder}; export the run again"
            raise DistilladError(msg)
        try:
            self._predict = _PREDICTORS[self.format](self.path, threads)
        except DistilladError:
            raise
        except Exception as error:  # each runtime has its own exception types for a file it cannot parse
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            msg = f"{self.path} cannot be loaded by the {self.format} runtime ({reason}); export the run again"
            raise DistilladError(msg) from error

    @property
    def image_size(self) -> int:
        """Side S of the square input images."""
        return int(self.metadata["image_size"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps (B, 1, S, S) and scores (B,) of float32 images (B, 3, S, S) in [0, 1]."""
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            msg = (f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}; "
                   "resize them to the export's image_size")
            raise DistilladError(msg)
        return self._predict(np.ascontiguousarray(images, dtype=np.float32))


def load_exported(path: str | Path, threads: int | None = None) -> ExportedModel:
    """Load an export folder (or its model file) into the runtime its ``metadata.json`` names."""
    return ExportedModel(path, threads)
