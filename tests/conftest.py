"""Shared pytest fixtures: the real datasets in ../shared/data and a small image loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread by default (override with DISTILLAD_TEST_THREADS=N).

    On a small shared machine, torch's OpenMP threads stall at every parallel region when another process
    holds a core: measured on 2 busy cores, a tf_efficientnet_lite0 forward of 10 images at 64 px took 2.2 s
    with 2 threads and 0.06 s with 1.
    """
    del config
    torch.set_num_threads(int(os.environ.get("DISTILLAD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with the real datasets (``mtd/``, ``weld/``); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


def _load_images(paths: list[Path], size: int) -> torch.Tensor:
    import cv2

    from distillad.data import read_image

    arrays = [cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture
def load_images():
    """``load_images(paths, size)``: images read with :func:`distillad.data.read_image`, resized to
    ``size`` x ``size``, as a float (N, 3, H, W) tensor in [0, 1]."""
    return _load_images


@pytest.fixture
def fit_weld_subset(shared_data: Path, tmp_path: Path):
    """``fit_weld_subset(model, epochs=1, **options)``: train and test ``model`` on a tiny weld subset at 64 px
    through :func:`distillad.pipeline.fit`; returns ``(metrics, run_dir)``."""
    from distillad.pipeline import RunConfig, fit

    def fit_subset(model: str, epochs: int = 1, **options) -> tuple[dict, Path]:
        config = RunConfig(model=model, model_options=options,
                           data={"kind": "mvtec", "root": str(shared_data), "category": "weld"},
                           image_size=64, epochs=epochs, batch_size=4)
        run_dir = tmp_path / f"{model}-run"
        return fit(config, run_dir, train_limit=8, test_limit=8, heatmaps=False), run_dir

    return fit_subset
