"""Data layer: OpenCV image/mask reading, sample tables and anomalib datamodules.

Build a sample table with :func:`mvtec_samples` or :func:`folder_samples` and serve it with
:class:`DistilladDataModule`, or use the :class:`MVTecLayout` / :class:`FolderLayout` shortcuts.
"""

from distillad.data.datamodule import DistilladDataModule, FolderLayout, MVTecLayout, SampleTableDataset
from distillad.data.io import IMAGE_EXTENSIONS, is_image_file, read_image, read_mask
from distillad.data.samples import SAMPLE_COLUMNS, folder_samples, list_images, mvtec_samples

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
    "read_image",
    "read_mask",
]
