"""Draws from an explicit :class:`torch.Generator`, never from torch's global RNG.

Every random choice in :mod:`distillad.synthesis` goes through these helpers so that a synthesizer
seeded once repeats its sequence exactly and leaves the global RNG state of the training run alone.
"""

import torch


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One float drawn uniformly from ``[low, high)``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """One integer drawn uniformly from ``[low, high)`` (``high`` exclusive, as :func:`torch.randint`)."""
    return int(torch.randint(low, high, (), generator=generator))


def seed_from(generator: torch.Generator) -> int:
    """A fresh 62-bit seed drawn from ``generator``, for code that only reads torch's global RNG."""
    return randint(generator, 0, 2**62)
