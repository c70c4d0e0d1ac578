"""distillad: unsupervised visual anomaly detection by knowledge distillation, on anomalib.

The models are anomalib ``AnomalibModule`` classes, usable from anomalib's ``Engine`` and CLI
(``anomalib train --model distillad.RD ...``) and from the ``distillad`` command.
"""

from distillad.models.aand import AAND
from distillad.models.dmdd import DMDD
from distillad.models.dskd import DSKD
from distillad.models.rd import RD

__all__ = ["AAND", "DMDD", "DSKD", "RD"]
