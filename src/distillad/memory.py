"""Freed CPU tensors kept in the process heap, so that the next training step reuses their pages.

glibc's ``malloc`` serves every request above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and
unmaps it on ``free``. A training step allocates and frees the same large tensors every time (one Lite0
feature map of a 32-image batch at 256 px is 200 MB), so each is mapped anew and the kernel zero-fills every
4 KiB page on first touch. On the 2-core AMD EPYC machine (float32, 2 threads) that page-fault work made a
1x1 convolution over 32 x 16 x 128 x 128 inputs take 50 ms instead of 16 ms, and DMDD's student forward +
backward on 32 images take 1.78 s instead of 1.34 s; under autograd, PyTorch's in-place ReLU6 clones its input
(a fresh 200 MB tensor) before clamping, which doubled the forward with gradients.

:func:`retain_freed_memory` turns off ``mmap`` for large requests and heap trimming (``mallopt(3)``), so freed
memory stays mapped in the process and is reused, and sets ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`` in
the environment so that the processes it starts (benchmark cells, DDP ranks and DataLoader workers, which are
spawned) do the same. The cost: a process keeps about the memory of its peak step until it exits (1.18x the
peak in ``tests/test_memory.py``), which a training or inference process reaches again at its next step
anyway. It changes the whole process, so the command line calls it; code that imports distillad decides for
itself (those two variables in the environment do the same for any program).
"""

from __future__ import annotations

import ctypes
import os
import sys

#: ``mallopt`` parameters, from glibc's ``malloc.h``.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: The same settings for processes started later: glibc reads them from the environment when it starts.
ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"}


def retain_freed_memory() -> bool:
    """Keep freed memory mapped in this process and its children (module docstring); ``True`` where the C library
    accepted it.

    A no-op that returns ``False`` outside Linux or with a C library without ``mallopt`` (musl accepts nothing).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt(3): M_MMAP_MAX 0 serves every request from the heap; M_TRIM_THRESHOLD -1 never trims it.
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1)):
        return False
    os.environ.update(ENVIRONMENT)
    return True
