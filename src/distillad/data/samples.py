"""Sample tables: which image belongs to which split, its label and its mask.

The builders return an anomalib-style :class:`pandas.DataFrame` with the columns

``image_path`` (str), ``label`` (str), ``label_index`` (int: 0 normal, 1 abnormal), ``mask_path``
(str, ``""`` when there is none; several files, one per region, joined with
:data:`~distillad.data.io.MASK_SEPARATOR`) and ``split`` (``"train"``, ``"val"`` for a dataset's own
held-out normal images, ``"test"``),

sorted by split and path, with ``df.attrs["task"]`` set to ``"segmentation"`` when every abnormal
image has a mask and to ``"classification"`` when none has.

Unlike anomalib's readers they accept every suffix in :data:`IMAGE_EXTENSIONS`, silently skip
files that are not images (``.txt``, ``Thumbs.db``, hidden files), pair a mask with its image by
*exact* stem (``<stem>_mask.<ext>`` or ``<stem>.<ext>``), fail with a one-line
:class:`DistilladError` when a defective image has no mask, and never download anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from anomalib.data.utils import LabelName

from distillad.data.io import IMAGE_EXTENSIONS, MASK_SEPARATOR, is_image_file
from distillad.errors import DistilladError

SAMPLE_COLUMNS = ("image_path", "label", "label_index", "mask_path", "split")
"""Columns of every sample table."""

_EXTENSIONS_HINT = "/".join(IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted; other files are ignored."""
    return sorted(path for path in folder.iterdir() if path.is_file() and is_image_file(path))


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders of ``folder``, sorted by name."""
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _pair_masks(images: list[Path], mask_dir: Path) -> list[str]:
    """Mask path of every image in ``images``, looked up in ``mask_dir`` by exact stem.

    The mask of ``<stem>.<ext>`` is ``<stem>_mask.<any ext>``, else ``<stem>.<any ext>``; stems are
    compared exactly (``x_1087`` never matches ``x_10871_mask``).

    Raises:
        DistilladError: If an image has no mask, or several files (different suffixes) could be its mask.
    """
    by_stem: dict[str, list[Path]] = {}
    for path in list_images(mask_dir) if mask_dir.is_dir() else []:
        by_stem.setdefault(path.stem, []).append(path)
    masks = []
    for image in images:
        candidates = by_stem.get(f"{image.stem}_mask") or by_stem.get(image.stem) or []
        if len(candidates) > 1:
            names = ", ".join(path.name for path in candidates)
            raise DistilladError(f"ambiguous masks for image {image}: {names} in {mask_dir}; keep only one of them")
        if not candidates:
            raise DistilladError(
                f"no mask for defective image {image}: expected {mask_dir / (image.stem + '_mask')}."
                f"<{_EXTENSIONS_HINT}> (or {image.stem}.<ext>); add the mask or remove the image"
            )
        masks.append(str(candidates[0]))
    _refuse_orphans([path for paths in by_stem.values() for path in paths], set(masks), images)
    return masks


def _refuse_orphans(found: list[Path], used: set[str], images: list[Path]) -> None:
    """A mask (or mask folder) that no image claims is as wrong as a missing one: its image was lost or renamed."""
    orphans = sorted(str(path) for path in found if str(path) not in used)
    if orphans:
        where = images[0].parent if images else "the defect folder"
        raise DistilladError(f"mask {orphans[0]} belongs to no image in {where}"
                             + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else "")
                             + "; add its image or remove the mask")


def sample_rows(images: list[Path], label: str, label_index: int, split: str, masks: list[str] | None = None) -> list[dict]:
    """Table rows for ``images``, one per image."""
    masks = masks if masks is not None else [""] * len(images)
    return [
        {"image_path": str(image), "label": label, "label_index": int(label_index), "mask_path": mask, "split": split}
        for image, mask in zip(images, masks, strict=True)
    ]


def sample_table(rows: list[dict]) -> pd.DataFrame:
    """Assemble rows into a sorted sample table and record the task in ``attrs``."""
    samples = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))
    samples["label_index"] = samples["label_index"].astype("int64")
    samples = samples.sort_values(["split", "image_path"], ignore_index=True)
    abnormal = samples[samples.label_index == LabelName.ABNORMAL]
    has_masks = len(abnormal) > 0 and bool((abnormal.mask_path != "").all())
    samples.attrs["task"] = "segmentation" if has_masks else "classification"
    return samples


def _train_images(folder: Path) -> list[Path]:
    """Images of the training folder, or a one-line error when there are none."""
    images = list_images(folder) if folder.is_dir() else []
    if not images:
        raise DistilladError(
            f"empty train set: no images ({_EXTENSIONS_HINT}) in {folder}; put defect-free training images there"
        )
    return images


def existing_root(root: str | Path) -> Path:
    """``root`` as a Path, or a one-line error when it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise DistilladError(f"dataset root {root} does not exist; pass the folder that contains the category folders")
    return root


def category_dir(root: str | Path, category: str) -> Path:
    """``root/category``, or a one-line error naming what exists instead."""
    root = existing_root(root)
    folder = root / category
    if not folder.is_dir():
        available = ", ".join(path.name for path in _subfolders(root)) or "none"
        raise DistilladError(f"category {category!r} not found in {root} (available: {available}); pick one of those")
    return folder


