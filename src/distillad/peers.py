"""anomalib's PatchCore and PaDiM as benchmark peers: same data, encoder, image size, calibration and metric code.

``distillad benchmark --peers patchcore,padim`` adds these cells beside the distillation models, so every table
shows what a user would otherwise pick. Each peer cell:

- reads the same :class:`~distillad.data.DistilladDataModule` split (training images, the held-out normal images
  that calibrate the threshold, the full test folder);
- builds the anomalib model on the benchmark's timm encoder with its ImageNet weights resolved by
  :func:`distillad.backbones.create_classifier` (offline-first; anomalib's ``pre_trained=True`` needs the hub);
- takes the encoder levels the peer's paper takes, by stride: PatchCore the stride-8 and stride-16 levels
  (``layer2``, ``layer3`` of a ResNet), PaDiM the stride-4, 8 and 16 levels (``layer1``-``layer3``);
- fits in one pass (no optimiser) and scores with the model's raw outputs through :func:`distillad.pipeline.evaluate`
  (anomalib's own post-processing min-max normalises and clamps, which ties scores; its AUROC squashes raw
  scores with a sigmoid: DESIGN "Pitfalls").

PatchCore's coreset holds at most :data:`PATCHCORE_MAX_MEMORY` patches (ratio ``min(0.1, limit / patches)``; 0.1
is anomalib's default): greedy coreset selection costs memory x patches distance computations, which for a
761-image category at 256 px (780k patches) and ratio 0.1 would take hours on a CPU; and each step's distances come
from one matrix-vector product (:class:`GreedyCoreset`, the same selection as anomalib's sampler). PaDiM keeps
:data:`PADIM_FEATURES` random channels (anomalib's choice for ResNet-18, 100 of 448) or all when there are fewer.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

import timm
import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import KCenterGreedy
from lightning.pytorch import seed_everything
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from distillad.backbones import create_classifier
from distillad.errors import DistilladError
from distillad.storage import write_json

#: Most patches PatchCore keeps in its memory bank.
PATCHCORE_MAX_MEMORY = 16384
#: Channels PaDiM keeps (at most).
PADIM_FEATURES = 100


def feature_levels(backbone: str, strides: tuple[int, ...]) -> dict[str, int]:
    """timm module name -> channels of ``backbone``'s last feature level at each of ``strides``, in that order."""
    info = timm.create_model(backbone, pretrained=False, features_only=True).feature_info
    levels = {reduction: (name, channels)
              for name, reduction, channels in zip(info.module_name(), info.reduction(), info.channels(), strict=True)}
    missing = [stride for stride in strides if stride not in levels]
    if missing:
        raise DistilladError(f"backbone '{backbone}' has no feature level at stride(s) {missing} for the peers")
    return dict(levels[stride] for stride in strides)


def _load_encoder_weights(extractor: nn.Module, backbone: str, pretrained: bool) -> None:
    """Copy the resolved ImageNet weights of ``backbone`` into anomalib's ``features_only`` timm network."""
    if not pretrained:
        return
    state = create_classifier(backbone, pretrained=True).state_dict()
    missing = extractor.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise DistilladError(f"the weights of '{backbone}' do not fit anomalib's feature extractor ({missing[0]})")


def _return_large_blocks_to_the_system() -> None:
    """Make glibc map allocations above 1 MiB separately, so that freeing them returns them to the system.

    anomalib's greedy coreset allocates an (N, d) temporary at every selection step; glibc kept the freed blocks in
    its heap and the process grew by about 20 MB a step (PatchCore on 115 mtd images at 128 px: killed at 24 GB
    after 1,100 of 2,943 steps; 1.2 GB peak with this). Process-wide, no effect off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


class GreedyCoreset(KCenterGreedy):
    """anomalib's greedy k-center coreset, each step's distances from one matrix-vector product.

    anomalib subtracts the new centre from every projected patch, an (N, d) temporary a step. The squared distance
    ``|x|^2 - 2 x.c + |c|^2`` needs only ``x @ c`` and row norms computed once, and the square root is monotone, so
    the running minimum picks the same patches (up to float rounding). PatchCore on 761 mtd images at 256 px (780k
    patches, 335 projected dimensions): 1.26 -> 0.17 s a step, 16k steps.
    """

    def update_distances(self, cluster_center: int | torch.Tensor | None) -> None:
        if cluster_center is None:
            return
        if self.min_distances is None:  # first centre of a selection: the features were just projected
            self.squared_norms = self.features.square().sum(1)
        center = self.features[cluster_center].reshape(-1)
        squared = torch.addmv(self.squared_norms + center.square().sum(), self.features, center, alpha=-2)
        distances = squared.clamp_min_(0).unsqueeze(1)
        self.min_distances = distances if self.min_distances is None else torch.minimum(self.min_distances, distances)


def _subsample_with_greedy_coreset(patchcore_model: nn.Module, sampling_ratio: float) -> None:
    """anomalib's ``PatchcoreModel.subsample_embedding`` with :class:`GreedyCoreset` as its sampler."""
    memory_bank = torch.vstack(patchcore_model.embedding_store)
    patchcore_model.embedding_store.clear()
    patchcore_model.memory_bank = GreedyCoreset(memory_bank, sampling_ratio).sample_coreset()


