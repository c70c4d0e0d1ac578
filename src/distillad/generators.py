"""Objects holding :class:`torch.Generator` attributes that must cross process boundaries.

A pickled ``torch.Generator`` carries its state as a tensor in shared memory, which the processes that DDP
spawns fail to map ("unable to resize file ... Invalid argument"); plain bytes travel anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _GeneratorState:
    state: bytes


class GeneratorsPickleAsBytes:
    """Mixin: every ``torch.Generator`` attribute pickles as its state bytes and unpickles as an equal generator."""

    def __getstate__(self) -> dict:
        return {key: _GeneratorState(bytes(value.get_state().numpy())) if isinstance(value, torch.Generator) else value
                for key, value in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            if isinstance(value, _GeneratorState):
                generator = torch.Generator()
                generator.set_state(torch.frombuffer(bytearray(value.state), dtype=torch.uint8))
                state[key] = generator
        self.__dict__.update(state)
