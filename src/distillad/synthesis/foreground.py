"""Foreground masks that keep synthetic anomalies on the object.

- ``grabcut``: DMDD's Foreground-aware Anomaly Synthesis (FAS, Sec. 3.4.1, Fig. 5) extracts the
  foreground M_fore with GrabCut (Rother et al., 2004). The paper gives no parameters; here GrabCut is
  initialised with a rectangle inset :data:`GRABCUT_INSET` of each side from the border (object-centric
  images) and runs :data:`GRABCUT_ITERATIONS` iterations; foreground = definite | probable foreground.
  For speed (GrabCut takes 0.3-2 s for one 256 px image on a CPU core) it runs on a copy whose longer
  side is at most :data:`GRABCUT_MAX_SIDE` and the mask is resized back. GrabCut learns the
  background's colours from the strip outside the rectangle, so it fails on an object that fills the
  frame (it then finds almost nothing and the fallback below gives the whole image).
  The rectangle only initialises GrabCut, so the thin strip outside it is always background; where the
  object reaches the rectangle's edge it is extended straight across that strip to the image border
  (objects that fill the frame, like the welds in ``data/weld``, stay whole).
- ``threshold``: AAND ("Anomaly synthesis"; following Yao et al., ICCV 2023 / CVPR 2023) intersects the
  Perlin mask with a grayscale binary threshold. Here: Gaussian blur, Otsu's threshold, polarity chosen
  so that the foreground is the class over-represented in the central half of the image relative to the
  image border (a background surrounds the object; an object may still touch the border, as the welds
  do), then a morphological opening and closing.
- ``none``: the whole image (right for texture categories).
- ``auto`` (AAND's default; resolved once per category by :func:`texture_or_object`): ``none`` for textures and
  ``threshold`` for objects on a background. The AAND authors choose per MVTec/VisA category by hand (threshold 0,
  i.e. the whole image, for the five textures); here the training images decide, through Otsu's separability
  (Otsu 1979: between-class over total grey-level variance at Otsu's threshold). A unimodal histogram, as a
  texture's, gives about 2/pi = 0.64 (the value for a Gaussian); two well-separated classes, an object and its
  background, approach 1. Measured at 256 px over all training images: mtd (magnetic tile surfaces, a texture)
  median 0.66 (0.45-0.77, 761 images), weld (bright welds on black) 0.96 (0.90-0.99, 37 images); the cut is
  :data:`OBJECT_SEPARABILITY`, half-way. Thresholding a texture splits it along its illumination gradient instead (Otsu
  marked 39-89 % of each mtd tile).

Fallback (DESIGN "Anomaly synthesis"): a foreground that covers less than :data:`MIN_FRACTION` or more
than :data:`MAX_FRACTION` of the image is replaced by the whole image. 2 % keeps genuinely small objects
(an MVTec screw covers a few per cent of its image) while discarding segmentation failures; above 95 %
restricting to the foreground changes nothing useful.

Foregrounds are computed once per training image and cached by :class:`ForegroundCache`, in memory and on
disk, so a second run or a resumed one does not run GrabCut again.
"""

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from distillad.errors import DistilladError

#: Fraction of each side between the image border and GrabCut's initial rectangle.
GRABCUT_INSET = 0.05
#: GrabCut iterations.
GRABCUT_ITERATIONS = 5
#: GrabCut runs on a copy of the image whose longer side is at most this many pixels.
GRABCUT_MAX_SIDE = 128
#: Otsu separability (median over a category's training images) from which ``auto`` picks ``threshold``.
OBJECT_SEPARABILITY = 0.8
#: Training images ``auto`` looks at, spread evenly over the training set.
AUTO_SAMPLE_IMAGES = 16
#: Foregrounds smaller than this fraction of the image fall back to the whole image.
MIN_FRACTION = 0.02
#: Foregrounds larger than this fraction of the image fall back to the whole image.
MAX_FRACTION = 0.95


def _odd_kernel(height: int, width: int) -> int:
    """An odd kernel size of about 1/64 of the shorter side, at least 3."""
    return max(3, round(min(height, width) / 64)) | 1


