"""Tests of the data layer: OpenCV readers, sample tables and the datamodules."""

from __future__ import annotations

from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch

from distillad.data import (
    DistilladDataModule,
    FolderLayout,
    MVTecLayout,
    SampleTableDataset,
    folder_samples,
    mvtec_samples,
    read_image,
    read_mask,
)
from distillad.errors import DistilladError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real datasets not found at {SHARED_DATA}")


def write(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` with OpenCV (BGR order) to ``path``, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path
    return path


def gray(height: int, width: int, value: int = 128) -> np.ndarray:
    """A flat 8-bit grayscale image."""
    return np.full((height, width), value, dtype=np.uint8)


def square_mask(height: int, width: int) -> np.ndarray:
    """A 0/255 mask with a filled square in the middle."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return mask


def raises_one_line(match: str) -> pytest.RaisesContext:
    """``pytest.raises`` for a DistilladError whose message matches ``match``."""
    return pytest.raises(DistilladError, match=match)


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    """User errors are a single line."""
    assert "\n" not in str(error.value)


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """A tiny MVTec-layout dataset ``root/part`` with mixed suffixes, sizes, stray files and masks."""
    category = tmp_path / "root" / "part"
    train = category / "train" / "good"
    write(train / "a.png", gray(24, 32, 10))
    write(train / "b.jpg", gray(40, 30, 20))
    write(train / "c.bmp", gray(16, 16, 30))
    write(train / "d.tif", gray(20, 28, 40))
    write(train / "e.PNG", gray(24, 24, 50))
    (train / "notes.txt").write_text("not an image")
    (train / "Thumbs.db").write_bytes(b"\x00\x01")
    (train / ".DS_Store").write_bytes(b"\x00")
    (train / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: hidden, not an image
    write(category / "test" / "good" / "g1.png", gray(24, 32, 60))
    write(category / "test" / "good" / "g2.jpeg", gray(30, 20, 70))
    defect = category / "test" / "scratch"
    write(defect / "x_1087.png", gray(32, 48, 200))
    write(defect / "y.jpg", gray(20, 20, 210))
    (defect / "readme.txt").write_text("stray")
    truth = category / "ground_truth" / "scratch"
    write(truth / "x_1087_mask.png", square_mask(16, 24))  # half the image's resolution
    write(truth / "y.bmp", square_mask(20, 20))  # `<stem>.<ext>` is accepted too
    (tmp_path / "root" / "other").mkdir()
    return tmp_path / "root"


# --------------------------------------------------------------------------------------------- io


def test_read_grayscale_png_becomes_three_equal_channels(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = read_image(write(tmp_path / "g.png", array))
    assert image.dtype == np.uint8
    assert image.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], array)


def test_read_rgba_png_drops_alpha_and_returns_rgb(tmp_path: Path) -> None:
    bgra = np.zeros((5, 6, 4), dtype=np.uint8)
    bgra[...] = (10, 20, 30, 0)  # OpenCV order: blue, green, red, alpha (fully transparent)
    image = read_image(write(tmp_path / "rgba.png", bgra))
    assert image.shape == (5, 6, 3)
    np.testing.assert_array_equal(image[0, 0], [30, 20, 10])


def test_read_colour_bmp_and_tiff_are_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((4, 4, 3), dtype=np.uint8)
    bgr[...] = (1, 2, 3)
    for name in ("c.bmp", "c.tif", "c.tiff"):
        image = read_image(write(tmp_path / name, bgr))
        np.testing.assert_array_equal(image[2, 2], [3, 2, 1])


def test_read_16bit_png_scales_full_range(tmp_path: Path) -> None:
    array = np.array([[0, 257 * 100, 65535, 256]], dtype=np.uint16)
    image = read_image(write(tmp_path / "deep.png", array))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, :, 0], [0, 100, 255, 0])
    colour = np.zeros((2, 2, 3), dtype=np.uint16)
    colour[...] = (65535, 257 * 7, 0)  # BGR
    np.testing.assert_array_equal(read_image(write(tmp_path / "deep_rgb.png", colour))[0, 0], [0, 7, 255])


def test_read_float_tiff(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.25, 1.0, -0.5]], dtype=np.float32)
    np.testing.assert_array_equal(read_image(write(tmp_path / "unit.tif", unit))[0, :, 0], [0, 64, 255, 0])
    wide = np.array([[0.0, 25.0, 100.0]], dtype=np.float32)
    np.testing.assert_array_equal(read_image(write(tmp_path / "wide.tiff", wide))[0, :, 0], [0, 64, 255])


def test_read_jpeg(tmp_path: Path) -> None:
    image = read_image(write(tmp_path / "flat.jpg", gray(16, 16, 100)))
    assert image.shape == (16, 16, 3)
    assert np.abs(image.astype(int) - 100).max() <= 2


def test_read_unicode_path(tmp_path: Path) -> None:
    path = tmp_path / "bild_ünïcode_画像.png"
    ok, encoded = cv2.imencode(".png", gray(3, 5, 77))
    assert ok
    encoded.tofile(path)
    assert read_image(path)[1, 1, 0] == 77


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n truncated"])
def test_corrupt_image_raises_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken_frame.png"
    path.write_bytes(content)
    with raises_one_line("broken_frame.png.*remove or replace") as error:
        read_image(path)
    assert_one_line(error)


def test_missing_image_file_raises(tmp_path: Path) -> None:
    with raises_one_line("cannot read image .*absent.png"):
        read_image(tmp_path / "absent.png")


def test_read_mask_binarises_any_nonzero(tmp_path: Path) -> None:
    array = np.array([[0, 1, 255], [0, 0, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(read_mask(write(tmp_path / "m.png", array)), [[0, 1, 1], [0, 0, 1]])
    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    colour[0, 1] = (0, 0, 9)  # only the red channel is set
    np.testing.assert_array_equal(read_mask(write(tmp_path / "c.png", colour)), [[0, 1], [0, 0]])
    deep = np.array([[0, 1, 65535]], dtype=np.uint16)  # 1 // 257 would be 0: masks must not be scaled
    np.testing.assert_array_equal(read_mask(write(tmp_path / "d.png", deep)), [[0, 1, 1]])


def test_read_mask_resizes_with_nearest_neighbour(tmp_path: Path) -> None:
    path = write(tmp_path / "m.png", square_mask(16, 24))
    mask = read_mask(path, size=(40, 60))
    assert mask.shape == (40, 60)
    assert mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert mask[20, 30] == 1
    assert mask[0, 0] == 0
    checker = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)
    upscaled = read_mask(write(tmp_path / "checker.png", checker), size=(12, 12))
    np.testing.assert_array_equal(upscaled, np.kron(checker // 255, np.ones((3, 3), dtype=np.uint8)))


# ----------------------------------------------------------------------------------------- samples


def test_mvtec_samples_lists_all_suffixes_and_ignores_strays(mvtec_root: Path) -> None:
    samples = mvtec_samples(mvtec_root, "part")
    assert list(samples.columns) == ["image_path", "label", "label_index", "mask_path", "split"]
    assert samples.attrs["task"] == "segmentation"
    train = samples[samples.split == "train"]
    assert [Path(path).name for path in train.image_path] == ["a.png", "b.jpg", "c.bmp", "d.tif", "e.PNG"]
    assert (train.label_index == 0).all()
    test = samples[samples.split == "test"]
    assert sorted(Path(path).name for path in test.image_path) == ["g1.png", "g2.jpeg", "x_1087.png", "y.jpg"]
    good = test[test.label == "good"]
    assert (good.label_index == 0).all()
    assert (good.mask_path == "").all()
    assert list(test.image_path) == sorted(test.image_path)
    assert samples.equals(mvtec_samples(mvtec_root, "part"))  # deterministic


def test_mvtec_samples_pairs_masks_by_exact_stem(mvtec_root: Path) -> None:
    samples = mvtec_samples(mvtec_root, "part").set_index("image_path")
    defect = mvtec_root / "part" / "test" / "scratch"
    truth = mvtec_root / "part" / "ground_truth" / "scratch"
    assert samples.loc[str(defect / "x_1087.png"), "mask_path"] == str(truth / "x_1087_mask.png")
    assert samples.loc[str(defect / "y.jpg"), "mask_path"] == str(truth / "y.bmp")
    assert samples.loc[str(defect / "y.jpg"), "label"] == "scratch"
    assert samples.loc[str(defect / "y.jpg"), "label_index"] == 1


def test_mvtec_samples_missing_mask_names_the_image(mvtec_root: Path) -> None:
    truth = mvtec_root / "part" / "ground_truth" / "scratch"
    (truth / "x_1087_mask.png").unlink()
    write(truth / "x_10871_mask.png", square_mask(32, 48))  # a longer stem: a substring match would accept it
    with raises_one_line(r"no mask for defective image .*x_1087\.png.*x_1087_mask") as error:
        mvtec_samples(mvtec_root, "part")
    assert_one_line(error)


def test_a_mask_without_its_image_names_the_mask(mvtec_root: Path) -> None:
    write(mvtec_root / "part" / "ground_truth" / "scratch" / "x_10871_mask.png", square_mask(32, 48))
    with raises_one_line(r"mask .*x_10871_mask\.png belongs to no image in .*scratch") as error:
        mvtec_samples(mvtec_root, "part")
    assert_one_line(error)


def test_mvtec_samples_without_ground_truth_is_classification(mvtec_root: Path) -> None:
    for mask in (mvtec_root / "part" / "ground_truth" / "scratch").iterdir():
        mask.unlink()
    (mvtec_root / "part" / "ground_truth" / "scratch").rmdir()
    (mvtec_root / "part" / "ground_truth").rmdir()
    samples = mvtec_samples(mvtec_root, "part")
    assert samples.attrs["task"] == "classification"
    assert (samples.mask_path == "").all()
    assert (samples.label_index == 1).sum() == 2


def test_mvtec_samples_missing_root(tmp_path: Path) -> None:
    with raises_one_line("dataset root .*nowhere does not exist") as error:
        mvtec_samples(tmp_path / "nowhere", "part")
    assert_one_line(error)


def test_mvtec_samples_missing_category_lists_available(mvtec_root: Path) -> None:
    with raises_one_line(r"category 'bottle' not found .*available: other, part") as error:
        mvtec_samples(mvtec_root, "bottle")
    assert_one_line(error)


def test_mvtec_samples_empty_train_set(mvtec_root: Path) -> None:
    train = mvtec_root / "part" / "train" / "good"
    for path in train.iterdir():
        if path.suffix.lower() in {".png", ".jpg", ".bmp", ".tif"}:
            path.unlink()
    with raises_one_line("empty train set.*train.good") as error:  # only stray files are left
        mvtec_samples(mvtec_root, "part")
    assert_one_line(error)
    with raises_one_line("empty train set"):
        mvtec_samples(mvtec_root, "other")  # no train/good folder at all


def test_folder_samples(tmp_path: Path) -> None:
    write(tmp_path / "normal" / "n1.png", gray(8, 8))
    write(tmp_path / "normal" / "n2.jpg", gray(8, 8))
    (tmp_path / "normal" / "list.txt").write_text("stray")
    write(tmp_path / "bad" / "b_1.png", gray(8, 8))
    write(tmp_path / "bad" / "b_10.png", gray(8, 8))
    write(tmp_path / "masks" / "b_1_mask.png", square_mask(8, 8))
    write(tmp_path / "masks" / "b_10.png", square_mask(8, 8))
    write(tmp_path / "ok" / "t1.png", gray(8, 8))

    samples = folder_samples(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks", tmp_path / "ok")
    assert samples.attrs["task"] == "segmentation"
    assert (samples.split == "train").sum() == 2
    test = samples[samples.split == "test"].set_index("image_path")
    assert test.label_index.sort_values().tolist() == [0, 1, 1]
    assert test.loc[str(tmp_path / "bad" / "b_1.png"), "mask_path"] == str(tmp_path / "masks" / "b_1_mask.png")
    assert test.loc[str(tmp_path / "bad" / "b_10.png"), "mask_path"] == str(tmp_path / "masks" / "b_10.png")

    only_normal = folder_samples(tmp_path / "normal")
    assert (only_normal.split == "train").all()  # nothing of train is moved to test
    assert only_normal.attrs["task"] == "classification"

    (tmp_path / "masks" / "b_10.png").unlink()
    with raises_one_line(r"no mask for defective image .*b_10\.png"):
        folder_samples(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks")
    with raises_one_line("mask_dir .* without abnormal_dir"):
        folder_samples(tmp_path / "normal", mask_dir=tmp_path / "masks")
    with raises_one_line("abnormal_dir .*missing does not exist"):
        folder_samples(tmp_path / "normal", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with raises_one_line("empty train set"):
        folder_samples(tmp_path / "empty")


# -------------------------------------------------------------------------------------- datamodule


def test_dataset_item_resizes_mask_to_its_image(mvtec_root: Path) -> None:
    samples = mvtec_samples(mvtec_root, "part")
    dataset = SampleTableDataset(samples[samples.split == "test"])  # no augmentations: native sizes
    by_name = {Path(dataset.samples.image_path[i]).name: dataset[i] for i in range(len(dataset))}
    item = by_name["x_1087.png"]  # 32x48 image, 16x24 mask
    assert item.image.dtype == torch.float32
    assert tuple(item.image.shape) == (3, 32, 48)
    assert torch.allclose(item.image, torch.full_like(item.image, 200 / 255))
    assert tuple(item.gt_mask.shape) == (32, 48)
    assert item.gt_mask[16, 24]
    assert not item.gt_mask[0, 0]
    assert 0 < item.gt_mask.float().mean() < 1
    assert int(item.gt_label) == 1
    normal = by_name["g2.jpeg"]
    assert tuple(normal.gt_mask.shape) == (30, 20)
    assert not normal.gt_mask.any()
    assert int(normal.gt_label) == 0


def test_mixed_sizes_batch_together(mvtec_root: Path) -> None:
    datamodule = MVTecLayout(mvtec_root, "part", image_size=(20, 24), val_split_ratio=0, train_batch_size=8)
    datamodule.setup()
    train = next(iter(datamodule.train_dataloader()))
    assert tuple(train.image.shape) == (5, 3, 20, 24)
    test = next(iter(datamodule.test_dataloader()))
    assert tuple(test.image.shape) == (4, 3, 20, 24)
    assert tuple(test.gt_mask.shape) == (4, 20, 24)
    assert set(torch.unique(test.gt_mask.to(torch.uint8)).tolist()) == {0, 1}
    assert sorted(test.gt_label.int().tolist()) == [0, 0, 1, 1]
    assert float(test.image.min()) >= 0 and float(test.image.max()) <= 1


def test_validation_split_holds_out_train_images_and_keeps_full_test(mvtec_root: Path) -> None:
    datamodule = MVTecLayout(mvtec_root, "part", image_size=(16, 16), val_split_ratio=0.1, seed=3)
    datamodule.setup()
    train = set(datamodule.train_data.samples.image_path)
    val = set(datamodule.val_data.samples.image_path)
    assert len(val) == 1  # 10 % of 5 rounds to 0: at least one image is held out
    assert len(train) == 4
    assert not train & val
    assert val <= set(datamodule.samples[datamodule.samples.split == "train"].image_path)
    assert len(datamodule.test_data) == 4  # normal and abnormal test images all stay in test
    assert datamodule.test_data.has_normal and datamodule.test_data.has_anomalous
    assert datamodule.category == "part"

    again = MVTecLayout(mvtec_root, "part", image_size=(16, 16), val_split_ratio=0.1, seed=3)
    again.setup()
    assert set(again.val_data.samples.image_path) == val
    datamodule.setup()  # a second setup gives the same split, not a split of the split
    assert set(datamodule.val_data.samples.image_path) == val
    assert len(datamodule.train_data) == 4


def test_no_validation_split(mvtec_root: Path) -> None:
    datamodule = MVTecLayout(mvtec_root, "part", val_split_ratio=0)
    datamodule.setup()
    assert not hasattr(datamodule, "val_data")
    assert datamodule.val_dataloader() == []
    assert len(datamodule.train_data) == 5


class _CountingModule(L.LightningModule):
    """A minimal LightningModule that counts the images it sees per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen = {"train": 0, "val": 0, "test": 0}

    def training_step(self, batch: ImageBatch, _index: int) -> torch.Tensor:
        self.seen["train"] += len(batch.image)
        return self.layer(batch.image.mean(dim=(2, 3))).mean()

    def validation_step(self, batch: ImageBatch, _index: int) -> None:
        self.seen["val"] += len(batch.image)

    def test_step(self, batch: ImageBatch, _index: int) -> None:
        self.seen["test"] += len(batch.image)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("ratio", "n_val"), [(0.0, 0), (0.4, 2)])
def test_lightning_trainer_runs_with_and_without_validation(mvtec_root: Path, ratio: float, n_val: int) -> None:
    datamodule = MVTecLayout(mvtec_root, "part", image_size=(16, 16), val_split_ratio=ratio)
    module = _CountingModule()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    assert module.seen == {"train": 5 - n_val, "val": n_val, "test": 4}


def test_limits_are_deterministic_and_keep_both_labels(tmp_path: Path) -> None:
    for index in range(12):
        write(tmp_path / "normal" / f"n{index:02d}.png", gray(8, 8))
        write(tmp_path / "bad" / f"b{index:02d}.png", gray(8, 8))
    write(tmp_path / "ok" / "t0.png", gray(8, 8))
    write(tmp_path / "ok" / "t1.png", gray(8, 8))

    def build(seed: int) -> FolderLayout:
        datamodule = FolderLayout(
            tmp_path / "normal",
            tmp_path / "bad",
            normal_test_dir=tmp_path / "ok",
            train_limit=5,
            test_limit=4,
            val_split_ratio=0,
            seed=seed,
        )
        datamodule.setup()
        return datamodule

    datamodule = build(0)
    assert len(datamodule.train_data) == 5
    assert len(datamodule.test_data) == 4
    labels = datamodule.test_data.samples.label_index.tolist()
    assert 0 in labels and 1 in labels  # 2 of 14 test images are normal: a plain random pick may miss them
    assert datamodule.test_data.samples.attrs["task"] == "classification"
    assert datamodule.category == "normal"
    assert list(build(0).test_data.samples.image_path) == list(datamodule.test_data.samples.image_path)
    assert list(build(0).train_data.samples.image_path) == list(datamodule.train_data.samples.image_path)
    item = datamodule.test_data[0]
    assert item.gt_mask is None  # classification: no masks to report


def test_datamodule_rejects_bad_tables_and_options(mvtec_root: Path) -> None:
    samples = mvtec_samples(mvtec_root, "part")
    with raises_one_line("lacks columns"):
        DistilladDataModule(samples.drop(columns=["mask_path"]))
    unmasked = samples.copy()
    unmasked.loc[unmasked.label_index == 1, "mask_path"] = ""
    with raises_one_line("has no mask_path"):
        DistilladDataModule(unmasked)
    with raises_one_line("val_split_ratio"):
        DistilladDataModule(samples, val_split_ratio=1.0)
    with raises_one_line("test_limit"):
        DistilladDataModule(samples, test_limit=0)


# ------------------------------------------------------------------------------------------ real data


@needs_shared_data
def test_real_mtd_samples() -> None:
    samples = mvtec_samples(SHARED_DATA, "mtd")
    assert (samples.split == "train").sum() == 761
    test = samples[samples.split == "test"]
    assert len(test) == 583
    assert (test.label_index == 0).sum() == 191
    defective = test[test.label_index == 1]
    assert len(defective) == 392
    assert defective.label.value_counts().to_dict() == {
        "blowhole": 115,
        "uneven": 103,
        "break": 85,
        "crack": 57,
        "fray": 32,
    }
    assert samples.attrs["task"] == "segmentation"
    for image, mask in zip(defective.image_path, defective.mask_path, strict=True):
        assert Path(mask).stem == Path(image).stem + "_mask"
        assert Path(mask).parent.name == Path(image).parent.name


@needs_shared_data
def test_real_weld_samples_and_item() -> None:
    samples = mvtec_samples(SHARED_DATA, "weld")
    assert (samples.split == "train").sum() == 37
    assert (samples.split == "test").sum() == 128
    datamodule = MVTecLayout(SHARED_DATA, "weld", image_size=(64, 64), test_limit=3, eval_batch_size=3)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    assert tuple(batch.image.shape) == (3, 3, 64, 64)
    assert batch.gt_mask[batch.gt_label].any()
