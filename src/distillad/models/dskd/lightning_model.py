"""DSKD as an anomalib module."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch
from anomalib.data import AnomalibDataModule, Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from distillad.models.base import DistillationModule, held_out_normal_loaders
from distillad.models.dskd.loss import LOSS_TYPES, DualStudentLoss
from distillad.models.dskd.torch_model import DSKDModel
from distillad.models.options import AT_LEAST_ONE, COMMON_RULES, POSITIVE, Rule


class DSKD(DistillationModule, AnomalibModule):
    """Dual-student contextual affinity distillation (Zhang, Suganuma & Okatani, WACV 2024).

    A local student (RD, per-pixel cosine loss) and a global student (OCBE_glo + GCCB + decoder,
    contextual affinity loss) reconstruct a frozen teacher's stage 1-3 features; their score maps are
    standardised with statistics of held-out normal images and added (Eq. 8). See
    :class:`~distillad.models.dskd.torch_model.DSKDModel` for the architecture.

    Paper defaults: Adam lr 0.005, betas (0.5, 0.999), both students trained together, g = 1024, T = 1,
    256 px, 200 epochs, batch 16, WideResNet-50-2 (any timm encoder here; ``tf_efficientnet_lite0``
    works offline).

    Switches (ablations): ``local_loss`` / ``global_loss`` in ``"pixel"`` (Pi) / ``"affinity"`` (CA) /
    ``None`` (student off) reproduce Tables 4-5; ``gccb`` and ``gccb_channels`` Table 6; ``temperature``
    Fig. 6.

    Eq. 8's statistics are fitted at the end of every ``Trainer.fit`` (:meth:`on_fit_end`, reached also when a
    resumed checkpoint had nothing left to train) and before each validation epoch during fit (so the threshold
    anomalib fits on validation scores is on the scale that is scored). They come from normal images that are
    never tested: the datamodule's validation split when it was held out from the training images, the
    training images otherwise (:func:`~distillad.models.base.held_out_normal_loaders`; anomalib's ``MVTecAD``
    makes validation the test set, which is never used); images labelled anomalous are skipped. A model trained
    without a datamodule (plain dataloaders) uses the training dataloader. They live in buffers, are saved in
    checkpoints, and the model refuses to score until they are fitted.

    Choices where the paper is silent, and deviations (with the reason):

    - Encoder: any timm CNN cut into four stages; the paper's "first three residual stages" of
      WideResNet-50-2 become stages 1-3 and its "4-th residual stage" stage 4 (the CPU default has to
      work offline).
    - g stays 1024 for every encoder, as the paper's default; for an encoder narrower than that
      (``tf_efficientnet_lite0``: 320 channels at stage 4) the GCCB widens instead of compressing. The
      paper's Table 6 is flat over g in 512-2048 (g = 2048: no convs), so no rescaling is invented.
    - GCCB: average pooling, plain 1x1 convs without normalisation or activation (none are named). Pooling to one
      g-dim vector and broadcasting it back gives the global decoder a spatially constant input, so where a
      part is can reach the global student's reconstruction only through the decoder's skip-free upsampling
      from that constant: the paper's "condensing" read literally. GCAD (which the paper cites) keeps a
      position-aware bottleneck instead (``gccb_pooling="positional"``). Measured on a drawn LOCO-like tray
      of four parts (``benchmarks/gccb_logical.py``, 200 steps, 128 px, means of seeds 0 and 1; image AUROC
      on missing, extra, swapped and duplicated parts / on scratches and stains): full DSKD 98.8 / 74.3 with
      the pooled vector against 99.0 / 75.2 position-aware, since the local student already sees the logical
      anomalies; the global student alone 92.2 / 76.3 against 95.7 / 72.1 (position-aware ahead on logical
      anomalies in both seeds, by 2.0 and 5.1). The position-aware bottleneck helps the global student on
      swapped and duplicated parts and costs it structural defects, and full DSKD differs by 0.2 points, so
      the paper's pooled reading stays the default.
    - With switched losses (Tables 4-5) each student is scored with the discrepancy it was trained on.
    - mu/sigma: population mean and standard deviation over all pixels of the summed maps, fitted once
      after the last epoch (intermediate ``last.ckpt`` files keep mu = 0, sigma = 1).
    - Gaussian: sigma 4 (RD's; the paper names no width), applied to the fused map, so the pixel map is
      smoothed too, as in RD.
    - Augmentation: none. The paper uses "the same data augmentations as GCAD" without listing them;
      the datamodule only resizes.
    - The contextual affinity is computed in row chunks with an analytic gradient instead of autograd
      (memory and speed, not results: one chunk's (B, chunk_rows, N) buffer at a time and about 7x
      faster than checkpointed autograd; see :mod:`distillad.models.dskd.loss`).

    Args:
        backbone: timm encoder name (``wide_resnet50_2`` is the paper's).
        pretrained: Pretrained teacher (never silently random).
        weights: Explicit teacher weights file.
        image_size: Input size (H, W).
        lr: Adam learning rate.
        betas: Adam betas.
        local_loss: Local student's loss: ``"pixel"`` (paper), ``"affinity"`` or ``None``.
        global_loss: Global student's loss: ``"affinity"`` (paper), ``"pixel"`` or ``None``.
        gccb: Use the global context condensing block.
        gccb_channels: GCCB width g (1024 in the paper); the stage-4 width means no 1x1 convs.
        gccb_pooling: ``"mean"`` (pooled vector, broadcast: the paper's reading) or ``"positional"`` (a
            GCAD-like bottleneck that keeps where features are).
        temperature: Softmax temperature T of the contextual affinity (1 in the paper).
        sigma: Gaussian smoothing of the fused map.
        chunk_rows: Rows per chunk of the contextual affinity (memory and speed only; at 256 px and
            batch 16, 512 rows hold 134 MB of float32 logits at level 1, and forward + backward of that
            level took +183 MiB peak RSS on a CPU).
        pre_processor, post_processor, evaluator, visualizer: anomalib components or flags.
    """

    option_rules: ClassVar[dict[str, Rule]] = {**COMMON_RULES, "temperature": POSITIVE, "gccb_channels": AT_LEAST_ONE,
                                               "chunk_rows": AT_LEAST_ONE}

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool = True,
        weights: str | Path | None = None,
        image_size: tuple[int, int] = (256, 256),
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        local_loss: str | None = "pixel",
        global_loss: str | None = "affinity",
        gccb: bool = True,
        gccb_channels: int = 1024,
        gccb_pooling: Literal["mean", "positional"] = "mean",
        temperature: float = 1.0,
        sigma: float = 4.0,
        chunk_rows: int = 512,
        pre_processor: nn.Module | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        self.init_anomalib_module(image_size, pre_processor, post_processor, evaluator, visualizer)
        for name, value in (("local_loss", local_loss), ("global_loss", global_loss)):
            if value is not None and value not in LOSS_TYPES:
                msg = f"{name} must be 'pixel', 'affinity' or None, got {value!r}"
                raise ValueError(msg)
        if local_loss is None and global_loss is None:
            msg = "local_loss and global_loss are both None; keep at least one student"
            raise ValueError(msg)
        self.model = DSKDModel(backbone, pretrained=pretrained, weights=weights, local_loss=local_loss,
                               global_loss=global_loss, gccb=gccb, gccb_channels=gccb_channels,
                               gccb_pooling=gccb_pooling, image_size=tuple(image_size), temperature=temperature,
                               sigma=sigma, chunk_rows=chunk_rows)
        self._standardized_at_step: int | None = None  # trainer step of the last fit_standardization_from_trainer
        self.loss = DualStudentLoss({name: student.loss_type for name, student in self.model.students.items()},
                                    temperature=temperature, chunk_rows=chunk_rows)

    def configure_optimizers(self) -> optim.Optimizer:
        return optim.Adam(self.model.students.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        loss = self.loss(*self.model(batch.image))
        self.log("train_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        return {"loss": loss}

    def _normal_images(self, loader: Iterable[Batch]) -> Iterator[torch.Tensor]:
        """Pre-processed images of the normal samples (``gt_label == 0``) of ``loader``, on the model's device."""
        for batch in loader:
            images = self.model_inputs(batch.image)
            if batch.gt_label is not None:
                images = images[batch.gt_label.to(images.device) == 0]
            yield images

    def fit_standardization(self, loaders: Sequence[Iterable[Batch]]) -> int:
        """Fit Eq. 8's mu/sigma on the normal images of the first loader that has any; returns their number.

        Samples with ``gt_label`` 1 are skipped (an anomalib validation split taken from the test set holds
        anomalous images); a batch without labels counts as normal (training batches).
        """
        was_training = self.model.training
        self.model.eval()
        try:
            for loader in loaders:
                count = self.model.fit_standardization(self._normal_images(loader))
                if count:
                    return count
            msg = "no normal images in the validation or training data for DSKD's score standardisation (Eq. 8)"
            raise ValueError(msg)
        finally:
            self.model.train(was_training)

    def fit_standardization_from_trainer(self) -> None:
        """Fit Eq. 8's statistics on the held-out normal images of the trainer's data (see the class docstring),
        unless they were fitted at this optimiser step already (the per-epoch synthetic validation, anomalib's
        validation and the end of fit all ask for them after the last step)."""
        if self.model.standardized and self._standardized_at_step == self.trainer.global_step:
            return
        datamodule = self.trainer.datamodule
        self.fit_standardization(held_out_normal_loaders(datamodule) if datamodule is not None
                                 else [self.trainer.train_dataloader])
        self._standardized_at_step = self.trainer.global_step

    def prepare_scoring(self, datamodule: AnomalibDataModule) -> None:
        del datamodule  # the trainer's, which fit_standardization_from_trainer reads
        self.fit_standardization_from_trainer()

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:
            self.fit_standardization_from_trainer()

    def on_fit_end(self) -> None:
        self.fit_standardization_from_trainer()
