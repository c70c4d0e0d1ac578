"""Frozen-teacher features kept across epochs, so each training image is encoded once per run.

A frozen teacher in eval mode maps the same image to the same features every epoch, and the training images
repeat every epoch (the datamodules only resize). On a CPU that pass is a large share of a step (RD at 256 px:
about half), so :class:`FrozenFeatureCache` stores each image's features under a hash of its pixels. An
augmented or synthesised image has other pixels, so it misses the cache and is encoded as usual: the cache
can only change speed, never values, as long as the teacher computes each image independently of the others
in its batch (true of the CPU kernels: tested bitwise). It lives in memory only (it is not part of the
state dict) and is bounded by ``budget_mb``; images beyond the budget are encoded every time.

It is used on the CPU only: on a GPU the teacher pass costs less than moving the images to the host to hash them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

#: Memory the cached features of one model may take (Lite0 at 256 px: 0.66 MB an image, so ~3000 images).
DEFAULT_BUDGET_MB = 2048


class FrozenFeatureCache:
    """Per-image outputs (a list of (C, h, w) tensors) of a frozen encoder, keyed by the image's pixels.

    Args:
        budget_mb: Most megabytes of features kept; 0 disables the cache.
    """

    def __init__(self, budget_mb: float = DEFAULT_BUDGET_MB) -> None:
        self.budget_bytes = int(budget_mb * 2**20)
        self.used_bytes = 0
        self.entries: dict[bytes, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        """A digest of one image's values, shape and dtype, and of the autocast state (bf16 features differ)."""
        array = image.detach().contiguous().cpu().numpy()
        header = f"{array.shape}{array.dtype}{torch.is_autocast_enabled('cpu')}".encode()
        return hashlib.blake2b(header + array.tobytes(), digest_size=20).digest()

    def __call__(self, encode: Callable[[torch.Tensor], list[torch.Tensor]], images: torch.Tensor) -> list[torch.Tensor]:
        """``encode(images)`` with the features of images seen before taken from the cache."""
        if self.budget_bytes <= 0 or images.device.type != "cpu":
            return encode(images)
        keys = [self.key(image) for image in images]
        missing = [index for index, key in enumerate(keys) if key not in self.entries]
        fresh = {}
        if missing:
            features = encode(images[missing])
            for position, index in enumerate(missing):
                fresh[index] = [level[position] for level in features]
                self._store(keys[index], fresh[index])
            if len(missing) == len(keys):  # nothing came from the cache: the batch is already in order
                return features
        rows = [fresh[index] if index in fresh else self.entries[key] for index, key in enumerate(keys)]
        return [torch.stack([row[level] for row in rows]).contiguous(memory_format=torch.channels_last)
                for level in range(len(rows[0]))]

    def _store(self, key: bytes, features: list[torch.Tensor]) -> None:
        size = sum(level.numel() * level.element_size() for level in features)
        if self.used_bytes + size <= self.budget_bytes:
            self.entries[key] = [level.clone() for level in features]
            self.used_bytes += size
