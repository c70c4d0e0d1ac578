"""Reverse Distillation (RD), the shared baseline."""

from distillad.models.rd.lightning_model import RD
from distillad.models.rd.torch_model import ReverseDistillationModel

__all__ = ["RD", "ReverseDistillationModel"]
