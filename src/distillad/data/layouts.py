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
``realiad``    ``ROOT/realiad_jsons/realiad_jsons/CAT.json`` (``train``/``test`` lists, ``OK`` = normal) over
               ``ROOT/realiad_<1024|512|256|raw>/CAT``
``kolektor``   ``ROOT/CAT/kosNN/PartK.jpg`` with ``PartK_label.bmp`` (no split shipped: see
               :data:`KOLEKTOR_TEST_EVERY`)
=============  =====================================================================================

``--normal-dir`` and friends read any plain folders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
from anomalib.data.utils import LabelName

from distillad.data.io import read_mask
from distillad.data.samples import category_dir, existing_root, mvtec_samples, pair_mask_folders, sample_rows, sample_table
from distillad.errors import DistilladError


@dataclass(frozen=True)
class DatasetLayout:
    """How one published dataset is laid out: its sample table per category, its categories, where to get it."""

    samples: Callable[[str | Path, str], pd.DataFrame]
    categories: Callable[[str | Path], list[str]]
    source: str


def category_folders(root: str | Path) -> list[str]:
    """Subfolders of ``root`` that hold a ``train`` folder (the categories of the MVTec-like layouts)."""
    return sorted(path.name for path in existing_root(root).iterdir()
                  if (path / "train").is_dir() and not path.name.startswith("."))


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


REALIAD_RESOLUTIONS = ("1024", "512", "256", "raw")
REALIAD_JSONS = Path("realiad_jsons") / "realiad_jsons"


def realiad_categories(root: str | Path) -> list[str]:
    """The categories Real-IAD's metadata folder lists (``realiad_jsons/realiad_jsons/<category>.json``)."""
    folder = Path(root) / REALIAD_JSONS
    if not folder.is_dir():
        raise DistilladError(f"{folder} does not exist; pass the unpacked Real-IAD folder (it holds realiad_jsons/)")
    return sorted(path.stem for path in folder.glob("*.json"))


def realiad_samples(root: str | Path, category: str) -> pd.DataFrame:
    """One Real-IAD category under its authors' split (``realiad_jsons/realiad_jsons/<category>.json``: ``train`` and
    ``test`` lists of ``image_path``, ``mask_path``, ``anomaly_class``, ``OK`` for normal). Image paths are relative to
    ``realiad_<resolution>/<category>``; the first resolution folder present of 1024, 512, 256, raw is read."""
    root = Path(root)
    metadata_path = root / REALIAD_JSONS / f"{category}.json"
    if not metadata_path.is_file():
        available = ", ".join(realiad_categories(root)) or "none"
        raise DistilladError(f"category {category!r} has no {metadata_path} (available: {available})")
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, ValueError) as error:
        raise DistilladError(f"cannot read {metadata_path} ({error}); pass Real-IAD's own metadata") from error
    folders = [root / f"realiad_{resolution}" / category for resolution in REALIAD_RESOLUTIONS]
    images_root = next((folder for folder in folders if folder.is_dir()), None)
    if images_root is None:
        raise DistilladError(f"no image folder for {category!r} in {root} (expected realiad_1024/{category} or "
                             "realiad_512, realiad_256, realiad_raw); unpack one of them there")
    rows = []
    for split in ("train", "test"):
        for item in metadata.get(split, []):
            image = images_root / item["image_path"]
            if item.get("anomaly_class") == "OK":
                rows += sample_rows([image], "good", LabelName.NORMAL, split)
            elif not item.get("mask_path"):
                raise DistilladError(f"no mask for anomalous image {image} in {metadata_path}; add its mask")
            else:
                rows += sample_rows([image], str(item["anomaly_class"]), LabelName.ABNORMAL, split,
                                    [str(images_root / item["mask_path"])])
    return sample_table(rows)


def kolektor_categories(root: str | Path) -> list[str]:
    """Folders of ``root`` that hold KolektorSDD's ``kos*`` part folders."""
    root = Path(root)
    if not root.is_dir():
        raise DistilladError(f"dataset root {root} does not exist; pass the folder that holds the unpacked KolektorSDD")
    return sorted(path.name for path in root.iterdir() if path.is_dir() and any(path.glob("kos*")))


#: KolektorSDD ships no split: every ``KOLEKTOR_TEST_EVERY``-th normal image (in path order) and every defective
#: one are tested, the other normal images train (the 80/20 share of anomalib's Kolektor, without a random draw).
KOLEKTOR_TEST_EVERY = 5


def kolektor_samples(root: str | Path, category: str) -> pd.DataFrame:
    """KolektorSDD as distributed: ``ROOT/CATEGORY/kosNN/PartK.jpg`` with ``PartK_label.bmp``; a part is defective
    when its label has a nonzero pixel."""
    folder = category_dir(root, category)
    normal, defective = [], []
    for image in sorted(folder.glob("kos*/Part*.jpg")):
        label = image.with_name(f"{image.stem}_label.bmp")
        if not label.is_file():
            raise DistilladError(f"no label for {image}: expected {label}; add it or remove the image")
        (defective if read_mask(label).any() else normal).append((image, label))
    if not normal:
        raise DistilladError(f"empty train set: no defect-free parts in {folder}/kos*; pass the KolektorSDD folder")
    test_normal = normal[KOLEKTOR_TEST_EVERY - 1 :: KOLEKTOR_TEST_EVERY]
    train = [image for index, (image, _) in enumerate(normal) if index % KOLEKTOR_TEST_EVERY != KOLEKTOR_TEST_EVERY - 1]
    rows = sample_rows(train, "good", LabelName.NORMAL, "train")
    rows += sample_rows([image for image, _ in test_normal], "good", LabelName.NORMAL, "test")
    rows += sample_rows([image for image, _ in defective], "defect", LabelName.ABNORMAL, "test",
                        [str(label) for _, label in defective])
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
    "realiad": DatasetLayout(realiad_samples, realiad_categories, "Real-IAD, https://realiad4ad.github.io/Real-IAD"),
    "kolektor": DatasetLayout(kolektor_samples, kolektor_categories,
                              "KolektorSDD, https://www.vicos.si/resources/kolektorsdd"),
}


def dataset_layout(name: str) -> DatasetLayout:
    """The layout registered as ``name`` (``mvtec`` is the old name of ``mvtec_ad``)."""
    name = "mvtec_ad" if name == "mvtec" else name
    if name not in DATASETS:
        raise DistilladError(f"unknown dataset '{name}'; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def resolve_categories(name: str, root: str | Path, categories: list[str]) -> list[str]:
    """``categories`` with ``all`` expanded to every category of ``root``; an unknown dataset ``name`` is refused."""
    layout = dataset_layout(name)
    if categories == ["all"]:
        found = layout.categories(root)
        if not found:
            raise DistilladError(f"no categories of dataset '{name}' in {root}; pass the unpacked dataset's folder")
        return found
    return categories
