"""DMDD as an anomalib module: student epochs of dual-modeling distillation, each followed by an MSN epoch."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from distillad.data import one_pass
from distillad.models.base import DistillationModule
from distillad.models.dmdd.loss import AbnormalityInverseMimickingLoss, NormalityGuidanceLoss, SegmentationLoss
from distillad.models.dmdd.torch_model import DMDDModel
from distillad.models.options import AT_LEAST_ONE, COMMON_RULES, NON_NEGATIVE, POSITIVE, Rule
from distillad.synthesis import AnomalySynthesizer, SynthesisPlan, take_synthesis


class SegmentationEpoch(Callback):
    """Train the MSN at the end of every student epoch (Sec. 3.1), before the epoch's checkpoint is written
    (Lightning runs checkpoint callbacks last), so a resumed run has both parts of every finished epoch."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.train_segmentation_epoch()


class DMDD(DistillationModule, AnomalibModule):
    """Dual-Modeling Decouple Distillation (Liu et al., ACM MM 2024).

    Each training step synthesises an anomalous twin I_a^n of every normal image I^n (DRAEM-style
    Perlin anomalies over the whole image) and updates the decoupled student and PMN with
    L_NGM + L_AIM (Eq. 2 + Eq. 3, unweighted: the paper gives no weights). Both are per normal/anomalous pair,
    averaged over the batch: Eq. 2 sums the pair's two distances D^n + D^a, and Eq. 3, defined for one image
    I^n or I_a^n, is summed over the pair's two images likewise. At the end of every epoch the
    teacher and student are frozen and the MSN is trained for one pass over the training images on
    normal / foreground-aware synthetic pairs with L_seg (Eq. 5).

    Switches (Tables 4 and 5): ``branches`` (``"both"``, ``"normality"``, ``"abnormality"``),
    ``pmn_inner``, ``pmn_outer``, ``msn``, ``fas`` (GrabCut foreground for MSN synthesis; off = whole
    image), ``pyramid_upsampling``, ``multi_perception``.

    Learning rate. The paper trains the student with Adam at 0.005. The student's stages start as the pretrained
    teacher, and Adam's first steps move every weight by about the learning rate whatever its gradient, so at
    0.005 the copy leaves its start at once (L_NGM + L_AIM 0.26 -> 2.1 after one step on mtd at 128 px).
    ``benchmarks/results/dmdd_learning_rate.md`` (200 steps, no MSN, mtd and weld at 128 px, two sweeps) compares
    it with 0.0005, the pretrained stages at 0.1 x 0.005 (``pretrained_lr_scale=0.1``) and a 50-step warm-up:
    the gentler schedules end at lower losses and raise image AUROC in most cells (by up to 5 points) but lower
    weld AUPRO by 3-15 points. No schedule won on both levels, so the paper's single rate stays the default;
    ``pretrained_lr_scale`` (the factor on ``lr`` for the pretrained stages) is the image-level option.

    Synthesis. The paper introduces FAS for the segmentation network ("making the fusion network pay more
    attention to the foreground areas", Sec. 3.4) and describes the student's pairs (Sec. 3.3) as plain synthetic
    anomalies, so the student's twins cover the whole image and only the MSN's are restricted to the GrabCut
    foreground. FAS for the student too lowered weld pixel AUROC by 2-6 and AUPRO by 4-15 points over two seeds
    (``benchmarks/results/dmdd_fas_both.md``; on mtd GrabCut falls back on 99 % of the images and nothing
    changes). Textures come from ``texture_dir`` (DTD in the papers; pass it with ``--preset paper``) or the
    built-in source, which never crops the image being corrupted. With ``num_workers > 0`` both syntheses run in
    the DataLoader workers (:mod:`distillad.synthesis.workers`). On images that fill the frame GrabCut finds
    no object and FAS falls back to the whole image (mtd 99 %, weld 76 % of the training images): the run warns
    and reports the share in ``metrics.json`` (``fas_whole_image_share``).

    Frozen passes. ``bf16_frozen_passes=True`` runs the passes that take no gradient (the teacher on the
    anomalous twins, in the student step and the MSN epoch, and the MSN epoch's frozen student) under bfloat16
    autocast in float32 training on a CPU with native bfloat16
    (:meth:`~distillad.models.base.DistillationModule.frozen_pass_precision`); the cached teacher features of
    the normal images and every distance stay float32. On 2 AVX512-BF16 cores (mtd, 256 px, batch 16) it cut
    the frozen time from 1.19 to 0.73 s a batch, a step only 8 % (2.70 -> 2.93 images/s), and at equal steps
    (128 px, 100 steps, seeds 0 and 1, ``benchmarks/results/dmdd_frozen_bf16.md``) it lowered AUPRO in all four
    cells (weld -8.5 / -2.6, mtd -8.6 / -6.3 points, where the two float32 seeds differ by 7.1 and 0.3) while
    raising image AUROC: the MSN learns on bfloat16-rounded maps and is scored on float32 ones. So it is off.
    For the same reason, under ``bf16-mixed`` / ``16-mixed`` these passes and the normal images' teacher features
    run in float32 (autocast switched off); only the trainable student and the MSN take the mixed precision.

    Args:
        backbone: timm encoder (the paper: ``wide_resnet50_2``; default ``tf_efficientnet_lite0`` works offline).
        pretrained: Pretrained teacher and student initialisation.
        weights: Explicit encoder weights file.
        image_size: Input size (256 in the paper).
        lr: Adam learning rate of the student's new layers (decoupling convolutions) and the PMN (0.005 in the
            paper).
        pretrained_lr_scale: Factor on ``lr`` for the student's stages, the copy of the pretrained teacher (1, the
            paper's single learning rate; see "Learning rate").
        msn_lr: Adam learning rate of the MSN. The paper gives 0.005 for the student network only; at 0.0005
            the MSN localised better on mtd and weld (``benchmarks/results/dmdd_msn.md``: pixel AUROC +3-5, AUPRO
            +7-19 points at 64 steps, 128 px, two seeds).
        top_k: Pixels averaged into the score (100).
        global_attention_stride: Pixels a side per weight of the MSN's global attention G (1: one weight per
            channel and pixel, as the paper's description reads).
        texture_dir: DTD-style texture folder for synthesis; without it a built-in source is used.
        seed: Seed of the anomaly synthesisers.
        sigma: Gaussian smoothing of the summed map when ``msn=False``.
        bf16_frozen_passes: In float32 training on a CPU with native bfloat16, encode the synthetic twins with the
            teacher, and run the MSN epoch's frozen student, under bfloat16 autocast (off; see "Frozen passes").
        pre_processor, post_processor, evaluator, visualizer: anomalib components or flags.
    """

    option_rules: ClassVar[dict[str, Rule]] = {**COMMON_RULES, "msn_lr": POSITIVE, "pretrained_lr_scale": NON_NEGATIVE,
                                               "top_k": AT_LEAST_ONE, "global_attention_stride": AT_LEAST_ONE}

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool = True,
        weights: str | Path | None = None,
        image_size: tuple[int, int] = (256, 256),
        branches: str = "both",
        pmn_inner: bool = True,
        pmn_outer: bool = True,
        msn: bool = True,
        fas: bool = True,
        pyramid_upsampling: bool = True,
        multi_perception: bool = True,
        lr: float = 0.005,
        msn_lr: float = 0.0005,
        pretrained_lr_scale: float = 1.0,
        top_k: int = 100,
        global_attention_stride: int = 1,
        texture_dir: str | Path | None = None,
        seed: int = 0,
        sigma: float = 4.0,
        bf16_frozen_passes: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        self.init_anomalib_module(image_size, pre_processor, post_processor, evaluator, visualizer)
        self.automatic_optimization = False
        self.model = DMDDModel(backbone, pretrained=pretrained, weights=weights, image_size=tuple(image_size),
                               branches=branches, pmn_inner=pmn_inner, pmn_outer=pmn_outer, msn=msn,
                               pyramid_upsampling=pyramid_upsampling, multi_perception=multi_perception,
                               top_k=top_k, sigma=sigma, global_attention_stride=global_attention_stride)
        self.ngm_loss = NormalityGuidanceLoss()
        self.aim_loss = AbnormalityInverseMimickingLoss()
        self.segmentation_loss = SegmentationLoss()
        self.synthesizer = AnomalySynthesizer(foreground="none", texture_dir=texture_dir, seed=seed)
        self._fas_reported = False
        self.fas_synthesizer = AnomalySynthesizer(foreground="grabcut" if fas else "none", texture_dir=texture_dir,
                                                  seed=seed + 1)
        self.synthesis_plan = SynthesisPlan({"synthesizer": self.synthesizer, "fas_synthesizer": self.fas_synthesizer},
                                            active={"synthesizer"})  # the MSN epoch switches to FAS

    def random_generators(self) -> dict[str, torch.Generator]:
        return {"synthesizer": self.synthesizer.generator, "fas_synthesizer": self.fas_synthesizer.generator}

    def configure_optimizers(self) -> list[optim.Optimizer]:
        lr = self.hparams.lr
        new_layers = [*self.model.student.decouple.parameters(), *self.model.pmn.parameters()]
        optimizers = [optim.Adam([{"params": self.model.student.stages.parameters(),
                                   "lr": lr * self.hparams.pretrained_lr_scale},
                                  {"params": new_layers, "lr": lr}], lr=lr)]
        if self.model.msn is not None:
            optimizers.append(optim.Adam(self.model.msn.parameters(), lr=self.hparams.msn_lr))
        return optimizers

    def configure_callbacks(self) -> list[Callback]:
        callbacks = super().configure_callbacks()
        if self.model.msn is None:
            return callbacks
        return [*callbacks[:-1], SegmentationEpoch(), callbacks[-1]]  # the MSN epoch before the epoch's validation

    def distillation_losses(self, normal: torch.Tensor, anomalous: torch.Tensor,
                            masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_NGM and L_AIM for a batch of normal images, their anomalous twins and the twins' masks."""
        pair = torch.cat([normal, anomalous])
        teacher = self.model.pair_teacher_features(normal, anomalous, self.frozen_passes())
        student = self.model.student_features(pair)
        batch = len(normal)
        losses = {}
        if "normality" in student:
            losses["ngm"] = self.ngm_loss([t[:batch] for t in teacher], [s[:batch] for s in student["normality"]],
                                          [s[batch:] for s in student["normality"]])
        if "abnormality" in student:  # Eq. 3 holds per image: a pair contributes its normal and its anomalous image
            losses["aim"] = (
                self.aim_loss([t[:batch] for t in teacher], [s[:batch] for s in student["abnormality"]],
                              torch.zeros_like(masks))
                + self.aim_loss([t[batch:] for t in teacher], [s[batch:] for s in student["abnormality"]], masks))
        return losses

    def frozen_passes(self) -> AbstractContextManager:
        """The context of the step's no-grad passes (:meth:`frozen_pass_precision`): float32 under a mixed
        precision, bfloat16 autocast in float32 training where the CPU has it and ``bf16_frozen_passes`` is on."""
        return self.frozen_pass_precision(self.hparams.bf16_frozen_passes)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One dual-modeling distillation step (Sec. 3.3) on normal / synthetic-anomalous pairs."""
        del args, kwargs
        normal, anomalous, masks = take_synthesis(batch, "synthesizer", self.synthesizer, batch.image,
                                                  batch.image_path)
        losses = self.distillation_losses(normal, anomalous, masks)
        loss = sum(losses.values())
        optimizer = self.optimizer(0)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        size = len(batch.image)
        for name, value in losses.items():
            self.log(f"train_{name}_loss", value, on_epoch=True, on_step=False, batch_size=size)
        self.log("train_loss", loss, on_epoch=True, prog_bar=True, batch_size=size)
        return {"loss": loss.detach()}

    def train_segmentation_epoch(self) -> float:
        """One pass of MSN training (Sec. 3.4) over the training images with teacher and student frozen.

        Runs in the trainer's precision and, under DDP, over this rank's share of the images with gradients
        averaged over the ranks (:meth:`optimize_outside_training_step`).
        """
        optimizer = self.optimizer(1)
        self.model.eval()
        self.model.msn.train()
        total, count = 0.0, 0
        with self.synthesis_plan.using("fas_synthesizer"):  # workers of this pass make FAS pairs only
            for batch in one_pass(self.trainer.train_dataloader, "MSN epoch"):
                normal, anomalous, masks = take_synthesis(batch, "fas_synthesizer", self.fas_synthesizer,
                                                          self.model_inputs(batch.image), batch.image_path)
                pair = torch.cat([normal, anomalous])
                pair_masks = torch.cat([torch.zeros_like(masks), masks])
                with self.trainer.precision_plugin.forward_context():
                    with torch.no_grad():
                        teacher = self.model.pair_teacher_features(normal, anomalous, self.frozen_passes())
                        with self.frozen_passes():
                            maps = self.model.distance_maps(pair, teacher)
                    logits, score = self.model.msn(maps, pair.shape[-2:])
                    loss = self.segmentation_loss(logits, score, pair_masks)
                self.optimize_outside_training_step(optimizer, loss)
                total, count = total + float(loss), count + 1
        self.model.train()  # keeps the teacher and the student's BatchNorm statistics frozen
        self._report_fas_fallback()
        mean_loss = total / max(count, 1)
        self.log("train_seg_loss", mean_loss)
        return mean_loss

    def _report_fas_fallback(self) -> None:
        """Say once when FAS changes nothing: GrabCut finds no object on images that fill the frame."""
        share = self.fas_synthesizer.foregrounds.whole_image_share()
        if self.hparams.fas and share is not None and share > 0.5 and not self._fas_reported:
            logging.getLogger(__name__).warning(
                "FAS: GrabCut found no object in %.0f%% of the training images (they fill the frame), so their "
                "MSN anomalies cover the whole image, as with fas=False", 100 * share)
            self._fas_reported = True

    def training_report(self, datamodule: Any, max_epochs: int | None, max_steps: int) -> dict[str, Any]:
        """The share of training images where FAS fell back to the whole image (when this process trained)."""
        del datamodule, max_epochs, max_steps
        share = self.fas_synthesizer.foregrounds.whole_image_share() if self.hparams.fas else None
        return {} if share is None else {"fas_whole_image_share": round(share, 4)}