def pair_mask_folders(images: list[Path], mask_dir: Path) -> list[str]:
    """MVTec LOCO's masks: every image ``<stem>.<ext>`` has a folder ``mask_dir/<stem>/`` with one file per
    annotated region; the files are joined with :data:`~distillad.data.io.MASK_SEPARATOR`."""
    masks = []
    for image in images:
        files = list_images(mask_dir / image.stem) if (mask_dir / image.stem).is_dir() else []
        if not files:
            raise DistilladError(f"no mask for defective image {image}: expected mask files in {mask_dir / image.stem}; "
                                 "add them or remove the image")
        masks.append(MASK_SEPARATOR.join(str(path) for path in files))
    folders = [path for path in mask_dir.iterdir() if path.is_dir()] if mask_dir.is_dir() else []
    _refuse_orphans(folders, {str(mask_dir / image.stem) for image in images}, images)
    return masks


def mvtec_samples(root: str | Path, category: str, normal: str = "good", test: str = "test",
                  ground_truth: str = "ground_truth", validation: str | None = None,
                  pair_masks: Callable[[list[Path], Path], list[str]] = _pair_masks) -> pd.DataFrame:
    """Sample table of one category in the MVTec AD layout, or one of its relatives (the arguments).

    Layout::

        root/category/train/<normal>/*                 normal training images
        root/category/<validation>/<normal>/*          held-out normal images (split "val"), if given
        root/category/<test>/<normal>/*                normal test images
        root/category/<test>/<defect>/*                defective test images
        root/category/<ground_truth>/<defect>/<stem>_mask.<ext>   (or <stem>.<ext>) their masks

    ``label`` is the test subfolder name (``"good"`` for normal images). Without a ground-truth folder
    the table is for classification; with one, every defective image must have its mask. A category
    without a test folder yields a train-only table.

    Args:
        root: Dataset root, the folder holding the category folders.
        category: Category folder.
        normal: Name of the normal folders (``good``; BTAD: ``ok``).
        test: Test folder (MVTec AD 2: ``test_public``).
        ground_truth: Mask folder, relative to the category (MVTec AD 2: ``test_public/ground_truth``).
        validation: Folder of held-out normal images (MVTec LOCO, MVTec AD 2: ``validation``).
        pair_masks: Finds the masks of a defect folder's images (MVTec LOCO: one folder per image).

    Raises:
        DistilladError: If ``root`` or the category is missing, the train set is empty, or a defective
            image has no mask although the category has a ground-truth folder.
    """
    folder = category_dir(root, category)
    rows = sample_rows(_train_images(folder / "train" / normal), "good", LabelName.NORMAL, "train")
    if validation is not None and (folder / validation / normal).is_dir():
        rows += sample_rows(list_images(folder / validation / normal), "good", LabelName.NORMAL, "val")
    test_dir, masks_dir = folder / test, folder / ground_truth
    for defect_dir in _subfolders(test_dir) if test_dir.is_dir() else []:
        if defect_dir.resolve() == masks_dir.resolve():
            continue
        images = list_images(defect_dir)
        if defect_dir.name == normal:
            rows += sample_rows(images, "good", LabelName.NORMAL, "test")
            continue
        masks = pair_masks(images, masks_dir / defect_dir.name) if masks_dir.is_dir() else None
        rows += sample_rows(images, defect_dir.name, LabelName.ABNORMAL, "test", masks)
    return sample_table(rows)


def _existing_dir(folder: str | Path, option: str) -> Path:
    """``folder`` as a Path, or a one-line error naming ``option`` when it is not a directory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DistilladError(f"{option} {folder} does not exist; pass an existing folder of images")
    return folder


def _nonempty_images(folder: Path, option: str) -> list[Path]:
    """Images of ``folder``, or a one-line error naming ``option`` when there are none."""
    images = list_images(folder)
    if not images:
        raise DistilladError(f"{option} {folder} holds no images ({_EXTENSIONS_HINT}); add images or drop the option")
    return images


def folder_samples(
    normal_dir: str | Path,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    normal_test_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Sample table from plain folders of images.

    Args:
        normal_dir: Normal (defect-free) images; all of them form the training split.
        abnormal_dir: Abnormal images; test split, ``label`` ``"abnormal"``.
        mask_dir: Masks of the abnormal images, paired by exact stem (``<stem>_mask.<ext>`` or
            ``<stem>.<ext>``); every abnormal image must have one.
        normal_test_dir: Normal images for the test split, ``label`` ``"normal"``. Without it the test
            split holds only abnormal images: nothing of ``normal_dir`` is moved to test, so image-level
            metrics need this folder.

    Raises:
        DistilladError: If a given folder is missing or holds no images, ``mask_dir`` comes without
            ``abnormal_dir``, or an abnormal image has no mask.
    """
    rows = sample_rows(_train_images(_existing_dir(normal_dir, "normal_dir")), "normal", LabelName.NORMAL, "train")
    if mask_dir is not None and abnormal_dir is None:
        raise DistilladError(f"mask_dir {mask_dir} was given without abnormal_dir; pass abnormal_dir or drop mask_dir")
    if abnormal_dir is not None:
        images = _nonempty_images(_existing_dir(abnormal_dir, "abnormal_dir"), "abnormal_dir")
        masks = None
        if mask_dir is not None:
            masks = _pair_masks(images, _existing_dir(mask_dir, "mask_dir"))
        rows += sample_rows(images, "abnormal", LabelName.ABNORMAL, "test", masks)
    if normal_test_dir is not None:
        images = _nonempty_images(_existing_dir(normal_test_dir, "normal_test_dir"), "normal_test_dir")
        rows += sample_rows(images, "normal", LabelName.NORMAL, "test")
    return sample_table(rows)
