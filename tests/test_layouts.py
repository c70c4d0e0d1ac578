"""Every ``--dataset`` layout, as its authors distribute it: a tiny copy of each is written here (real weld images
in the dataset's folder structure, file types and name patterns), read back against what was written, and
trained for one epoch at 64 px through the command line; ``--category all`` runs every category of a root."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from distillad.cli import run
from distillad.data.io import mask_files
from distillad.data.layouts import DATASETS, dataset_layout, resolve_categories
from distillad.errors import DistilladError


@pytest.fixture(scope="module")
def weld_images(shared_data: Path) -> list[np.ndarray]:
    """Twelve real weld images (BGR, 96 x 96)."""
    paths = sorted((shared_data / "weld" / "train" / "good").iterdir())[:8]
    paths += sorted((shared_data / "weld" / "test" / "defective").iterdir())[:4]
    return [cv2.resize(cv2.imread(str(path)), (96, 96)) for path in paths]


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def box_mask(index: int, value: int = 255, size: int = 96) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[10 + 5 * index: 40 + 5 * index, 20:50] = value
    return mask


def fit_one_epoch(dataset: str, root: Path, category: str, out: Path) -> dict:
    assert run(["fit", "--model", "rd", "--dataset", dataset, "--root", str(root), "--category", category,
                "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--no-heatmaps", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_btad_reads_ok_and_ko_with_masks_paired_by_name(weld_images, tmp_path: Path) -> None:
    category = tmp_path / "BTech_Dataset_transformed" / "03"
    for index in range(6):
        write(category / "train" / "ok" / f"{index:04d}.bmp", weld_images[index])
    write(category / "test" / "ok" / "0000.bmp", weld_images[6])
    # Masks listed in another order than their images, and with another suffix: pairing is by name.
    for index, name in enumerate(["0002", "0010", "0001"]):
        write(category / "test" / "ko" / f"{name}.bmp", weld_images[8 + index])
        write(category / "ground_truth" / "ko" / f"{name}.png", box_mask(index))
    samples = dataset_layout("btad").samples(tmp_path / "BTech_Dataset_transformed", "03")
    test = samples[samples.split == "test"].set_index("image_path")
    for name in ["0002", "0010", "0001"]:
        assert test.loc[str(category / "test" / "ko" / f"{name}.bmp"), "mask_path"] == str(
            category / "ground_truth" / "ko" / f"{name}.png")
    assert (samples.split == "train").sum() == 6 and sorted(test.label_index) == [0, 1, 1, 1]
    metrics = fit_one_epoch("btad", tmp_path / "BTech_Dataset_transformed", "03", tmp_path / "run")
    assert (metrics["num_test_images"], metrics["num_anomalous"]) == (4, 3)
    write(category / "ground_truth" / "ko" / "0007.png", box_mask(0))  # its image was lost
    with pytest.raises(DistilladError, match=r"mask .*0007.png belongs to no image"):
        dataset_layout("btad").samples(tmp_path / "BTech_Dataset_transformed", "03")


def test_mpdd_reads_the_mvtec_layout(weld_images, tmp_path: Path) -> None:
    category = tmp_path / "MPDD" / "bracket_black"
    for index in range(6):
        write(category / "train" / "good" / f"{index:03d}.png", weld_images[index])
    write(category / "test" / "good" / "000.png", weld_images[6])
    write(category / "test" / "scratches" / "000.png", weld_images[8])
    write(category / "ground_truth" / "scratches" / "000_mask.png", box_mask(0))
    metrics = fit_one_epoch("mpdd", tmp_path / "MPDD", "bracket_black", tmp_path / "run")
    assert (metrics["num_test_images"], metrics["num_anomalous"]) == (2, 1)


def write_visa(root: Path, weld_images: list[np.ndarray]) -> None:
    lines = ["object,split,label,image,mask"]
    for index in range(6):
        name = f"candle/Data/Images/Normal/{index:04d}.JPG"
        write(root / name, weld_images[index])
        lines.append(f"candle,train,normal,{name},")
    write(root / "candle/Data/Images/Normal/0100.JPG", weld_images[6])
    lines.append("candle,test,normal,candle/Data/Images/Normal/0100.JPG,")
    for index in range(2):
        image, mask = f"candle/Data/Images/Anomaly/{index:03d}.JPG", f"candle/Data/Masks/Anomaly/{index:03d}.png"
        write(root / image, weld_images[8 + index])
        write(root / mask, box_mask(index, value=1))  # VisA's masks hold small class values, not 255
        lines.append(f"candle,test,anomaly,{image},{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")


def test_visa_follows_its_one_class_split_csv(weld_images, tmp_path: Path) -> None:
    write_visa(tmp_path / "VisA", weld_images)
    assert resolve_categories("visa", tmp_path / "VisA", ["all"]) == ["candle"]
    samples = dataset_layout("visa").samples(tmp_path / "VisA", "candle")
    assert samples.groupby("split").size().to_dict() == {"test": 3, "train": 6}
    anomalous = samples[samples.label_index == 1]
    assert [Path(path).name for path in anomalous.mask_path] == ["000.png", "001.png"]
    metrics = fit_one_epoch("visa", tmp_path / "VisA", "candle", tmp_path / "run")
    assert (metrics["num_test_images"], metrics["num_anomalous"]) == (3, 2)
    assert metrics["pixel_AUROC"] > 0  # the 0/1 masks were read as masks
    with pytest.raises(DistilladError, match="'bottle' is not in"):
        dataset_layout("visa").samples(tmp_path / "VisA", "bottle")


def write_loco(category: Path, weld_images: list[np.ndarray]) -> None:
    for index in range(5):
        write(category / "train" / "good" / f"{index:03d}.png", weld_images[index])
    for index in range(3):
        write(category / "validation" / "good" / f"{index:03d}.png", weld_images[5 + index // 2])
    write(category / "test" / "good" / "000.png", weld_images[7])
    config = [{"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 500,
               "relative_saturation": False},
              {"defect_name": "scratch", "pixel_value": 254, "saturation_threshold": 1.0, "relative_saturation": True}]
    (category / "defects_config.json").write_text(json.dumps(config))
    write(category / "test" / "logical_anomalies" / "000.png", weld_images[8])
    write(category / "ground_truth" / "logical_anomalies" / "000" / "000.png", box_mask(0))
    write(category / "ground_truth" / "logical_anomalies" / "000" / "001.png", box_mask(5))  # two regions
    write(category / "test" / "structural_anomalies" / "000.png", weld_images[9])
    write(category / "ground_truth" / "structural_anomalies" / "000" / "000.png", box_mask(2, value=254))


def test_mvtec_loco_uses_its_validation_normals_every_mask_and_reports_spro(weld_images, tmp_path: Path) -> None:
    write_loco(tmp_path / "loco" / "juice_bottle", weld_images)
    samples = dataset_layout("mvtec_loco").samples(tmp_path / "loco", "juice_bottle")
    logical = samples[samples.label == "logical_anomalies"].iloc[0]
    assert [Path(path).name for path in mask_files(logical.mask_path)] == ["000.png", "001.png"]
    assert (samples.split == "val").sum() == 3
    metrics = fit_one_epoch("mvtec_loco", tmp_path / "loco", "juice_bottle", tmp_path / "run")
    assert metrics["calibration_images"] == 3  # validation/good, not a share of train/good
    for key in ("sPRO_logical", "sPRO_structural", "sPRO_mean", "sPRO_overall", "image_AUROC_logical",
                "image_AUROC_structural"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["sPRO_mean"] == pytest.approx((metrics["sPRO_logical"] + metrics["sPRO_structural"]) / 2)
    write(tmp_path / "loco" / "juice_bottle" / "ground_truth" / "logical_anomalies" / "009" / "000.png", box_mask(0))
    with pytest.raises(DistilladError, match=r"mask .*logical_anomalies/009 belongs to no image"):
        dataset_layout("mvtec_loco").samples(tmp_path / "loco", "juice_bottle")


def test_mvtec_ad2_reads_test_public_and_its_ground_truth(weld_images, tmp_path: Path) -> None:
    category = tmp_path / "mvtec_ad_2" / "can"
    for index in range(5):
        write(category / "train" / "good" / f"{index:03d}_regular.png", weld_images[index])
    write(category / "validation" / "good" / "000_regular.png", weld_images[5])
    write(category / "test_public" / "good" / "000_regular.png", weld_images[6])
    write(category / "test_public" / "bad" / "000_regular.png", weld_images[8])
    write(category / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png", box_mask(0))
    samples = dataset_layout("mvtec_ad2").samples(tmp_path / "mvtec_ad_2", "can")
    assert samples.groupby("split").size().to_dict() == {"test": 2, "train": 5, "val": 1}
    assert set(samples.label) == {"good", "bad"}  # ground_truth is not read as a defect folder
    metrics = fit_one_epoch("mvtec_ad2", tmp_path / "mvtec_ad_2", "can", tmp_path / "run")
    assert (metrics["num_test_images"], metrics["num_anomalous"], metrics["calibration_images"]) == (2, 1, 1)


def test_category_all_runs_every_category_and_reports_a_failure_without_losing_the_others(
        weld_images, tmp_path: Path, capsys) -> None:
    root = tmp_path / "MPDD"
    for name in ("metal_plate", "tubes"):
        for index in range(5):
            write(root / name / "train" / "good" / f"{index:03d}.png", weld_images[index])
        write(root / name / "test" / "good" / "000.png", weld_images[6])
        write(root / name / "test" / "anomalous" / "000.png", weld_images[8])
        write(root / name / "ground_truth" / "anomalous" / "000_mask.png", box_mask(0))
    (root / "tubes" / "ground_truth" / "anomalous" / "000_mask.png").unlink()
    assert resolve_categories("mpdd", root, ["all"]) == ["metal_plate", "tubes"]
    with pytest.raises(DistilladError, match="1 of 2 categories failed"):
        run(["fit", "--model", "rd", "--dataset", "mpdd", "--root", str(root), "--category", "all", "--image-size", "64",
             "--epochs", "1", "--batch-size", "4", "--no-heatmaps", "--out", str(tmp_path / "runs")])
    summary = json.loads((tmp_path / "runs" / "categories.json").read_text())
    assert [row["category"] for row in summary["categories"]] == ["metal_plate", "tubes"]
    assert "no mask" in summary["categories"][1]["error"]
    assert summary["mean"]["image_AUROC"] == summary["categories"][0]["image_AUROC"]
    assert (tmp_path / "runs" / "metal_plate" / "model.ckpt").is_file()
    assert "| **mean** |" in (tmp_path / "runs" / "categories.md").read_text()


def test_dataset_folder_asks_for_the_plain_folders(tmp_path: Path) -> None:
    with pytest.raises(DistilladError, match="--dataset folder reads plain folders"):
        run(["fit", "--dataset", "folder", "--root", str(tmp_path), "--category", "x", "--out", str(tmp_path / "r")])


def test_unknown_dataset_is_named() -> None:
    with pytest.raises(DistilladError, match="unknown dataset 'mvtec-ad'"):
        dataset_layout("mvtec-ad")
    assert set(DATASETS) == {"mvtec_ad", "mpdd", "btad", "mvtec_loco", "mvtec_ad2", "visa", "realiad", "kolektor"}


def test_realiad_follows_its_json_split_and_resolution_folder(weld_images, tmp_path: Path) -> None:
    root = tmp_path / "Real-IAD"
    images = root / "realiad_256" / "audiojack"
    train, test = [], []
    for index in range(5):
        name = f"OK/S{index:04d}/audiojack_{index:04d}_OK_C1_20231021.jpg"
        write(images / name, weld_images[index])
        train.append({"category": "audiojack", "anomaly_class": "OK", "image_path": name, "mask_path": None})
    write(images / "OK/S0100/audiojack_0100_OK_C2_20231021.jpg", weld_images[6])
    test.append({"category": "audiojack", "anomaly_class": "OK",
                 "image_path": "OK/S0100/audiojack_0100_OK_C2_20231021.jpg", "mask_path": None})
    for index in range(2):
        name = f"NG/AK/S{index:04d}/audiojack_{index:04d}_NG_AK_C1_20231021"
        write(images / f"{name}.jpg", weld_images[8 + index])
        write(images / f"{name}.png", box_mask(index))
        test.append({"category": "audiojack", "anomaly_class": "AK", "image_path": f"{name}.jpg",
                     "mask_path": f"{name}.png"})
    (root / "realiad_jsons" / "realiad_jsons").mkdir(parents=True)
    (root / "realiad_jsons" / "realiad_jsons" / "audiojack.json").write_text(
        json.dumps({"meta": {}, "train": train, "test": test}))
    assert resolve_categories("realiad", root, ["all"]) == ["audiojack"]
    samples = dataset_layout("realiad").samples(root, "audiojack")
    assert samples.groupby("split").size().to_dict() == {"test": 3, "train": 5}
    assert sorted(samples[samples.label_index == 1].label) == ["AK", "AK"]
    metrics = fit_one_epoch("realiad", root, "audiojack", tmp_path / "run")
    assert (metrics["num_test_images"], metrics["num_anomalous"]) == (3, 2)


def test_kolektor_labels_parts_by_their_masks_and_splits_without_chance(weld_images, tmp_path: Path) -> None:
    folder = tmp_path / "data" / "KolektorSDD"
    empty = np.zeros((96, 96), dtype=np.uint8)
    for part in range(12):
        kos = folder / f"kos{part // 4 + 1:02d}"
        write(kos / f"Part{part % 4}.jpg", weld_images[part])
        write(kos / f"Part{part % 4}_label.bmp", box_mask(0) if part in (8, 11) else empty)
    samples = dataset_layout("kolektor").samples(tmp_path / "data", "KolektorSDD")
    test = samples[samples.split == "test"]
    assert sorted(Path(path).name for path in test[test.label_index == 1].image_path) == ["Part0.jpg", "Part3.jpg"]
    assert (samples.split == "train").sum() == 8 and (test.label_index == 0).sum() == 2  # every 5th of 10 normals
    metrics = fit_one_epoch("kolektor", tmp_path / "data", "KolektorSDD", tmp_path / "run")
    assert (metrics["num_test_images"], metrics["num_anomalous"]) == (4, 2)
