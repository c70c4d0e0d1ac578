"""Texture sources: what fills a synthetic anomaly.

DRAEM (Sec. 3.3) and, after it, DMDD (Sec. 3.4.1, Fig. 5) and AAND ("Anomaly synthesis") fill the
Perlin mask with an image from the Describable Textures Dataset (DTD). :class:`FolderTextures` reads
such a folder when the user has one. These machines cannot download DTD, so :class:`BuiltinTextures`
(the default, DESIGN "Anomaly synthesis") needs no files at all: procedurally coloured patterns
(Perlin noise, smooth random fields, stripes, checkerboards, gradients) and augmented crops of the
other training images in the batch. A run never fails for want of DTD.

Every source has ``sample(height, width, generator, pool) -> Tensor (3, H, W) in [0, 1]`` on the CPU
and draws all randomness from ``generator``.
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from distillad.errors import DistilladError
from distillad.synthesis._random import randint, uniform
from distillad.synthesis.perlin import perlin_noise

#: File suffixes :class:`FolderTextures` reads (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Probability that :class:`BuiltinTextures` uses a crop of a batch image when a pool is given.
POOL_PROBABILITY = 0.5


class TextureSource(Protocol):
    """Anything that yields texture patches for anomaly synthesis."""

    def sample(
        self, height: int, width: int, generator: torch.Generator, pool: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """A texture, float (3, H, W) in [0, 1] on the CPU; ``pool`` is the other images of the current batch, each (3, h, w)."""
        ...


def _colour(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(3, 1, 1, generator=generator)


def _two_colours(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Map a field in [0, 1], shape (H, W), onto the segment between two random colours."""
    low, high = _colour(generator), _colour(generator)
    return low + (high - low) * values.unsqueeze(0)


