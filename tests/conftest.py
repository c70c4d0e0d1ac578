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
    # Foreground masks go to a fresh folder per session, not the user's cache (tests must not read old ones).
    import tempfile

    os.environ["DISTILLAD_CACHE_DIR"] = tempfile.mkdtemp(prefix="distillad-cache-")


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


def _fit_weld(shared_data: Path, run_dir: Path, model: str, epochs: int, options: dict) -> tuple[dict, Path]:
    from distillad.pipeline import RunConfig, fit

    config = RunConfig(model=model, model_options=options,
                       data={"kind": "mvtec_ad", "root": str(shared_data), "category": "weld"},
                       image_size=64, epochs=epochs, batch_size=4)
    return fit(config, run_dir, train_limit=8, test_limit=8, heatmaps=False), run_dir


@pytest.fixture
def fit_weld_subset(shared_data: Path, tmp_path: Path):
    """``fit_weld_subset(model, epochs=1, **options)``: train and test ``model`` on a tiny weld subset at 64 px
    (8 training, 8 test images) through :func:`distillad.pipeline.fit`; returns ``(metrics, run_dir)``."""

    def fit_subset(model: str, epochs: int = 1, **options) -> tuple[dict, Path]:
        return _fit_weld(shared_data, tmp_path / f"{model}-run", model, epochs, options)

    return fit_subset


@pytest.fixture(scope="session")
def shared_weld_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """``shared_weld_run(model, epochs=1, **options)``: as ``fit_weld_subset``, but trained once per session for
    the same arguments; tests must not change the run directory."""
    runs: dict[tuple, tuple[dict, Path]] = {}

    def get(model: str, epochs: int = 1, **options) -> tuple[dict, Path]:
        key = (model, epochs, tuple(sorted(options.items())))
        if key not in runs:
            runs[key] = _fit_weld(shared_data, tmp_path_factory.mktemp(model) / "run", model, epochs, options)
        return runs[key]

    return get
