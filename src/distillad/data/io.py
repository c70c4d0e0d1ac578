"""Image and mask reading with OpenCV.

anomalib reads images with PIL, which clips 16-bit images and fails on some TIFF variants; these
readers decode every file with ``cv2.imdecode(..., cv2.IMREAD_UNCHANGED)`` (via ``np.fromfile``, so
non-ASCII paths work) and normalise the result:

* images become ``uint8`` ``H x W x 3`` RGB;
* masks become ``uint8`` ``H x W`` in ``{0, 1}``.

Pixel data is used as stored: EXIF orientation tags are not applied (``IMREAD_UNCHANGED``), so an
image and its mask always share the same pixel grid.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from distillad.errors import DistilladError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File suffixes recognised as images (matched case-insensitively)."""


def is_image_file(path: str | Path) -> bool:
    """Return whether ``path`` names an image file: a known suffix and not a hidden file.

    Hidden files (names starting with ``.``, such as macOS ``._x.png`` resource forks) are not
    images even when their suffix says so.
    """
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _decode(path: str | Path, kind: str) -> np.ndarray:
    """Decode ``path`` unchanged (any depth and channel count) or raise a one-line error."""
    path = Path(path)
    fix = "remove or replace the file"
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DistilladError(f"cannot read {kind} {path}: {exc.strerror or exc}; {fix}") from exc
    if buffer.size == 0:
        raise DistilladError(f"cannot read {kind} {path}: the file is empty; {fix}")
    try:
        array = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise DistilladError(f"cannot read {kind} {path}: OpenCV failed to decode it; {fix}") from exc
    if array is None or array.size == 0:
        raise DistilladError(f"cannot read {kind} {path}: not a decodable image (corrupt or unsupported); {fix}")
    return array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Map any bit depth to ``uint8``.

    * ``uint16`` is scaled over the dtype's full range, ``value // 257`` (65535 -> 255, 25700 -> 100);
      images that use only part of the range (e.g. 12-bit data in a 16-bit file) stay dark rather
      than being stretched per image.
    * other integer types are scaled the same way over their full range;
    * floating point is clipped to ``[0, 1]`` when its maximum is at most 1, otherwise divided by
      its maximum (negative values and NaN become 0).
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return (array // 257).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        scaled = (array.astype(np.float64) - info.min) * (255.0 / (float(info.max) - info.min))
        return np.floor(scaled).astype(np.uint8)
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max())
    if peak > 1.0:
        values = values / peak
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``uint8`` ``H x W x 3`` RGB.

    Grayscale becomes three equal channels, an alpha channel is dropped, OpenCV's BGR order is
    turned into RGB, and other bit depths are mapped to 8 bits (16-bit: ``value // 257``; float:
    see :func:`_to_uint8`).

    Raises:
        DistilladError: If the file cannot be read or decoded.
    """
    array = _to_uint8(_decode(path, "image"))
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels in (1, 2):  # gray, or gray + alpha
        rgb = np.repeat(array[:, :, :1], 3, axis=2)
    elif channels in (3, 4):  # BGR, or BGRA
        rgb = array[:, :, 2::-1]
    else:
        raise DistilladError(f"cannot read image {path}: {channels} channels are not supported; convert it to RGB")
    return np.ascontiguousarray(rgb)


#: Joins the mask files of one image in a sample table's ``mask_path`` (MVTec LOCO: one file per region).
MASK_SEPARATOR = os.pathsep


def mask_files(mask_path: str) -> list[str]:
    """The mask files a sample table's ``mask_path`` names (none for ``""``)."""
    return [path for path in str(mask_path).split(MASK_SEPARATOR) if path]


def read_masks(mask_path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """The union of the masks that ``mask_path`` names (:func:`mask_files`), as :func:`read_mask` reads one."""
    files = mask_files(mask_path)
    union = read_mask(files[0], size)
    for path in files[1:]:
        union |= read_mask(path, size if size is not None else union.shape)
    return union


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as ``uint8`` ``H x W`` in ``{0, 1}``.

    Any nonzero pixel (in any colour channel, at any bit depth) is 1; an alpha channel is ignored.

    Args:
        path: Mask file.
        size: ``(height, width)`` to resize to with nearest-neighbour interpolation, e.g. the size of
            the image the mask belongs to. ``None`` keeps the stored size.

    Raises:
        DistilladError: If the file cannot be read or decoded.
    """
    array = _decode(path, "mask")
    if array.ndim == 3:
        channels = array.shape[2]
        colour = array[:, :, :1] if channels in (1, 2) else array[:, :, :3]
        binary = np.any(colour != 0, axis=2)
    else:
        binary = array != 0
    mask = binary.astype(np.uint8)
    if size is not None and tuple(mask.shape) != tuple(size):
        height, width = size
        mask = cv2.resize(mask, (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
    return mask


def check_readable(files: Iterable[tuple[str | Path, str]], threads: int = 4) -> None:
    """Decode every ``(path, kind)`` once (``kind``: ``"image"`` or ``"mask"``) and report every file that fails in
    one :class:`DistilladError`, so a bad file is found before training, not in the middle of it.

    OpenCV releases the GIL while decoding, so ``threads`` decode in parallel.
    """

    def failure(item: tuple[str | Path, str]) -> str | None:
        try:
            _decode(*item)
        except DistilladError as error:
            return str(error).removeprefix("cannot read ").removesuffix("; remove or replace the file")
        return None

    with ThreadPoolExecutor(threads) as pool:
        failures = [reason for reason in pool.map(failure, list(files)) if reason is not None]
    if failures:
        shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
        msg = f"{len(failures)} file(s) cannot be read: {shown}; remove or replace them and rerun"
        raise DistilladError(msg)