def _rotated_coordinates(height: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates in a frame rotated by a random angle: (along, across), each (H, W)."""
    angle = uniform(generator, 0.0, math.pi)
    rows = torch.arange(height, dtype=torch.float32).view(-1, 1)
    cols = torch.arange(width, dtype=torch.float32).view(1, -1)
    along = cols * math.cos(angle) + rows * math.sin(angle)
    across = -cols * math.sin(angle) + rows * math.cos(angle)
    return along, across


def _normalise(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def coloured_perlin(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Perlin noise spread between two random colours."""
    return _two_colours(_normalise(perlin_noise(height, width, generator)), generator)


def smooth_field(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """An independent smooth random field per channel (coloured blobs): a coarse grid upsampled."""
    grid = torch.rand(1, 3, randint(generator, 2, 17), randint(generator, 2, 17), generator=generator)
    field = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0]
    return field.clamp(0.0, 1.0)


def stripes(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Sinusoidal stripes at a random angle and period, sharpened to hard stripes half the time."""
    along, _ = _rotated_coordinates(height, width, generator)
    period = uniform(generator, 4.0, max(5.0, max(height, width) / 4))
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * along / period + uniform(generator, 0.0, 2 * math.pi))
    if uniform(generator) < 0.5:
        wave = (wave > 0.5).float()
    return _two_colours(wave, generator)


def checkerboard(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A checkerboard with a random cell size, rotated by a random angle."""
    along, across = _rotated_coordinates(height, width, generator)
    cell = uniform(generator, 3.0, max(4.0, min(height, width) / 4))
    cells = (torch.floor(along / cell) + torch.floor(across / cell)) % 2
    return _two_colours(cells, generator)


def gradient(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A linear colour gradient in a random direction."""
    along, _ = _rotated_coordinates(height, width, generator)
    return _two_colours(_normalise(along), generator)


#: The procedural patterns of :class:`BuiltinTextures`, by name.
PROCEDURAL_TEXTURES: dict[str, Callable[[int, int, torch.Generator], torch.Tensor]] = {
    "perlin": coloured_perlin,
    "smooth": smooth_field,
    "stripes": stripes,
    "checker": checkerboard,
    "gradient": gradient,
}


def crop_and_augment(image: np.ndarray, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop, rotation by a multiple of 90 degrees, flips, resize, colour jitter and inversion.

    ``image`` is float32 (h, w, 3) in [0, 1]. The crop keeps 50-100 % of each side. Jitter: brightness
    x[0.7, 1.3], contrast x[0.6, 1.6] about the mean, per-channel gain x[0.8, 1.2]; inverted with
    probability 0.25 (a milder stand-in for DRAEM's three random imgaug augmenters).
    """
    rows, cols = image.shape[:2]
    crop_rows = max(1, round(rows * uniform(generator, 0.5, 1.0)))
    crop_cols = max(1, round(cols * uniform(generator, 0.5, 1.0)))
    top, left = randint(generator, 0, rows - crop_rows + 1), randint(generator, 0, cols - crop_cols + 1)
    patch = np.rot90(image[top : top + crop_rows, left : left + crop_cols], k=randint(generator, 0, 4))
    if uniform(generator) < 0.5:
        patch = patch[:, ::-1]
    if uniform(generator) < 0.5:
        patch = patch[::-1]
    shrinking = patch.shape[0] > height or patch.shape[1] > width
    patch = cv2.resize(
        np.ascontiguousarray(patch), (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )
    texture = torch.from_numpy(patch).permute(2, 0, 1).float()
    mean = texture.mean()
    texture = (texture - mean) * uniform(generator, 0.6, 1.6) + mean
    texture = texture * uniform(generator, 0.7, 1.3) * (0.8 + 0.4 * torch.rand(3, 1, 1, generator=generator))
    texture = texture.clamp(0.0, 1.0)
    if uniform(generator) < 0.25:
        texture = 1.0 - texture
    return texture


class FolderTextures:
    """Texture images from a folder searched recursively (DTD's ``images/`` or any such folder).

    Images are read with OpenCV when sampled (nothing is held in memory) and go through
    :func:`crop_and_augment`. Raises :class:`DistilladError` if the folder is missing or holds no
    image with a suffix in :data:`IMAGE_SUFFIXES`.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise DistilladError(
                f"texture_dir {self.directory} is not a folder; point it at a folder of texture images "
                "(e.g. DTD's images/) or leave it unset to use the built-in textures"
            )
        self.paths = sorted(
            path for path in self.directory.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        )
        if not self.paths:
            raise DistilladError(
                f"texture_dir {self.directory} holds no images ({'/'.join(IMAGE_SUFFIXES)}); add texture "
                "images or leave texture_dir unset to use the built-in textures"
            )

    def sample(
        self, height: int, width: int, generator: torch.Generator, pool: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """A random crop of a random image of the folder, (3, H, W) in [0, 1]; ``pool`` is ignored."""
        path = self.paths[randint(generator, 0, len(self.paths))]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DistilladError(f"texture image {path} cannot be read; replace or delete it")
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        return crop_and_augment(rgb, height, width, generator)


class BuiltinTextures:
    """Textures that need no files: procedural patterns and augmented crops of batch images.

    With a non-empty ``pool`` (the other images of the current training batch: the synthesizer leaves out the
    image being corrupted, whose own crop would paste normal content of that image), a crop of one of its images is
    used with probability :data:`POOL_PROBABILITY`; otherwise one of :data:`PROCEDURAL_TEXTURES`, chosen
    uniformly. A DTD-style folder (``texture_dir``, as the papers use) replaces all of this.
    """

    def sample(
        self, height: int, width: int, generator: torch.Generator, pool: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """A texture, (3, H, W) in [0, 1]; ``pool`` is optional: images (3, h, w) in [0, 1]."""
        if pool is not None and len(pool) > 0 and uniform(generator) < POOL_PROBABILITY:
            source = pool[randint(generator, 0, len(pool))].detach().float().cpu().clamp(0.0, 1.0)
            return crop_and_augment(source.permute(1, 2, 0).numpy(), height, width, generator)
        names = sorted(PROCEDURAL_TEXTURES)
        return PROCEDURAL_TEXTURES[names[randint(generator, 0, len(names))]](height, width, generator)


def make_texture_source(texture_dir: str | Path | None) -> TextureSource:
    """:class:`FolderTextures` for a given folder, else :class:`BuiltinTextures`."""
    return BuiltinTextures() if texture_dir is None else FolderTextures(texture_dir)
