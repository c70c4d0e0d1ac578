"""Shared pytest fixtures: the real datasets in ../shared/data and a small image loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
