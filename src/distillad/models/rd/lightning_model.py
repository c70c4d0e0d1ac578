"""Reverse Distillation as an anomalib module."""

from __future__ import annotations

from pathlib import Path

from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from distillad.models.base import DistillationModule
from distillad.models.rd.loss import ReverseDistillationLoss
from distillad.models.rd.torch_model import ReverseDistillationModel


class RD(DistillationModule, AnomalibModule):
    """Reverse Distillation (Deng & Li, CVPR 2022), generalised to any timm encoder.

    anomalib's own ``ReverseDistillation`` only supports ResNet decoders; this one mirrors any
    encoder (see :class:`~distillad.components.MirrorDecoder`). Paper defaults: Adam lr 0.005,
    betas (0.5, 0.999), 256 px, Gaussian sigma 4.

    Args:
        backbone: timm encoder name (``tf_efficientnet_lite0`` works offline; ``wide_resnet50_2`` is the paper's).
        pretrained: Pretrained teacher (never silently random).
        weights: Explicit teacher weights file.
        image_size: Input size (H, W).
        lr: Adam learning rate.
        betas: Adam betas.
        loss_mode: ``"pixel"`` (paper Eq. 2) or ``"flat"`` (official code).
        sigma: Gaussian smoothing of the anomaly map.
        pre_processor, post_processor, evaluator, visualizer: anomalib components or flags.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool = True,
        weights: str | Path | None = None,
        image_size: tuple[int, int] = (256, 256),
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        loss_mode: str = "pixel",
        sigma: float = 4.0,
        pre_processor: nn.Module | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        self.init_anomalib_module(image_size, pre_processor, post_processor, evaluator, visualizer)
        self.model = ReverseDistillationModel(backbone, pretrained=pretrained, weights=weights, sigma=sigma)
        self.loss = ReverseDistillationLoss(loss_mode)

    def configure_optimizers(self) -> optim.Optimizer:
        params = [*self.model.bottleneck.parameters(), *self.model.decoder.parameters()]
        return optim.Adam(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        loss = self.loss(*self.model(batch.image))
        self.log("train_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        return {"loss": loss}
