"""distillad: unsupervised visual anomaly detection by knowledge distillation, on anomalib.

The models are anomalib ``AnomalibModule`` classes, usable from anomalib's ``Engine`` and CLI
(``anomalib train --model distillad.DMDD ...``) and from the ``distillad`` command. They are imported
on first access, so ``import distillad`` and ``distillad --help`` stay fast.
"""

import importlib

_MODEL_MODULES = {
    "AAND": "distillad.models.aand",
    "DMDD": "distillad.models.dmdd",
    "DSKD": "distillad.models.dskd",
    "RD": "distillad.models.rd",
}

__all__ = sorted(_MODEL_MODULES)


def __getattr__(name: str) -> type:
    if name in _MODEL_MODULES:
        return getattr(importlib.import_module(_MODEL_MODULES[name]), name)
    msg = f"module 'distillad' has no attribute '{name}'"
    raise AttributeError(msg)
