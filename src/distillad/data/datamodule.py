"""anomalib datamodules over distillad sample tables.

:class:`DistilladDataModule` serves a sample table (see :mod:`distillad.data.samples`) to anomalib and
Lightning. It differs from anomalib's own datamodules where those are wrong for us:

* images and masks are read with OpenCV (:mod:`distillad.data.io`): any suffix, 16-bit, float TIFF;
* masks stored at another resolution are resized to their image (nearest neighbour);
* the test split is exactly the test folder: no test image is moved into validation and no
  training image is moved into test;
* the validation split is a seeded, held-out part of the normal *training* images (used later to
  calibrate the decision threshold), at least one image whenever ``val_split_ratio > 0``;
* every split is resized to ``image_size`` so images of mixed sizes batch together even without a
  model (anomalib appends the model's own ``Resize`` when a trainer is attached; they agree).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anomalib import TaskType
from anomalib.data import ImageItem
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, ValSplitMode
from torch.utils.data import DataLoader, RandomSampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import Resize, Transform
from tqdm.auto import tqdm

from distillad.data.io import check_readable, mask_files, read_image, read_masks
from distillad.data.samples import SAMPLE_COLUMNS, folder_samples, mvtec_samples
from distillad.errors import DistilladError
from distillad.generators import GeneratorsPickleAsBytes
from distillad.synthesis import KeyedDataset, SynthesisBatchSampler, SynthesizingCollate

#: Training-loader workers are forked where that is safe: a spawned worker imports torch and the whole stack
#: again (about 10 s on 2 cores), and benchmark cells and DDP ranks run in spawned processes, whose loaders would
#: otherwise spawn too.
WORKER_START_METHOD = "fork" if sys.platform == "linux" else None


def one_pass(loader: DataLoader, description: str) -> Iterator:
    """The batches of one pass over ``loader`` behind a progress bar. ``tqdm.auto`` calls ``iter()`` on an iterable
    and its loop another time: a second set of workers, and with persistent ones a prefetched, seeded pass."""
    return tqdm(iter(loader), total=len(loader), desc=description, unit="batch", leave=False)


class SampleTableDataset(AnomalibDataset):
    """An anomalib dataset over the rows of one split of a sample table.

    Items are :class:`anomalib.data.ImageItem` with ``image`` a float32 ``(3, H, W)`` tensor in
    ``[0, 1]`` and, for segmentation tables, ``gt_mask`` an ``(H, W)`` mask at the image's size (all
    zero for normal images). For classification tables ``gt_mask`` is ``None``, as in anomalib.

    Args:
        samples: Rows of a sample table; ``samples.attrs["task"]`` must be set.
        augmentations: Transform applied to ``(image, mask)`` (segmentation) or ``image``.
        category: Category name reported to anomalib.
    """

    def __init__(
        self,
        samples: pd.DataFrame,
        augmentations: Transform | None = None,
        category: str | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.samples = samples.reset_index(drop=True)
        if category is not None:
            self.category = category

    def __getitem__(self, index: int) -> ImageItem:
        """Read, augment and return the item at ``index``."""
        row = self.samples.iloc[index]
        label_index = int(row.label_index)
        array = read_image(row.image_path)
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255.0))

        gt_mask = None
        if self.task == TaskType.SEGMENTATION:
            if label_index == LabelName.ABNORMAL:
                mask = torch.from_numpy(read_masks(row.mask_path, size=array.shape[:2]))
            else:
                mask = torch.zeros(array.shape[:2], dtype=torch.uint8)
            gt_mask = tv_tensors.Mask(mask)

        if self.augmentations:
            if gt_mask is None:
                image = self.augmentations(image)
            else:
                image, gt_mask = self.augmentations(image, gt_mask)

        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=torch.tensor(label_index),
            image_path=str(row.image_path),
            mask_path=str(row.mask_path),
        )


def _check_samples(samples: pd.DataFrame) -> None:
    """Reject a sample table that the datamodule cannot serve, with a one-line error."""
    missing = [column for column in SAMPLE_COLUMNS if column not in samples.columns]
    if missing:
        raise DistilladError(f"sample table lacks columns {missing}; build it with mvtec_samples or folder_samples")
    task = samples.attrs.get("task")
    if task not in ("classification", "segmentation"):
        raise DistilladError(f"sample table has attrs['task']={task!r}; set it to 'classification' or 'segmentation'")
    if not (samples.split == "train").any():
        raise DistilladError("empty train set: the sample table has no rows with split 'train'; add training images")
    if task == "segmentation":
        unmasked = samples[(samples.label_index == LabelName.ABNORMAL) & (samples.mask_path == "")]
        if len(unmasked):
            raise DistilladError(
                f"abnormal image {unmasked.image_path.iloc[0]} has no mask_path in a segmentation table; add its mask"
            )


def _allocate(limit: int, sizes: list[int]) -> list[int]:
    """Split ``limit`` (less than ``sum(sizes)``) over groups in proportion to their sizes.

    Every group gets at least one while ``limit`` allows (largest groups first); the rest goes, one at
    a time, to the group furthest below its proportional share.
    """
    counts = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i])[:limit]:
        counts[index] = 1
    total = sum(sizes)
    for _ in range(limit - sum(counts)):
        open_groups = [i for i in range(len(sizes)) if counts[i] < sizes[i]]
        counts[max(open_groups, key=lambda i: sizes[i] * limit / total - counts[i])] += 1
    return counts


def _subset(samples: pd.DataFrame, limit: int, seed: int, stratify: bool) -> pd.DataFrame:
    """A seeded subset of at most ``limit`` rows, in the table's order.

    With ``stratify`` the rows are allotted per ``label_index`` (see :func:`_allocate`), so a limited
    test split still holds normal and abnormal images.
    """
    if limit >= len(samples):
        return samples
    labels = samples.label_index.to_numpy()
    groups = [np.flatnonzero(labels == label) for label in np.unique(labels)] if stratify else [np.arange(len(labels))]
    rng = np.random.default_rng(seed)
    counts = _allocate(limit, [len(group) for group in groups])
    picked = [group[rng.permutation(len(group))[:count]] for group, count in zip(groups, counts, strict=True)]
    return samples.iloc[np.sort(np.concatenate(picked))]


class DistilladDataModule(GeneratorsPickleAsBytes, AnomalibDataModule):
    """anomalib/Lightning datamodule over a sample table.

    Args:
        samples: Sample table from :func:`~distillad.data.samples.mvtec_samples`,
            :func:`~distillad.data.samples.folder_samples` or built by hand with the same columns and
            ``attrs["task"]``.
        image_size: ``(height, width)`` every image (and mask) is resized to.
        train_batch_size: Batch size of the training loader.
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: Dataloader worker processes.
        val_split_ratio: Fraction of the normal training images held out (seeded) as the validation
            split, which calibrates the decision threshold. At least one image is held out when the
            ratio is positive and there are two or more training images. ``0`` means no validation
            split; ``val_dataloader`` then returns no loaders and Lightning skips validation. A table
            with rows of split ``"val"`` (a dataset's own held-out normal images) uses those instead.
        seed: Seed of the validation split and of the ``*_limit`` subsets.
        train_limit: Use only this many training images (seeded subset, taken before the validation
            split) — for tests and quick runs.
        test_limit: Use only this many test images (seeded, stratified by label so both normal and
            abnormal images remain) — for tests and quick runs.
        category: Category name; anomalib uses it in result paths.
    """

    def __init__(
        self,
        samples: pd.DataFrame,
        image_size: tuple[int, int] = (256, 256),
        train_batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        val_split_ratio: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        test_limit: int | None = None,
        category: str = "",
    ) -> None:
        _check_samples(samples)
        if len(image_size) != 2 or min(image_size) < 1:
            raise DistilladError(f"image_size {image_size} is invalid; pass (height, width) with positive integers")
        if not 0.0 <= val_split_ratio < 1.0:
            raise DistilladError(f"val_split_ratio {val_split_ratio} is outside [0, 1); pass e.g. 0.1, or 0 for none")
        for option, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
            if limit is not None and limit < 1:
                raise DistilladError(f"{option} {limit} is invalid; pass a positive number of images or None")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augmentations=Resize(self.image_size, antialias=True),
            val_split_mode=(ValSplitMode.FROM_DIR if (samples.split == "val").any()
                            else ValSplitMode.FROM_TRAIN if val_split_ratio > 0 else ValSplitMode.NONE),
            seed=seed,
        )
        self.val_split_ratio = float(val_split_ratio)  # the base class turns 0 into 0.5
        self.train_limit = train_limit
        self.test_limit = test_limit
        self._samples = samples
        self.category = category
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self._val_loader: DataLoader | None = None

    @property
    def samples(self) -> pd.DataFrame:
        """The full sample table (before limits and the validation split)."""
        return self._samples

    def _setup(self, _stage: str | None = None) -> None:
        """Build the train and test datasets from the table, applying ``train_limit``/``test_limit``."""
        self._val_loader = None
        train = self._samples[self._samples.split == "train"]
        test = self._samples[self._samples.split == "test"]
        if self.train_limit is not None:
            train = _subset(train, self.train_limit, self.seed, stratify=False)
        if self.test_limit is not None:
            test = _subset(test, self.test_limit, self.seed, stratify=True)
        self.train_data = SampleTableDataset(train, category=self.category)
        self.test_data = SampleTableDataset(test, category=self.category)

    def _create_test_split(self) -> None:
        """Keep the test split exactly as the table has it.

        anomalib's version drops the normal test images unless ``test_split_mode`` is ``from_dir`` and
        may move training images into test; distillad never re-splits the test folder.
        """

    def _create_val_split(self) -> None:
        """The dataset's own held-out normal images (split ``"val"``: MVTec LOCO's and MVTec AD 2's
        ``validation/good``) when it has them, else ``val_split_ratio`` of the training images (seeded)."""
        if hasattr(self, "val_data"):
            del self.val_data  # a previous setup's split; rebuilt below from the fresh train set
        held_out = self._samples[self._samples.split == "val"]
        if len(held_out):
            self.val_data = SampleTableDataset(held_out, category=self.category)
            return
        count = len(self.train_data)
        if self.val_split_ratio <= 0 or count < 2:
            return
        n_val = min(max(1, round(count * self.val_split_ratio)), count - 1)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_data = self.train_data.subsample(sorted(order[:n_val]))
        self.train_data = self.train_data.subsample(sorted(order[n_val:]))

    def check_files(self) -> None:
        """Decode every image of the splits, and the mask of every anomalous test image, once; all unreadable
        files are reported in one error (:func:`~distillad.data.io.check_readable`)."""
        files = []
        for dataset in (getattr(self, name, None) for name in ("train_data", "val_data", "test_data")):
            if dataset is None:
                continue
            for row in dataset.samples.itertuples():
                files.append((row.image_path, "image"))
                if int(row.label_index) == LabelName.ABNORMAL:
                    files.extend((path, "mask") for path in mask_files(row.mask_path))
        check_readable(files)

    def train_dataloader(self) -> DataLoader:
        """The training images in a new order every epoch, drawn from the datamodule's own generator.

        anomalib's loader shuffles with torch's global generator, which Lightning draws from at points that
        differ between a fresh and a resumed run (a resumed run builds its first iterator before any hook can
        restore the global state), so a resumed run saw other batches. This generator's state travels in
        checkpoints (:meth:`state_dict`), so a resumed run shuffles its next epochs exactly as an
        uninterrupted one.

        A model with a ``synthesis_plan`` gets its anomalies made on the data side, seeded per batch from the same
        generator (:mod:`distillad.synthesis.workers`): in the workers, overlapped with the training step, when
        there are any. Workers persist across epochs: starting them anew for every epoch's loader (and DMDD's MSN
        pass) made the main process copy its memory pages after each fork; with that and a second set per pass
        (:func:`one_pass`), DMDD at 256 px trained at 0.95 training images/s with 2 workers against 2.85 without,
        now 2.64 against 2.81 (``benchmarks/results/train_speed_workers.md``).
        """
        sampler = RandomSampler(self.train_data, generator=self.shuffle_generator)
        collate = self.external_collate_fn or self.train_data.collate_fn
        workers = {**self._worker_options(),
                   "generator": torch.Generator().manual_seed(self.seed)}  # seeds the workers' global RNGs only
        plan = getattr(getattr(self.trainer, "lightning_module", None), "synthesis_plan", None)
        if plan is None:
            return DataLoader(self.train_data, batch_size=self.train_batch_size, sampler=sampler, collate_fn=collate,
                              **workers)
        batches = SynthesisBatchSampler(sampler, self.train_batch_size, drop_last=False,
                                        generator=self.shuffle_generator, plan=plan)
        return DataLoader(KeyedDataset(self.train_data), batch_sampler=batches,
                          collate_fn=SynthesizingCollate(collate, plan), **workers)

    def __getstate__(self) -> dict:
        """Without the validation loader: its live workers do not pickle (DDP spawns copies of the datamodule)."""
        return {**super().__getstate__(), "_val_loader": None}

    def _worker_options(self) -> dict:
        """Workers that persist across passes, forked where that is safe (:data:`WORKER_START_METHOD`)."""
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                "multiprocessing_context": WORKER_START_METHOD if self.num_workers > 0 else None}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the datamodule: the shuffling generator's state."""
        return {"shuffle_generator": self.shuffle_generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the shuffling sequence of the run that wrote the checkpoint."""
        if "shuffle_generator" in state_dict:
            self.shuffle_generator.set_state(state_dict["shuffle_generator"])

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loader, or an empty list (Lightning then skips validation) without a split.

        One loader for the whole run, its workers kept alive: the per-epoch synthetic validation iterates it
        every epoch, and new workers for each pass made the main process copy its memory pages after every fork.
        """
        if not hasattr(self, "val_data"):
            return []
        if self._val_loader is None:
            self._val_loader = DataLoader(self.val_data, batch_size=self.eval_batch_size, shuffle=False,
                                          collate_fn=self.external_collate_fn or self.val_data.collate_fn,
                                          **self._worker_options())
        return self._val_loader


class MVTecLayout(DistilladDataModule):
    """Datamodule for one category of a dataset in the MVTec AD folder layout.

    Reads every image suffix in :data:`~distillad.data.io.IMAGE_EXTENSIONS` and never downloads;
    see :func:`~distillad.data.samples.mvtec_samples` for the layout and the errors.

    Args:
        root: Folder holding the category folders.
        category: Category folder name.
        image_size, train_batch_size, eval_batch_size, num_workers, val_split_ratio, seed, train_limit,
        test_limit: As in :class:`DistilladDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        image_size: tuple[int, int] = (256, 256),
        train_batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        val_split_ratio: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        test_limit: int | None = None,
    ) -> None:
        self.root = Path(root)
        super().__init__(
            mvtec_samples(root, category),
            image_size=image_size,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split_ratio=val_split_ratio,
            seed=seed,
            train_limit=train_limit,
            test_limit=test_limit,
            category=category,
        )


class FolderLayout(DistilladDataModule):
    """Datamodule over plain folders of images; see :func:`~distillad.data.samples.folder_samples`.

    Without ``normal_test_dir`` the test split holds only the abnormal images (nothing of
    ``normal_dir`` is moved to test).

    Args:
        normal_dir: Normal training images.
        abnormal_dir: Abnormal test images.
        mask_dir: Masks of the abnormal images (``<stem>_mask.<ext>`` or ``<stem>.<ext>``).
        normal_test_dir: Normal test images.
        category: Category name for anomalib's result paths; defaults to ``normal_dir``'s folder name.
        image_size, train_batch_size, eval_batch_size, num_workers, val_split_ratio, seed, train_limit,
        test_limit: As in :class:`DistilladDataModule`.
    """

    def __init__(
        self,
        normal_dir: str | Path,
        abnormal_dir: str | Path | None = None,
        mask_dir: str | Path | None = None,
        normal_test_dir: str | Path | None = None,
        category: str | None = None,
        image_size: tuple[int, int] = (256, 256),
        train_batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        val_split_ratio: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        test_limit: int | None = None,
    ) -> None:
        super().__init__(
            folder_samples(normal_dir, abnormal_dir, mask_dir, normal_test_dir),
            image_size=image_size,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split_ratio=val_split_ratio,
            seed=seed,
            train_limit=train_limit,
            test_limit=test_limit,
            category=category if category is not None else Path(normal_dir).name,
        )
