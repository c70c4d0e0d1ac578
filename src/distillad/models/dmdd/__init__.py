"""Dual-Modeling Decouple Distillation (DMDD), the headline method."""

from distillad.models.dmdd.lightning_model import DMDD
from distillad.models.dmdd.torch_model import DMDDModel

__all__ = ["DMDD", "DMDDModel"]
