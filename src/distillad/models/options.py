"""Model options checked by name, type and range before a model is built.

Every distillad model checks its constructor arguments here first (``init_anomalib_module`` calls
:func:`check_options`), so ``--option lr=abc`` or ``--option lr=-1`` fail at once with the option's name
instead of deep in the optimiser after files were written. Types come from the constructor's annotations
(``float`` accepts ints, ``bool`` and ``int`` accept nothing else, ``X | None`` accepts ``None``,
``tuple[float, float]`` a pair); ranges from the model's ``option_rules``.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any


@dataclass(frozen=True)
class Rule:
    """A condition on an option's (type-checked, not ``None``) value, and how the error message states it."""

    description: str
    holds: Callable[[Any], bool]


POSITIVE = Rule("> 0", lambda value: value > 0)
NON_NEGATIVE = Rule(">= 0", lambda value: value >= 0)
AT_LEAST_ONE = Rule(">= 1", lambda value: value >= 1)
PROBABILITY = Rule("in [0, 1]", lambda value: 0 <= value <= 1)
#: Adam's (beta1, beta2): each in [0, 1), as ``torch.optim.Adam`` requires.
BETAS = Rule("two numbers in [0, 1)", lambda value: all(0 <= beta < 1 for beta in value))
#: What every model shares: Adam's learning rate and betas, and the Gaussian that smooths the maps (0 = none).
COMMON_RULES = {"lr": POSITIVE, "betas": BETAS, "sigma": NON_NEGATIVE}

_TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "None",
               Path: "a path"}


def _accepts(annotation: Any, value: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, UnionType):
        return any(_accepts(member, value) for member in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin is tuple:
        members = typing.get_args(annotation)
        return (isinstance(value, tuple | list) and len(value) == len(members)
                and all(_accepts(member, item) for member, item in zip(members, value)))
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is Path:
        return isinstance(value, str | Path)
    if annotation is type(None):
        return value is None
    return not isinstance(annotation, type) or isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, UnionType):
        return " or ".join(dict.fromkeys(_describe(member) for member in typing.get_args(annotation)))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin is tuple:
        return f"a tuple ({', '.join(_describe(member) for member in typing.get_args(annotation))})"
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_options(model_class: type, values: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first of ``values`` whose type or range ``model_class`` does not accept."""
    hints = typing.get_type_hints(model_class.__init__)
    rules = getattr(model_class, "option_rules", {})
    for name, value in values.items():
        if name in hints and not _accepts(hints[name], value):
            msg = f"option {name}={value!r} must be {_describe(hints[name])}"
            raise ValueError(msg)
        rule = rules.get(name)
        if rule is not None and value is not None and not rule.holds(value):
            msg = f"option {name}={value!r} must be {rule.description}"
            raise ValueError(msg)