class PeerModel(nn.Module):
    """An anomalib model seen as distillad sees its own: ``model(images in [0, 1])`` -> raw ``InferenceBatch``."""

    def __init__(self, anomalib_model: nn.Module, transform: nn.Module) -> None:
        super().__init__()
        self.anomalib_model = anomalib_model
        self.transform = transform

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        output = self.anomalib_model.model(self.transform(images))
        anomaly_map = output.anomaly_map if output.anomaly_map.ndim == 4 else output.anomaly_map.unsqueeze(1)
        return InferenceBatch(pred_score=output.pred_score.flatten(), anomaly_map=anomaly_map)


def _patchcore(backbone: str, training_patches: int) -> nn.Module:
    from anomalib.models import Patchcore

    ratio = min(0.1, PATCHCORE_MAX_MEMORY / max(training_patches, 1))
    patchcore = Patchcore(backbone=backbone, layers=list(feature_levels(backbone, (8, 16))), pre_trained=False,
                          coreset_sampling_ratio=ratio, pre_processor=False, post_processor=False, evaluator=False,
                          visualizer=False)
    patchcore.model.subsample_embedding = MethodType(_subsample_with_greedy_coreset, patchcore.model)
    return patchcore


def _padim(backbone: str, training_patches: int) -> nn.Module:
    from anomalib.models import Padim

    del training_patches
    levels = feature_levels(backbone, (4, 8, 16))
    return Padim(backbone=backbone, layers=list(levels), pre_trained=False,
                 n_features=min(PADIM_FEATURES, sum(levels.values())), pre_processor=False, post_processor=False,
                 evaluator=False, visualizer=False)


#: Peer name -> ``build(backbone, training_patches)``; the encoder's weights are loaded afterwards.
PEERS: dict[str, Callable[[str, int], nn.Module]] = {"patchcore": _patchcore, "padim": _padim}


def fit_peer(config, train_limit: int | None = None, test_limit: int | None = None) -> tuple[PeerModel, Any, float]:
    """Peer ``config.model`` fitted in one pass over the training images of ``config``'s data, under its seed.

    Returns the model in eval mode (gradients off), the set-up datamodule and the seconds of the fit: the pass
    over the training images and anomalib's ``fit``.
    """
    from distillad.pipeline import build_datamodule

    if config.model not in PEERS:
        raise DistilladError(f"unknown peer '{config.model}'; choose from {', '.join(sorted(PEERS))}")
    seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config, train_limit, test_limit)
    datamodule.setup()
    stride8 = (config.image_size // 8) ** 2
    anomalib_model = PEERS[config.model](config.backbone, stride8 * len(datamodule.train_data))
    _load_encoder_weights(anomalib_model.model.feature_extractor.feature_extractor, config.backbone, config.pretrained)
    cfg = timm.create_model(config.backbone, pretrained=False).pretrained_cfg
    transform = Compose([Resize((config.image_size, config.image_size), antialias=True),
                         Normalize(cfg["mean"], cfg["std"])])
    model = PeerModel(anomalib_model, transform).requires_grad_(False)  # fitted in one pass, no gradient

    started = time.perf_counter()
    anomalib_model.model.train()
    with torch.no_grad():
        for batch in datamodule.train_dataloader():  # PatchCore / PaDiM training: collect embeddings, one pass
            anomalib_model.model(transform(batch.image))
    _return_large_blocks_to_the_system()
    anomalib_model.fit()
    return model.eval(), datamodule, time.perf_counter() - started


def run_peer(config, run_dir: Path, train_limit: int | None = None,
             test_limit: int | None = None) -> tuple[dict, PeerModel]:
    """Fit peer ``config.model`` on ``config``'s data (:func:`fit_peer`) and test it like
    :func:`distillad.pipeline.fit`; writes ``config.json``, ``metrics.json``, ``test_scores.csv`` and
    ``curves.json`` into ``run_dir``. Returns the metrics and the fitted model."""
    from distillad.pipeline import calibrate_run, test, versions

    model, datamodule, train_seconds = fit_peer(config, train_limit, test_limit)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    scorer = _Scorer(model)
    calibrate_run(scorer, config, datamodule)
    config.test_limit = test_limit
    config.versions = versions()
    config.save(run_dir)
    metrics = test(run_dir, model=scorer, config=config, datamodule=datamodule, heatmaps=False)
    metrics.update({"train_seconds": train_seconds, "train_steps": 0})
    write_json(run_dir / "metrics.json", metrics)
    return metrics, model


class _Scorer(nn.Module):
    """What :func:`distillad.pipeline.collect` calls: ``.model(images)`` after ``.model_inputs``."""

    def __init__(self, model: PeerModel) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def model_inputs(images: torch.Tensor) -> torch.Tensor:
        return images

    def train(self, mode: bool = True) -> _Scorer:
        # PatchCore / PaDiM score only in eval mode; the fitted memory bank or Gaussian is not trained further.
        return super().train(False)

