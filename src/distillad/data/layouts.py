"""The published datasets, read as their authors distribute them (after unpacking): ``--dataset NAME``.

Each entry turns ``(root, category)`` into a sample table (:mod:`distillad.data.samples`) and lists the
categories of a root (``--category all``). Masks are paired by file name, never by order, and a missing
mask is a one-line error naming the image.

=============  =====================================================================================
``mvtec_ad``   ``ROOT/CAT/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``
``mpdd``       the MVTec AD layout
``btad``       the MVTec AD layout with ``ok`` for ``good`` (``BTech_Dataset_transformed``; ``.bmp``/``.png``
               masks named like their images)
``mvtec_loco`` the MVTec AD layout plus ``validation/good`` (held-out normals) and one mask folder per
               image, ``ground_truth/<defect>/<stem>/000.png ...`` (one file per region);
               ``defects_config.json`` feeds sPRO (:func:`distillad.metrics.mvtec_loco_spro`)
``mvtec_ad2``  ``ROOT/CAT/{train/good, validation/good, test_public/{good, bad}, test_public/ground_truth/bad}``
``visa``       ``ROOT/split_csv/1cls.csv`` (``object, split, label, image, mask``, paths relative to ROOT)
               over ``ROOT/CAT/Data/{Images,Masks}``
=============  =====================================================================================

Real-IAD and KolektorSDD are not read yet; ``--normal-dir`` and friends read any plain folders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
from anomalib.data.utils import LabelName

from distillad.data.samples import mvtec_samples, pair_mask_folders, sample_rows, sample_table
from distillad.errors import DistilladError


@dataclass(frozen=True)
class DatasetLayout:
    """How one published dataset is laid out: its sample table per category, its categories, where to get it."""

    samples: Callable[[str | Path, str], pd.DataFrame]
    categories: Callable[[str | Path], list[str]]
    source: str


def category_folders(root: str | Path) -> list[str]:
    """Subfolders of ``root`` that hold a ``train`` folder (the categories of the MVTec-like layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise DistilladError(f"dataset root {root} does not exist; pass the folder that contains the category folders")
    return sorted(path.name for path in root.iterdir() if (path / "train").is_dir() and not path.name.startswith("."))


VISA_SPLIT = Path("split_csv") / "1cls.csv"


def _visa_table(root: str | Path) -> pd.DataFrame:
    path = Path(root) / VISA_SPLIT
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as error:
        msg = f"cannot read VisA's split file {path} ({error}); pass the unpacked VisA folder (it holds split_csv/)"
        raise DistilladError(msg) from error
    missing = {"object", "split", "label", "image", "mask"} - set(table.columns)
    if missing:
        raise DistilladError(f"{path} lacks the columns {', '.join(sorted(missing))}; pass VisA's own 1cls.csv")
    return table


def visa_categories(root: str | Path) -> list[str]:
    """The objects VisA's 1-class split lists."""
    return sorted(set(_visa_table(root).object))


def visa_samples(root: str | Path, category: str) -> pd.DataFrame:
    """One VisA object under its 1-class split (``split_csv/1cls.csv``): ``normal`` / ``anomaly`` labels, masks
    from the CSV's ``mask`` column (an anomalous image without one is an error naming it)."""
    table = _visa_table(root)
    rows_of = table[table.object == category]
    if rows_of.empty:
        available = ", ".join(sorted(set(table.object))) or "none"
        raise DistilladError(f"category {category!r} is not in {Path(root) / VISA_SPLIT} (available: {available})")
    rows = []
    for row in rows_of.itertuples():
        image = Path(root) / row.image
        if row.label == "normal":
            rows += sample_rows([image], "good", LabelName.NORMAL, row.split)
        elif not row.mask:
            raise DistilladError(f"no mask for anomalous image {image} in {Path(root) / VISA_SPLIT}; add its mask")
        else:
            rows += sample_rows([image], "anomaly", LabelName.ABNORMAL, row.split, [str(Path(root) / row.mask)])
    return sample_table(rows)


DATASETS: dict[str, DatasetLayout] = {
    "mvtec_ad": DatasetLayout(mvtec_samples, category_folders,
                              "MVTec AD, https://www.mvtec.com/company/research/datasets/mvtec-ad"),
    "mpdd": DatasetLayout(mvtec_samples, category_folders, "MPDD, https://github.com/stepanje/MPDD"),
    "btad": DatasetLayout(partial(mvtec_samples, normal="ok"), category_folders,
                          "BTAD (BTech_Dataset_transformed), https://github.com/pankajmishra000/VT-ADL"),
    "mvtec_loco": DatasetLayout(partial(mvtec_samples, validation="validation", pair_masks=pair_mask_folders),
                                category_folders,
                                "MVTec LOCO AD, https://www.mvtec.com/company/research/datasets/mvtec-loco"),
    "mvtec_ad2": DatasetLayout(partial(mvtec_samples, test="test_public", ground_truth="test_public/ground_truth",
                                       validation="validation"), category_folders,
                               "MVTec AD 2, https://www.mvtec.com/company/research/datasets/mvtec-ad-2"),
    "visa": DatasetLayout(visa_samples, visa_categories, "VisA, https://github.com/amazon-science/spot-diff"),
}


def dataset_layout(name: str) -> DatasetLayout:
    """The layout registered as ``name`` (``mvtec`` is the old name of ``mvtec_ad``)."""
    name = "mvtec_ad" if name == "mvtec" else name
    if name not in DATASETS:
        raise DistilladError(f"unknown dataset '{name}'; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def resolve_categories(name: str, root: str | Path, categories: list[str]) -> list[str]:
    """``categories`` with ``all`` expanded to every category of ``root``."""
    if categories == ["all"]:
        found = dataset_layout(name).categories(root)
        if not found:
            raise DistilladError(f"no categories of dataset '{name}' in {root}; pass the unpacked dataset's folder")
        return found
    return categories
