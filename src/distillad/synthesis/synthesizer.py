"""Foreground-aware DRAEM-style anomaly synthesis for a batch of training images.

Composition (DRAEM, Zavrtanik et al., ICCV 2021, Eq. 1; DMDD Sec. 3.4.1, Fig. 5)::

    anomalous = image * (1 - M) + (1 - beta) * texture * M + beta * image * M

with M = Perlin mask restricted to the foreground (DMDD's FAS: M_noise * M_fore; AAND: the Perlin
mask intersected with a threshold foreground) and beta the opacity of the *original image* inside the
mask. The DRAEM paper states beta in [0.1, 1.0], but its reference code draws beta = U(0, 0.8)
(``torch.rand(1) * 0.8``) and anomalib's ``PerlinAnomalyGenerator`` draws the *texture* weight from
(0.2, 1.0), which is the same thing: beta = 1 - blend_factor. The default ``beta_range=(0.0, 0.8)``
follows that code; with beta near 1 the anomaly would be invisible while the mask still says anomalous.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from distillad.errors import DistilladError
from distillad.generators import GeneratorsPickleAsBytes
from distillad.synthesis._random import randint, uniform
from distillad.synthesis.foreground import ForegroundCache
from distillad.synthesis.perlin import perlin_mask, random_ellipse_mask
from distillad.synthesis.textures import make_texture_source

#: Perlin masks drawn before falling back to a small ellipse inside the foreground.
MAX_FOREGROUND_DRAWS = 10


class SynthesisResult(NamedTuple):
    """A synthesised batch: the input images, their anomalous twins and the anomaly masks."""

    normal: torch.Tensor
    """(B, 3, H, W), the input images themselves."""
    anomalous: torch.Tensor
    """(B, 3, H, W) in [0, 1]; equal to ``normal`` wherever ``mask`` is 0."""
    mask: torch.Tensor
    """(B, 1, H, W) float in {0, 1}, all zero for samples left normal."""


class OtherImages(Sequence[torch.Tensor]):
    """A batch without one of its images, in batch order, without copying the batch.

    Indexes like ``torch.cat([images[:excluded], images[excluded + 1:]])``, which copied the batch once per
    corrupted image: 22 ms of the 125 ms that synthesis took per batch of 16 at 256 px.
    """

    def __init__(self, images: torch.Tensor, excluded: int) -> None:
        self.images = images
        self.excluded = excluded

    def __len__(self) -> int:
        return len(self.images) - 1

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        index %= len(self)
        return self.images[index + (index >= self.excluded)]


class AnomalySynthesizer(GeneratorsPickleAsBytes):
    """Synthetic anomalies inside the foreground, deterministic under ``seed``.

    Args:
        foreground: ``grabcut`` (DMDD FAS), ``threshold`` (AAND) or ``none`` (whole image); see
            :mod:`distillad.synthesis.foreground`.
        texture_dir: folder of texture images (e.g. DTD); ``None`` uses the built-in textures.
        beta_range: range of beta, the opacity of the original image inside the mask (DRAEM Eq. 1).
        anomaly_probability: probability that a sample gets an anomaly; the others stay normal with an
            all-zero mask.
        seed: seeds the synthesizer's own :class:`torch.Generator` once. Successive calls differ; a new
            synthesizer with the same seed repeats the same sequence on the same inputs. Torch's global
            RNG is never read or advanced.

    Masks, textures and foregrounds are made on the CPU and moved to the images' device; the
    composition runs there in the images' dtype.
    """

    def __init__(
        self,
        foreground: str = "grabcut",
        texture_dir: str | Path | None = None,
        beta_range: tuple[float, float] = (0.0, 0.8),
        anomaly_probability: float = 1.0,
        seed: int = 0,
    ) -> None:
        low, high = beta_range
        if not 0.0 <= low <= high <= 1.0:
            raise DistilladError(f"beta_range {beta_range} is invalid; use 0 <= low <= high <= 1, e.g. (0.0, 0.8)")
        if not 0.0 <= anomaly_probability <= 1.0:
            raise DistilladError(f"anomaly_probability {anomaly_probability} is invalid; use a value in [0, 1]")
        self.foregrounds = ForegroundCache(foreground)
        self.textures = make_texture_source(texture_dir)
        self.beta_range = (float(low), float(high))
        self.anomaly_probability = float(anomaly_probability)
        self.generator = torch.Generator().manual_seed(seed)

    def anomaly_mask(self, foreground: torch.Tensor) -> torch.Tensor:
        """A non-empty Perlin mask inside ``foreground`` (bool (H, W), non-empty), float (H, W) in {0, 1}.

        Up to :data:`MAX_FOREGROUND_DRAWS` Perlin masks are intersected with the foreground; if all miss
        it, a small random ellipse centred on a random foreground pixel, clipped to the foreground.
        """
        height, width = foreground.shape
        for _ in range(MAX_FOREGROUND_DRAWS):
            mask = perlin_mask(height, width, self.generator) * foreground
            if mask.any():
                return mask
        pixels = foreground.nonzero()
        row, col = pixels[randint(self.generator, 0, len(pixels))].tolist()
        return random_ellipse_mask(height, width, self.generator, centre=(row, col)) * foreground

    def __call__(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> SynthesisResult:
        """Synthesise anomalies for a batch (B, 3, H, W) in [0, 1] (not normalised).

        ``keys`` (the images' paths) lets foregrounds be cached across epochs; without them each
        foreground is computed afresh.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if keys is not None and len(keys) != batch:
            raise ValueError(f"got {len(keys)} keys for a batch of {batch} images")
        pool = images.detach().float().cpu()
        masks = torch.zeros(batch, 1, height, width)
        textures = torch.zeros(batch, 3, height, width)
        betas = torch.zeros(batch, 1, 1, 1)
        for index in range(batch):
            if uniform(self.generator) >= self.anomaly_probability:
                continue
            foreground = (
                self.foregrounds.compute(pool[index])
                if keys is None
                else self.foregrounds.get(keys[index], pool[index])
            )
            masks[index, 0] = self.anomaly_mask(foreground)
            others = OtherImages(pool, index)  # never a crop of the image being corrupted
            textures[index] = self.textures.sample(height, width, self.generator, others)
            betas[index] = uniform(self.generator, *self.beta_range)
        mask = masks.to(device=images.device, dtype=images.dtype)
        texture = textures.to(device=images.device, dtype=images.dtype)
        beta = betas.to(device=images.device, dtype=images.dtype)
        anomalous = images * (1 - mask) + (1 - beta) * texture * mask + beta * images * mask
        return SynthesisResult(normal=images, anomalous=anomalous, mask=mask)