def grabcut_foreground(image: np.ndarray) -> np.ndarray:
    """DMDD's FAS foreground: GrabCut from an inset rectangle; uint8 RGB (H, W, 3) -> bool (H, W).

    OpenCV's GrabCut seeds its GMMs with k-means++ from OpenCV's global RNG; that RNG is reseeded to 0
    first so the foreground of an image depends on the image alone.
    """
    full_height, full_width = image.shape[:2]
    factor = min(1.0, GRABCUT_MAX_SIDE / max(full_height, full_width))
    if factor < 1.0:
        size = (max(1, round(full_width * factor)), max(1, round(full_height * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    height, width = image.shape[:2]
    inset_rows, inset_cols = max(1, round(height * GRABCUT_INSET)), max(1, round(width * GRABCUT_INSET))
    if height - 2 * inset_rows < 2 or width - 2 * inset_cols < 2:
        return np.ones((full_height, full_width), dtype=bool)
    labels = np.zeros((height, width), dtype=np.uint8)
    rectangle = (inset_cols, inset_rows, width - 2 * inset_cols, height - 2 * inset_rows)
    cv2.setRNGSeed(0)
    cv2.grabCut(
        np.ascontiguousarray(image),
        labels,
        rectangle,
        np.zeros((1, 65), np.float64),
        np.zeros((1, 65), np.float64),
        GRABCUT_ITERATIONS,
        cv2.GC_INIT_WITH_RECT,
    )
    inside = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
    inside = inside[inset_rows : height - inset_rows, inset_cols : width - inset_cols]
    extended = cv2.copyMakeBorder(
        inside * 255, inset_rows, inset_rows, inset_cols, inset_cols, borderType=cv2.BORDER_REPLICATE
    )
    return cv2.resize(extended, (full_width, full_height), interpolation=cv2.INTER_LINEAR) > 127


def threshold_foreground(image: np.ndarray) -> np.ndarray:
    """AAND's foreground: Otsu threshold of the grayscale image; uint8 RGB (H, W, 3) -> bool (H, W)."""
    height, width = image.shape[:2]
    kernel_size = _odd_kernel(height, width)
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (kernel_size, kernel_size), 0)
    _, binary = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = binary.astype(bool)
    centre = bright[height // 4 : height - height // 4, width // 4 : width - width // 4].mean()
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]]).mean()
    foreground = bright if centre >= border else ~bright
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    cleaned = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    cleaned = cv2.morphologyEx(cleaned, cv2.MORPH_CLOSE, kernel)
    return cleaned.astype(bool)


def otsu_separability(image: np.ndarray) -> float:
    """Otsu's separability of a uint8 RGB (H, W, 3) image after the blur :func:`threshold_foreground` uses:
    between-class variance at Otsu's threshold over the total grey-level variance (0 for a flat image)."""
    height, width = image.shape[:2]
    kernel_size = _odd_kernel(height, width)
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (kernel_size, kernel_size), 0)
    _, binary = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    values, upper = gray.astype(np.float64), binary.astype(bool)
    total = values.var()
    if total == 0 or upper.all() or not upper.any():
        return 0.0
    share = upper.mean()
    return float(share * (1 - share) * (values[upper].mean() - values[~upper].mean()) ** 2 / total)


def texture_or_object(images: list[np.ndarray]) -> tuple[str, float]:
    """Mode ``auto`` resolved for a category from some of its uint8 RGB training images: ``("none", s)`` for a
    texture, ``("threshold", s)`` for objects on a background, ``s`` the median Otsu separability."""
    if not images:
        raise DistilladError("foreground 'auto' needs training images to decide between texture and object")
    separability = float(np.median([otsu_separability(image) for image in images]))
    return ("threshold" if separability >= OBJECT_SEPARABILITY else "none"), separability


def whole_image(image: np.ndarray) -> np.ndarray:
    """Mode ``none``: every pixel is foreground."""
    return np.ones(image.shape[:2], dtype=bool)


#: Foreground modes by name: ``fn(uint8 RGB (H, W, 3)) -> bool (H, W)``, before the fallback rule.
FOREGROUND_MODES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "grabcut": grabcut_foreground,
    "threshold": threshold_foreground,
    "none": whole_image,
}


def check_foreground_mode(mode: str) -> str:
    """Return ``mode`` if it is a key of :data:`FOREGROUND_MODES`, else raise :class:`DistilladError`."""
    if mode not in FOREGROUND_MODES:
        raise DistilladError(f"foreground mode {mode!r} is unknown; use one of {', '.join(sorted(FOREGROUND_MODES))}")
    return mode


def to_uint8_rgb(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) tensor in [0, 1] (any device) as a uint8 (H, W, 3) array."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    scaled = (image.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(scaled.permute(1, 2, 0).cpu().numpy())


def compute_foreground(
    image: np.ndarray, mode: str, min_fraction: float = MIN_FRACTION, max_fraction: float = MAX_FRACTION
) -> np.ndarray:
    """The foreground of a uint8 RGB (H, W, 3) image as bool (H, W), with the whole-image fallback.

    The result is never empty: an empty foreground, or one covering less than ``min_fraction`` or more
    than ``max_fraction`` of the image, becomes the whole image.
    """
    foreground = FOREGROUND_MODES[check_foreground_mode(mode)](image)
    fraction = float(foreground.mean())
    if not foreground.any() or fraction < min_fraction or fraction > max_fraction:
        return np.ones(image.shape[:2], dtype=bool)
    return foreground


