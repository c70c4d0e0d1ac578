"""Model registry: CLI names -> AnomalibModule classes, plus the papers' presets.

A method registers itself with :func:`register`; the CLI and benchmarks look names up here instead
of branching on them. Import is lazy so that ``distillad --help`` stays fast.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

from distillad.errors import DistilladError


@dataclass(frozen=True)
class ModelEntry:
    """Where a model class lives and its paper settings (the ``paper`` preset)."""

    target: str
    paper: dict = field(default_factory=dict)

    def load(self) -> type:
        module_name, class_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), class_name)


MODELS: dict[str, ModelEntry] = {
    "dskd": ModelEntry("distillad.models.dskd:DSKD",
                       paper={"backbone": "wide_resnet50_2", "image_size": 256, "epochs": 200, "batch_size": 16}),
    "aand": ModelEntry("distillad.models.aand:AAND",
                       paper={"backbone": "wide_resnet50_2", "image_size": 256, "epochs": 220, "batch_size": 16}),
    "rd": ModelEntry("distillad.models.rd:RD",
                     paper={"backbone": "wide_resnet50_2", "image_size": 256, "epochs": 200, "batch_size": 16}),
    "dmdd": ModelEntry("distillad.models.dmdd:DMDD",
                       paper={"backbone": "wide_resnet50_2", "image_size": 256, "epochs": 200, "batch_size": 16}),
}


def register(name: str, entry: ModelEntry) -> None:
    """Add a model under ``name``."""
    MODELS[name] = entry


def get_model_class(name: str) -> type:
    """The AnomalibModule class registered as ``name``."""
    if name not in MODELS:
        msg = f"unknown model '{name}'; choose one of: {', '.join(sorted(MODELS))}"
        raise DistilladError(msg)
    return MODELS[name].load()


def model_options(model_class: type) -> dict[str, inspect.Parameter]:
    """Constructor options a user may set with ``--option KEY=VALUE``."""
    managed = {"self", "pre_processor", "post_processor", "evaluator", "visualizer", "backbone", "pretrained",
               "weights", "image_size"}
    return {name: p for name, p in inspect.signature(model_class.__init__).parameters.items() if name not in managed}


def check_model_options(name: str, options: dict) -> None:
    """One-line :class:`DistilladError` for an option ``name`` does not have or a value of the wrong type or range."""
    from distillad.models.options import check_options

    model_class = get_model_class(name)
    allowed = model_options(model_class)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        msg = f"unknown option(s) {', '.join(unknown)} for model '{name}'; valid: {', '.join(sorted(allowed)) or 'none'}"
        raise DistilladError(msg)
    try:
        check_options(model_class, options)
    except ValueError as error:
        raise DistilladError(f"invalid option for model '{name}': {error}") from error
