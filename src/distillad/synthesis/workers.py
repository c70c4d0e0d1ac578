"""Anomaly synthesis in DataLoader workers, off the training step's critical path.

A model lists its synthesizers in a :class:`SynthesisPlan`; a datamodule whose training loader has workers
wraps its collate function in :class:`SynthesizingCollate`, which runs the plan's active synthesizers on each
collated batch inside the worker and attaches the results (``batch.synthesis``). The model takes them with
:func:`take_synthesis`, which falls back to synthesising in the step when a batch carries none (no workers,
another datamodule, a synthesizer not active for this loader), so the two paths are interchangeable.

Randomness: a worker's synthesizers are copies of the model's, reseeded from the worker's
``torch.initial_seed()``, which the DataLoader derives from its own generator for every new iterator
(epoch), and batch i always goes to worker i mod ``num_workers``. A loader shuffled by a seeded generator whose
state travels in checkpoints (as :class:`~distillad.data.DistilladDataModule`'s) therefore draws the same
anomalies in a resumed run as in an uninterrupted one with the same ``num_workers``. The draws differ from
in-step synthesis (the model's generators are not advanced), so runs with and without workers differ as two
seeds do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from distillad.synthesis.synthesizer import AnomalySynthesizer, SynthesisResult

#: Multiplier spreading the synthesizers of one worker over distinct seeds (a large odd number).
_SEED_STRIDE = 0x9E3779B97F4A7C15


class WorkerSynthesis(NamedTuple):
    """What a worker made for one synthesizer and one batch."""

    anomalous: torch.Tensor
    """(B, 3, H, W) on the CPU."""
    mask: torch.Tensor
    """(B, 1, H, W) on the CPU."""
    foregrounds: dict[tuple[str, int, int], np.ndarray]
    """The batch's bit-packed foregrounds, merged into the model's cache (its statistics, later workers)."""


class SynthesisPlan:
    """The synthesizers a model wants run in DataLoader workers, by name, and which the next loader uses.

    Workers copy the plan when a loader's iterator starts them, so :meth:`using` must wrap the creation of
    the iterator (a loop over a loader) to take effect.
    """

    def __init__(self, synthesizers: Mapping[str, AnomalySynthesizer] | None = None,
                 active: Iterable[str] | None = None) -> None:
        self.synthesizers: dict[str, AnomalySynthesizer] = dict(synthesizers or {})
        self.active: frozenset[str] = frozenset(self.synthesizers if active is None else active)

    def add(self, name: str, synthesizer: AnomalySynthesizer) -> None:
        """Register ``synthesizer`` and put it to work in the next loaders."""
        self.synthesizers[name] = synthesizer
        self.active = self.active | {name}

    def pause(self, name: str) -> None:
        """Stop synthesising ``name`` in the next loaders (its step no longer needs it)."""
        self.active = self.active - {name}

    @contextmanager
    def using(self, *names: str) -> Iterator[None]:
        """Only ``names`` are synthesised in the loaders started inside the block."""
        previous, self.active = self.active, frozenset(names)
        try:
            yield
        finally:
            self.active = previous


class SynthesizingCollate:
    """A collate function that, inside a DataLoader worker, also synthesises the plan's active anomalies.

    In the main process (``num_workers=0``) it is the wrapped function alone: the model synthesises in its step.

    Args:
        collate_fn: The loader's own collate function; its batches need ``image`` and ``image_path``.
        plan: The model's :class:`SynthesisPlan`.
    """

    def __init__(self, collate_fn: Callable[[list], Any], plan: SynthesisPlan) -> None:
        self.collate_fn = collate_fn
        self.plan = plan
        self._seeded_for: int | None = None

    def _reseed(self) -> None:
        """Seed this worker's copies once per worker process (a new iterator starts new workers)."""
        seed = torch.initial_seed()
        if self._seeded_for != seed:
            for index, name in enumerate(sorted(self.plan.synthesizers)):
                self.plan.synthesizers[name].generator.manual_seed((seed + _SEED_STRIDE * (index + 1)) % 2**63)
            self._seeded_for = seed

    def __call__(self, items: list) -> Any:
        batch = self.collate_fn(items)
        if get_worker_info() is None or not self.plan.active:
            return batch
        self._reseed()
        keys = [str(path) for path in batch.image_path]
        made = {}
        for name in sorted(self.plan.active):
            synthesizer = self.plan.synthesizers[name]
            result = synthesizer(batch.image, keys=keys)
            made[name] = WorkerSynthesis(result.anomalous, result.mask, synthesizer.foregrounds.entries(keys))
        batch.synthesis = made
        return batch


def take_synthesis(batch: Any, name: str, synthesizer: AnomalySynthesizer, images: torch.Tensor,
                   keys: Sequence[str]) -> SynthesisResult:
    """The anomalies a worker synthesised for ``images`` (the batch's pre-processed images) with synthesizer
    ``name``, on their device and in their dtype; without them, ``synthesizer(images, keys)`` in this process."""
    made = getattr(batch, "synthesis", {}).get(name)
    if made is None or made.anomalous.shape != images.shape:  # a pre-processor that resized after the worker
        return synthesizer(images, keys=keys)
    synthesizer.foregrounds.update(made.foregrounds)
    return SynthesisResult(normal=images, anomalous=made.anomalous.to(device=images.device, dtype=images.dtype),
                           mask=made.mask.to(device=images.device, dtype=images.dtype))
