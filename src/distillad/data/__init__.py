"""Data layer: OpenCV image/mask reading, sample tables and anomalib datamodules.

Build a sample table with :func:`mvtec_samples` or :func:`folder_samples` and serve it with
:class:`DistilladDataModule`, or use the :class:`MVTecLayout` / :class:`FolderLayout` shortcuts.

The readers (:mod:`distillad.data.io`) are imported eagerly; the sample tables and datamodules, which
import anomalib, on first access, so that inference on exported models (:mod:`distillad.inference`)
reads images without importing anomalib or Lightning.
"""

import importlib

from distillad.data.io import IMAGE_EXTENSIONS, is_image_file, read_image, read_mask

_LAZY = {
    "DistilladDataModule": "distillad.data.datamodule",
    "FolderLayout": "distillad.data.datamodule",
    "MVTecLayout": "distillad.data.datamodule",
    "SampleTableDataset": "distillad.data.datamodule",
    "one_pass": "distillad.data.datamodule",
    "SAMPLE_COLUMNS": "distillad.data.samples",
    "folder_samples": "distillad.data.samples",
    "list_images": "distillad.data.samples",
    "mvtec_samples": "distillad.data.samples",
}

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_COLUMNS",
    "DistilladDataModule",
    "FolderLayout",
    "MVTecLayout",
    "SampleTableDataset",
    "folder_samples",
    "is_image_file",
    "list_images",
    "mvtec_samples",
    "one_pass",
    "read_image",
    "read_mask",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'distillad.data' has no attribute '{name}'"
    raise AttributeError(msg)
