"""Dual-student contextual affinity distillation (DSKD)."""

from distillad.models.dskd.lightning_model import DSKD
from distillad.models.dskd.torch_model import DSKDModel, GlobalContextCondensingBlock, PositionalCondensingBlock

__all__ = ["DSKD", "DSKDModel", "GlobalContextCondensingBlock", "PositionalCondensingBlock"]
