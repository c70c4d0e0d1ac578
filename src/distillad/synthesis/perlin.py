"""Binarised Perlin-noise masks, the shape of DRAEM's synthetic anomalies.

DRAEM (Zavrtanik et al., ICCV 2021, Sec. 3.3), reused by DMDD (Sec. 3.4.1, Fig. 5) and AAND
("Anomaly synthesis"): a 2-D Perlin noise with a random power-of-two scale per axis, rotated by a
random angle in [-90, 90] degrees and thresholded at 0.5, marks where an anomaly goes.

The noise itself comes from anomalib (:func:`anomalib.data.utils.generators.perlin.generate_perlin_noise`).
That function reads torch's global RNG, so it runs inside :func:`torch.random.fork_rng` after seeding
the CPU generator with a seed drawn from *our* generator: the result is a function of our generator
alone and the caller's global RNG state is left exactly as it was.
"""

import math

import cv2
import numpy as np
import torch
from anomalib.data.utils.generators.perlin import generate_perlin_noise

from distillad.errors import DistilladError
from distillad.synthesis._random import randint, seed_from, uniform

#: Perlin draws tried before :func:`perlin_mask` falls back to a random ellipse.
MAX_PERLIN_DRAWS = 10
#: Rotation range of the noise in degrees (DRAEM: ``iaa.Affine(rotate=(-90, 90))``).
ROTATION_DEGREES = 90.0


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise DistilladError(f"synthesis image size {height}x{width} is empty; use images of at least 1x1 pixels")


def perlin_noise(
    height: int,
    width: int,
    generator: torch.Generator,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
) -> torch.Tensor:
    """Raw Perlin noise (values roughly in [-1, 1]), float (H, W) on the CPU.

    The scale of each axis is ``2 ** randint(min_scale_exp, max_scale_exp)`` with the upper bound
    exclusive, as DRAEM (``torch.randint(0, 6)``, i.e. scales 1..32); it is capped at the padded image
    size, which anomalib's generator needs.
    """
    _check_size(height, width)
    if not 0 <= min_scale_exp < max_scale_exp:
        raise DistilladError(
            f"Perlin scale exponents min={min_scale_exp}, max={max_scale_exp} are invalid; "
            "use 0 <= min_scale_exp < max_scale_exp (DRAEM: 0 and 6)"
        )
    pad_h = 2 ** math.ceil(math.log2(height))
    pad_w = 2 ** math.ceil(math.log2(width))
    scale = (
        min(2 ** randint(generator, min_scale_exp, max_scale_exp), pad_h),
        min(2 ** randint(generator, min_scale_exp, max_scale_exp), pad_w),
    )
    seed = seed_from(generator)
    with torch.random.fork_rng(devices=[]):
        # Seed only the CPU generator: torch.manual_seed would also reseed every CUDA device.
        torch.random.default_generator.manual_seed(seed)
        return generate_perlin_noise(height, width, scale=scale, device=torch.device("cpu"))


def _rotate(noise: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate about the centre; corners that come from outside are 0 (below any positive threshold)."""
    height, width = noise.shape
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), degrees, 1.0)
    rotated = cv2.warpAffine(
        noise.numpy().astype(np.float32),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    return torch.from_numpy(rotated)


def random_ellipse_mask(
    height: int,
    width: int,
    generator: torch.Generator,
    centre: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A randomly oriented ellipse, float (H, W) in {0, 1}, never empty.

    Semi-axes are drawn from [min(H, W) / 16, min(H, W) / 6] pixels (at least 1); ``centre`` is a
    ``(row, column)`` pixel, drawn uniformly when not given. The centre pixel is always inside.
    """
    _check_size(height, width)
    if centre is None:
        centre = (randint(generator, 0, height), randint(generator, 0, width))
    side = min(height, width)
    semi_a = max(1.0, uniform(generator, side / 16, side / 6))
    semi_b = max(1.0, uniform(generator, side / 16, side / 6))
    angle = uniform(generator, 0.0, math.pi)
    rows = torch.arange(height, dtype=torch.float32).view(-1, 1) - centre[0]
    cols = torch.arange(width, dtype=torch.float32).view(1, -1) - centre[1]
    along = cols * math.cos(angle) + rows * math.sin(angle)
    across = -cols * math.sin(angle) + rows * math.cos(angle)
    return ((along / semi_a) ** 2 + (across / semi_b) ** 2 <= 1.0).float()


def perlin_mask(
    height: int,
    width: int,
    generator: torch.Generator,
    threshold: float = 0.5,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
) -> torch.Tensor:
    """DRAEM's anomaly mask: rotated Perlin noise > ``threshold``, float (H, W) in {0, 1} on the CPU.

    Never empty: an empty draw teaches nothing, so up to :data:`MAX_PERLIN_DRAWS` noises are drawn and,
    if all fall below the threshold, a random ellipse (:func:`random_ellipse_mask`) is returned.
    Deterministic in ``generator``; torch's global RNG is not touched.
    """
    for _ in range(MAX_PERLIN_DRAWS):
        noise = perlin_noise(height, width, generator, min_scale_exp, max_scale_exp)
        noise = _rotate(noise, uniform(generator, -ROTATION_DEGREES, ROTATION_DEGREES))
        mask = (noise > threshold).float()
        if mask.any():
            return mask
    return random_ellipse_mask(height, width, generator)
