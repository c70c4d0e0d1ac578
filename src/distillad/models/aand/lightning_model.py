"""AAND as one anomalib module that runs both training stages in sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from distillad.models.aand.loss import AmplificationStageLoss, NormalityDistillationLoss
from distillad.models.aand.torch_model import AANDModel, downsample_mask
from distillad.models.base import DistillationModule
from distillad.models.options import AT_LEAST_ONE, COMMON_RULES, NON_NEGATIVE, POSITIVE, PROBABILITY, Rule
from distillad.synthesis import (
    FOREGROUND_MODES,
    AnomalySynthesizer,
    SynthesisPlan,
    take_synthesis,
    texture_or_object,
    to_uint8_rgb,
)
from distillad.synthesis.foreground import AUTO_SAMPLE_IMAGES


def sample_images(dataset: Any, count: int = AUTO_SAMPLE_IMAGES) -> list[np.ndarray]:
    """Up to ``count`` images of ``dataset`` (anomalib items or batches, or anything with an ``image``), spread
    evenly over it, as uint8 RGB arrays; empty when ``dataset`` cannot be indexed."""
    try:
        size = len(dataset)
    except TypeError:
        return []
    images: list[np.ndarray] = []
    for index in np.unique(np.linspace(0, size - 1, min(count, size)).round().astype(int)) if size else []:
        image = dataset[int(index)].image
        images.extend(to_uint8_rgb(item) for item in (image if image.ndim == 4 else [image]))
    return images[:count]


def stage1_epoch_count(max_epochs: int | None, stage1_epochs: int, stage2_epochs: int) -> int:
    """Epochs of stage 1 when the trainer runs ``max_epochs`` in all (rule in :class:`AAND`'s docstring)."""
    if max_epochs is None or max_epochs < 0 or max_epochs == stage1_epochs + stage2_epochs:
        return stage1_epochs
    if stage1_epochs == 0 or stage2_epochs == 0:
        return 0 if stage1_epochs == 0 else max_epochs
    boundary = round(max_epochs * stage1_epochs / (stage1_epochs + stage2_epochs))
    return max(min(boundary, max_epochs - 1), min(1, max_epochs - 1))


class AAND(DistillationModule, AnomalibModule):
    """Anomaly Amplification and Normality Distillation (Tang et al.), for any timm encoder.

    Stage 1, anomaly amplification (Sec. III-B, Algorithm 1 lines 2-8): the training images get DRAEM
    pseudo-anomalies inside a foreground (:class:`~distillad.synthesis.AnomalySynthesizer`): by default
    (``foreground="auto"``) a grayscale-threshold foreground for objects on a background and the whole image for
    textures, decided once per category from 16 training images (:func:`~distillad.synthesis.texture_or_object`;
    the authors choose per category by hand, threshold 0 = the whole image for textures); only the RAA modules
    train, with L_1 = L_focal + L_A (Eq. 9), the
    ground-truth anomaly weights standing in for the gate inside F_A (Eq. 6).
    Stage 2, normality distillation (Sec. III-C, lines 9-14): on the plain normal images, the OCBE
    bottleneck and the student decoder learn the fixed advanced teacher's features (predicted gate) with
    L_2 = L_KD + L_HKD (Eq. 12). Inference: Eq. 13-14, Gaussian-smoothed, image score = max.

    Schedule. ``stage1_epochs`` and ``stage2_epochs`` (paper: 100 and 120) set the split of the trainer's
    ``max_epochs``; the stage is derived from ``current_epoch`` alone, so a resumed checkpoint continues in
    the right stage. When ``max_epochs`` equals their sum (the ``paper`` preset: 220) the stages run exactly
    as given; otherwise stage 1 takes ``round(max_epochs * stage1 / (stage1 + stage2))`` epochs, clamped so
    that each stage with a non-zero share gets at least one epoch when ``max_epochs >= 2`` (``--epochs 10``
    -> 5 + 5). A schedule that leaves a stage with a share empty is refused (:meth:`check_schedule`): one epoch
    would distil from an untrained amplifier, ``stage2_epochs=0`` would leave the student untrained unless
    ``score="mrg"``. ``metrics.json`` reports each stage's budget (:meth:`training_report`). An unbounded
    trainer (``max_epochs`` None or -1) switches after exactly ``stage1_epochs``. ``stage1_epochs=0``
    builds no RAA modules: the vanilla teacher, i.e. RD with the AAND loss (Table V base / (d)).
    With a schedule in optimiser steps (the trainer's ``max_steps``, ``fit --max-steps``) the same rule splits the
    steps: stage 1 while ``global_step`` is below the boundary.
    Each stage has its own Adam optimiser (manual optimisation), so stage 2 cannot change RAA parameters
    and starts with fresh moments, as the authors' two training scripts do.

    Ablations: Table V (a) ``score="mrg"`` (use ``stage2_epochs=0``: no student is needed), (b)
    ``gate=False``, (c) ``hard_samples=0``, (d) ``stage1_epochs=0``; Table VII (a) ``residual="free"``,
    (b) ``residual="sigmoid"``; Fig. 7 ``memory_items`` (L) and ``hard_samples`` (K_h).

    Choices where the paper is silent (authors' code unless said): Adam betas (0.5, 0.999); a constant
    learning rate (the code's MultiStepLR at 80 % / 90 % of each stage is not in the paper); 80 % of the
    stage-1 images receive an anomaly (``anomaly_probability``), the others stay normal with an empty mask;
    the synthesizer is seeded with ``torch.initial_seed()`` (the pipeline's ``--seed``). The authors'
    code picks each stage's best epoch by test-set AUROC; here the last epoch is kept, since selecting on
    test labels leaks them.

    Args:
        backbone: timm encoder name (``tf_efficientnet_lite0`` works offline; ``wide_resnet50_2`` is the paper's).
        pretrained: Pretrained teacher (never silently random).
        weights: Explicit teacher weights file.
        image_size: Input size (H, W).
        stage1_epochs: Anomaly-amplification share of the epochs (100 in the paper).
        stage2_epochs: Normality-distillation share of the epochs (120 in the paper).
        lr: Adam learning rate of both stages (0.005).
        betas: Adam betas.
        memory_items: L, normal and anomaly memory items per MRG (50).
        temperature: MRG softmax temperature (0.2, see :mod:`~distillad.models.aand.torch_model`).
        alpha: Margin of the dynamic reference S_ref (Eq. 8; 0.3).
        hard_samples: K_h of L_HKD (Eq. 11; 10); 0 switches HKD off.
        gate: Use the MRG; ``False`` adds the residual everywhere (Table V (b)).
        residual: ARG form: ``tanh`` (Eq. 5), ``sigmoid`` or ``free`` (Table VII).
        score: ``distillation`` (Eq. 13-14) or ``mrg`` (Table V (a)).
        max_anomalous_patches: Anomalous patches per level sampled for L_A.
        max_normal_patches: Normal patches per level sampled for L_A.
        foreground: Synthesis foreground: ``auto`` (texture -> ``none``, object -> ``threshold``, see above),
            ``threshold``, ``grabcut`` or ``none``.
        texture_dir: Folder of anomaly textures (DTD in the paper); ``None`` uses the built-in source.
        anomaly_probability: Share of stage-1 images that receive a pseudo-anomaly.
        sigma: Gaussian smoothing of the anomaly map.
        pre_processor, post_processor, evaluator, visualizer: anomalib components or flags.
    """

    option_rules: ClassVar[dict[str, Rule]] = {**COMMON_RULES, "stage1_epochs": NON_NEGATIVE, "stage2_epochs": NON_NEGATIVE,
                                               "memory_items": AT_LEAST_ONE, "temperature": POSITIVE, "alpha": NON_NEGATIVE,
                                               "hard_samples": NON_NEGATIVE, "max_anomalous_patches": AT_LEAST_ONE,
                                               "max_normal_patches": AT_LEAST_ONE, "anomaly_probability": PROBABILITY}

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool = True,
        weights: str | Path | None = None,
        image_size: tuple[int, int] = (256, 256),
        stage1_epochs: int = 100,
        stage2_epochs: int = 120,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        memory_items: int = 50,
        temperature: float = 0.2,
        alpha: float = 0.3,
        hard_samples: int = 10,
        gate: bool = True,
        residual: str = "tanh",
        score: str = "distillation",
        max_anomalous_patches: int = 1000,
        max_normal_patches: int = 5000,
        foreground: str = "auto",
        texture_dir: str | Path | None = None,
        anomaly_probability: float = 0.8,
        sigma: float = 4.0,
        pre_processor: nn.Module | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        self.init_anomalib_module(image_size, pre_processor, post_processor, evaluator, visualizer)
        if stage1_epochs + stage2_epochs == 0:
            msg = "stage1_epochs and stage2_epochs are both 0; train at least one stage"
            raise ValueError(msg)
        if stage2_epochs == 0 and score != "mrg":
            msg = "stage2_epochs=0 leaves the student untrained; pass score='mrg' (Table V (a)) or stage2_epochs > 0"
            raise ValueError(msg)
        if foreground != "auto" and foreground not in FOREGROUND_MODES:
            msg = f"foreground must be 'auto' or one of {', '.join(sorted(FOREGROUND_MODES))}, got {foreground!r}"
            raise ValueError(msg)
        self.automatic_optimization = False
        self.model = AANDModel(backbone, pretrained=pretrained, weights=weights, amplify=stage1_epochs > 0,
                               memory_items=memory_items, temperature=temperature, gate=gate, residual=residual,
                               score=score, sigma=sigma)
        self.amplification_loss = AmplificationStageLoss(alpha, max_anomalous_patches, max_normal_patches)
        self.distillation_loss = NormalityDistillationLoss(hard_samples)
        self._synthesizer: AnomalySynthesizer | None = None
        self.synthesis_plan = SynthesisPlan()  # stage 1's synthesizer, in DataLoader workers when there are any
        self.foreground_choice: tuple[str, float | None] | None = None  # resolved foreground, separability

    @property
    def stage(self) -> int:
        """The training stage (1 or 2) of the current epoch."""
        trainer, shares = self.trainer, (self.hparams.stage1_epochs, self.hparams.stage2_epochs)
        if trainer.max_steps > 0:  # a schedule in optimiser steps splits them in the same ratio
            return 1 if trainer.global_step < stage1_epoch_count(trainer.max_steps, *shares) else 2
        return 1 if self.current_epoch < stage1_epoch_count(trainer.max_epochs, *shares) else 2

    def resolve_foreground(self, images: list[np.ndarray]) -> tuple[str, float | None]:
        """The synthesis foreground for this category: the option, or for ``auto`` the choice made on ``images``."""
        if self.foreground_choice is None:
            mode = self.hparams.foreground
            self.foreground_choice = texture_or_object(images) if mode == "auto" else (mode, None)
        return self.foreground_choice

    def synthesizer_for(self, images: torch.Tensor) -> AnomalySynthesizer:
        """Pseudo-anomaly generator, built on first use (so loading a checkpoint needs no texture folder); an
        ``auto`` foreground not resolved from the training set yet is resolved on ``images``."""
        if self._synthesizer is None:
            mode, _ = self.resolve_foreground([to_uint8_rgb(image) for image in images])
            self._synthesizer = AnomalySynthesizer(
                foreground=mode, texture_dir=self.hparams.texture_dir,
                anomaly_probability=self.hparams.anomaly_probability, seed=torch.initial_seed(),
            )
            state = self.restored_generator_state("synthesizer")
            if state is not None:
                self._synthesizer.generator.set_state(state)
            self.synthesis_plan.add("synthesizer", self._synthesizer)
        return self._synthesizer

    def random_generators(self) -> dict[str, torch.Generator]:
        return {} if self._synthesizer is None else {"synthesizer": self._synthesizer.generator}

    def check_schedule(self, max_epochs: int | None, max_steps: int) -> None:
        """Refuse a schedule that gives stage 1 no epoch (or step) although it has a share."""
        budget = self.stage_budgets(max_epochs, max_steps)
        unit = "steps" if max_steps > 0 else "epochs"
        if self.hparams.stage1_epochs > 0 and budget[f"stage1_{unit}"] == 0:
            msg = (f"AAND needs at least 2 {unit}: with {budget[f'stage2_{unit}']} the amplification stage gets none "
                   f"and the student would distil from an untrained amplifier; train 2 or more {unit}, or pass "
                   "stage1_epochs=0 (Table V (d))")
            raise ValueError(msg)

    def stage_budgets(self, max_epochs: int | None, max_steps: int) -> dict[str, int]:
        """Epochs (or, with ``max_steps > 0``, optimiser steps) of each stage under the trainer's schedule."""
        shares = (self.hparams.stage1_epochs, self.hparams.stage2_epochs)
        unit, total = ("steps", max_steps) if max_steps > 0 else ("epochs", max_epochs)
        first = stage1_epoch_count(total, *shares)
        second = (total - first) if total is not None and total >= 0 else shares[1]
        return {f"stage1_{unit}": first, f"stage2_{unit}": second}

    def training_report(self, datamodule: Any, max_epochs: int | None, max_steps: int) -> dict[str, Any]:
        """Per-stage budgets and the synthesis foreground, for ``metrics.json``."""
        mode, separability = self.resolve_foreground(sample_images(getattr(datamodule, "train_data", None)))
        report: dict[str, Any] = {**self.stage_budgets(max_epochs, max_steps), "foreground": mode}
        if separability is not None:
            report["foreground_separability"] = round(separability, 4)
        return report

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.check_schedule(self.trainer.max_epochs, self.trainer.max_steps)

    def setup(self, stage: str) -> None:
        """Build stage 1's synthesizer on the datamodule's training set before the first loader starts its workers
        (they copy the synthesizers then)."""
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if stage == "fit" and self.hparams.stage1_epochs > 0 and datamodule is not None:
            images = sample_images(getattr(datamodule, "train_data", None))
            if images:
                self.resolve_foreground(images)
                self.synthesizer_for(torch.empty(0))

    def on_train_start(self) -> None:
        """Resolve an ``auto`` foreground on the training set (its order, not the shuffled batches), so that a
        resumed run chooses as the first did."""
        if self.foreground_choice is not None:
            return
        datamodule = self.trainer.datamodule
        dataset = datamodule.train_data if datamodule is not None else getattr(self.trainer.train_dataloader,
                                                                                "dataset", None)
        images = sample_images(dataset)
        if images:
            self.resolve_foreground(images)

    def configure_optimizers(self) -> list[optim.Optimizer]:
        """One Adam per stage: [RAA modules (stage 1),] bottleneck + decoder (stage 2)."""
        betas = tuple(self.hparams.betas)
        student = [*self.model.bottleneck.parameters(), *self.model.decoder.parameters()]
        optimizers = [optim.Adam(student, lr=self.hparams.lr, betas=betas)]
        if self.model.raa is not None:
            optimizers.insert(0, optim.Adam(self.model.raa.parameters(), lr=self.hparams.lr, betas=betas))
        return optimizers

    def amplification_step_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_1 (Eq. 9) on pseudo-anomalies synthesised from the batch's normal images."""
        synthesis = take_synthesis(batch, "synthesizer", self.synthesizer_for(batch.image), batch.image,
                                   [str(path) for path in batch.image_path])
        vanilla = self.model.encode(synthesis.anomalous)
        masks = [downsample_mask(synthesis.mask, features.shape[-2:]) for features in vanilla]
        weights = [mask.to(features.dtype) for mask, features in zip(masks, vanilla, strict=True)]
        outputs = self.model.amplify(vanilla, weights)
        return self.amplification_loss(vanilla, [o.amplified for o in outputs], [o.gate for o in outputs], masks)

    def distillation_step_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_2 (Eq. 12) of the student on the advanced teacher's features of the normal images."""
        return self.distillation_loss(*self.model(batch.image))

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        stage = self.stage
        optimizer = self.optimizer(0 if stage == 1 else -1)
        if stage == 1:
            loss, parts = self.amplification_step_loss(batch)
        else:
            self.synthesis_plan.pause("synthesizer")  # the data side stops making anomalies nobody uses
            loss, parts = self.distillation_step_loss(batch)
        if loss.requires_grad:  # without a gate, a batch with no anomalous patch has nothing to learn
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        size = len(batch.image)
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, batch_size=size)
        self.log("stage", float(stage), on_step=False, on_epoch=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=size)
        return {"loss": loss.detach()}