def default_cache_dir() -> Path | None:
    """Where foregrounds are kept between runs: ``$DISTILLAD_CACHE_DIR`` (empty: nowhere), else
    ``$XDG_CACHE_HOME/distillad`` or ``~/.cache/distillad``; subfolder ``foregrounds``."""
    configured = os.environ.get("DISTILLAD_CACHE_DIR")
    if configured is not None:
        return Path(configured) / "foregrounds" if configured else None
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillad" / "foregrounds"


class ForegroundCache:
    """Foreground masks computed once per training image and kept (bit-packed) in memory and on disk.

    ``get(key, image)`` caches by ``(key, H, W)`` in memory (``key`` is the image's path) and, for the modes
    that cost something (``grabcut``, ``threshold``), in ``cache_dir`` under a name made of the image's pixels
    (so its content and size), the mode, the fractions and the algorithm's constants: another run, a resumed
    one or a DataLoader worker finds it there. A file that cannot be read is recomputed; a cache folder that
    cannot be written is skipped. ``compute(image)`` is the uncached variant for batches without paths.
    Raises :class:`DistilladError` for an unknown ``mode`` or fractions outside
    ``0 <= min_fraction < max_fraction <= 1``.
    """

    def __init__(self, mode: str = "grabcut", min_fraction: float = MIN_FRACTION, max_fraction: float = MAX_FRACTION,
                 cache_dir: Path | str | None = "default"):
        self.mode = check_foreground_mode(mode)
        if not 0.0 <= min_fraction < max_fraction <= 1.0:
            raise DistilladError(
                f"foreground fractions min={min_fraction}, max={max_fraction} are invalid; "
                "use 0 <= min_fraction < max_fraction <= 1"
            )
        self.min_fraction = min_fraction
        self.max_fraction = max_fraction
        self._masks: dict[tuple[str, int, int], np.ndarray] = {}
        self.cache_dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        if self.mode == "none":  # nothing to save: the whole image
            self.cache_dir = None

    def __len__(self) -> int:
        """Number of cached masks."""
        return len(self._masks)

    def whole_image_share(self) -> float | None:
        """Share of the cached foregrounds that are the whole image (segmentation failed and fell back, or mode
        ``none``); ``None`` before any was cached. Near 1 with ``grabcut`` on frame-filling images: FAS then
        changes nothing."""
        if not self._masks:
            return None
        whole = sum(bool(np.unpackbits(packed, count=height * width).all())
                    for (_, height, width), packed in self._masks.items())
        return whole / len(self._masks)

    def entries(self, keys: Sequence[str], height: int, width: int) -> dict[tuple[str, int, int], np.ndarray]:
        """The cached (bit-packed) foregrounds of the (H, W) images ``keys``, for :meth:`update` in another process."""
        wanted = ((key, int(height), int(width)) for key in keys)
        return {entry: self._masks[entry] for entry in wanted if entry in self._masks}

    def update(self, entries: dict[tuple[str, int, int], np.ndarray]) -> None:
        """Take foregrounds another process computed (a DataLoader worker's :meth:`entries`)."""
        self._masks.update(entries)

    def compute(self, image: torch.Tensor) -> torch.Tensor:
        """The foreground of a (3, H, W) image in [0, 1] as bool (H, W) on the CPU, not cached."""
        foreground = compute_foreground(to_uint8_rgb(image), self.mode, self.min_fraction, self.max_fraction)
        return torch.from_numpy(foreground)

    def get(self, key: str, image: torch.Tensor) -> torch.Tensor:
        """The foreground of ``image`` (3, H, W) in [0, 1] as bool (H, W) on the CPU, cached by (key, H, W)."""
        height, width = image.shape[-2:]
        entry = (key, int(height), int(width))
        if entry not in self._masks:
            self._masks[entry] = self._stored(image)
        unpacked = np.unpackbits(self._masks[entry], count=int(height) * int(width))
        return torch.from_numpy(unpacked.reshape(int(height), int(width)).astype(bool))

    def _file(self, pixels: np.ndarray) -> Path:
        settings = (self.mode, self.min_fraction, self.max_fraction, GRABCUT_INSET, GRABCUT_ITERATIONS,
                    GRABCUT_MAX_SIDE, pixels.shape)
        digest = hashlib.sha256(repr(settings).encode() + pixels.tobytes()).hexdigest()
        return self.cache_dir / f"{digest[:40]}.npy"

    def _stored(self, image: torch.Tensor) -> np.ndarray:
        """The bit-packed foreground of ``image``, read from the disk cache or computed (and saved there)."""
        pixels = to_uint8_rgb(image)
        path = self._file(pixels) if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                pass  # a truncated or foreign file: compute again and replace it
        packed = np.packbits(compute_foreground(pixels, self.mode, self.min_fraction, self.max_fraction))
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".{os.getpid()}.tmp")
                with partial.open("wb") as handle:
                    np.save(handle, packed, allow_pickle=False)
                partial.replace(path)  # atomic: readers never see half a file
            except OSError:
                pass  # a read-only cache folder only costs the recomputation next time
        return packed
