"""Anomaly synthesis on the data side, in DataLoader workers when there are any.

A model lists its synthesizers in a :class:`SynthesisPlan`. A datamodule that supports it (our
:class:`~distillad.data.DistilladDataModule`) batches its training set with :class:`SynthesisBatchSampler`,
which gives every batch a seed (drawn from the datamodule's shuffling generator, in the main process) and the
names of the plan's active synthesizers; :class:`KeyedDataset` passes both along with the items; and
:class:`SynthesizingCollate` runs those synthesizers on the collated batch, reseeded from the batch's seed, and
attaches the results (``batch.synthesis``). With ``num_workers > 0`` this happens in the workers, overlapped
with the training step; with none, in the main process. The model takes them with :func:`take_synthesis`,
which synthesises in the step itself when a batch carries none (another datamodule, a synthesizer not active
for this loader).

Randomness: each batch's anomalies depend on its seed and images only, and the seeds are drawn in the main
process, so a run draws the same anomalies with any number of workers, and a resumed run (the shuffling
generator's state travels in checkpoints) the same as an uninterrupted one. Loops over the loader must make one
pass per ``iter()``: with persistent workers every ``iter()`` prefetches (and seeds) a new pass. Under DDP each
rank adds its rank to the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from distillad.synthesis._random import seed_from
from distillad.synthesis.synthesizer import AnomalySynthesizer, SynthesisResult

#: Multiplier spreading the synthesizers of one batch over distinct seeds (a large odd number).
_SEED_STRIDE = 0x9E3779B97F4A7C15


class WorkerSynthesis(NamedTuple):
    """What the data side made for one synthesizer and one batch."""

    anomalous: torch.Tensor
    """(B, 3, H, W) on the CPU."""
    mask: torch.Tensor
    """(B, 1, H, W) on the CPU."""
    foregrounds: dict[tuple[str, int, int], np.ndarray]
    """The batch's bit-packed foregrounds, merged into the model's cache (its statistics, later workers)."""


class SynthesisPlan:
    """The synthesizers a model wants run on the data side, by name, and which of them its current loop uses.

    The batch sampler reads :attr:`active` as it hands out each batch, so a change reaches the batches that the
    loader requests from then on (a few prefetched ones may still carry the previous choice).
    """

    def __init__(self, synthesizers: Mapping[str, AnomalySynthesizer] | None = None,
                 active: Iterable[str] | None = None) -> None:
        self.synthesizers: dict[str, AnomalySynthesizer] = dict(synthesizers or {})
        self.active: frozenset[str] = frozenset(self.synthesizers if active is None else active)

    def add(self, name: str, synthesizer: AnomalySynthesizer) -> None:
        """Register ``synthesizer`` and put it to work."""
        self.synthesizers[name] = synthesizer
        self.active = self.active | {name}

    def pause(self, name: str) -> None:
        """Stop synthesising ``name`` (its step no longer needs it)."""
        self.active = self.active - {name}

    @contextmanager
    def using(self, *names: str) -> Iterator[None]:
        """Only ``names`` are synthesised for the batches requested inside the block."""
        previous, self.active = self.active, frozenset(names)
        try:
            yield
        finally:
            self.active = previous


class SynthesisKey(NamedTuple):
    """A dataset index with its batch's synthesis seed and active synthesizer names."""

    index: int
    seed: int
    active: tuple[str, ...]


class SynthesisBatchSampler(BatchSampler):
    """:class:`~torch.utils.data.BatchSampler` whose batches are :class:`SynthesisKey` lists.

    Args:
        sampler: The index sampler (Lightning swaps in a ``DistributedSampler`` under DDP).
        batch_size: Images per batch.
        drop_last: Drop a last, smaller batch.
        generator: Draws each batch's seed, in the main process (the datamodule's shuffling generator).
        plan: The model's plan; its active names are read per batch.
    """

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool,
                 generator: torch.Generator, plan: SynthesisPlan) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.generator = generator
        self.plan = plan

    def __iter__(self) -> Iterator[list[SynthesisKey]]:
        rank = getattr(self.sampler, "rank", 0)
        for indices in super().__iter__():
            seed = (seed_from(self.generator) + rank) % 2**62
            active = tuple(sorted(self.plan.active))
            yield [SynthesisKey(index, seed, active) for index in indices]


class KeyedDataset(Dataset):
    """A map-style dataset read with :class:`SynthesisKey` s: returns ``(key, item)`` pairs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SynthesisKey) -> tuple[SynthesisKey, Any]:
        return key, self.dataset[key.index]


class SynthesizingCollate:
    """Collate :class:`KeyedDataset` pairs, then run the batch's active synthesizers seeded from its seed.

    Args:
        collate_fn: The dataset's own collate function; its batches need ``image`` and ``image_path``.
        plan: The model's :class:`SynthesisPlan`.
    """

    def __init__(self, collate_fn: Callable[[list], Any], plan: SynthesisPlan) -> None:
        self.collate_fn = collate_fn
        self.plan = plan

    def __call__(self, pairs: list[tuple[SynthesisKey, Any]]) -> Any:
        batch = self.collate_fn([item for _, item in pairs])
        key = pairs[0][0]
        if not key.active:
            return batch
        paths = [str(path) for path in batch.image_path]
        made = {}
        for index, name in enumerate(sorted(self.plan.synthesizers)):
            if name in key.active:
                synthesizer = self.plan.synthesizers[name]
                synthesizer.generator.manual_seed((key.seed + _SEED_STRIDE * (index + 1)) % 2**63)
                result = synthesizer(batch.image, keys=paths)
                foregrounds = synthesizer.foregrounds.entries(paths, *batch.image.shape[-2:])
                made[name] = WorkerSynthesis(result.anomalous, result.mask, foregrounds)
        batch.synthesis = made
        return batch


def take_synthesis(batch: Any, name: str, synthesizer: AnomalySynthesizer, images: torch.Tensor,
                   keys: Sequence[str]) -> SynthesisResult:
    """The anomalies the data side synthesised for ``images`` (the batch's pre-processed images) with
    synthesizer ``name``, on their device and in their dtype; without them, ``synthesizer(images, keys)`` here."""
    made = getattr(batch, "synthesis", {}).get(name)
    if made is None or made.anomalous.shape != images.shape:  # a pre-processor that resized after the collate
        return synthesizer(images, keys=keys)
    synthesizer.foregrounds.update(made.foregrounds)
    return SynthesisResult(normal=images, anomalous=made.anomalous.to(device=images.device, dtype=images.dtype),
                           mask=made.mask.to(device=images.device, dtype=images.dtype))
