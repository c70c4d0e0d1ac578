"""What every distillad AnomalibModule shares: input handling, evaluation and trainer settings."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.data import AnomalibDataModule, Batch
from anomalib.data.utils import ValSplitMode
from anomalib.metrics import AUPRO, Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Resize

from distillad.metrics import RawScoreAUROC
from distillad.models.options import COMMON_RULES, Rule, check_options
from distillad.training import cpu_has_native_bf16


class DistillationModule:
    """Mixin for distillad's AnomalibModules (placed before ``AnomalibModule`` in the bases).

    - The pre-processor only resizes: encoders normalise inside the model (``StagedEncoder.normalize``),
      so anomaly synthesis works in plain [0, 1] image space and exported models need no pre-step.
    - The default post-processor thresholds but does not normalise (normalisation clamps and ties scores).
    - The default evaluator ranks raw scores (:class:`~distillad.metrics.RawScoreAUROC`) instead of
      anomalib's sigmoid-squashing AUROC.
    - The torch model lives in ``self.model`` and returns an ``InferenceBatch`` in eval mode.
    """

    model: nn.Module
    #: Ranges of numeric options, checked with their types before anything is built (``distillad.models.options``).
    option_rules: ClassVar[dict[str, Rule]] = COMMON_RULES

    def init_anomalib_module(self, image_size: tuple[int, int], pre_processor: nn.Module | bool,
                             post_processor: nn.Module | bool, evaluator: Evaluator | bool,
                             visualizer: nn.Module | bool) -> None:
        """Check the caller's arguments (:func:`~distillad.models.options.check_options`), initialise
        ``AnomalibModule`` (``True`` pre-processor = resize only) and save the arguments as hyperparameters, so
        checkpoints rebuild the same model. Call it first in ``__init__``."""
        caller = inspect.getargvalues(inspect.currentframe().f_back)
        components = {"pre_processor", "post_processor", "evaluator", "visualizer"}
        arguments = {name: caller.locals[name] for name in caller.args[1:] if name not in components}
        check_options(type(self), arguments)
        if pre_processor is True:
            pre_processor = PreProcessor(transform=Resize(tuple(image_size), antialias=True))
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.save_hyperparameters(arguments)

    def random_generators(self) -> dict[str, torch.Generator]:
        """The model's own random generators (its anomaly synthesizers'), by name. Checkpoints carry their states,
        so a resumed run draws the anomalies an uninterrupted one would; a model that builds one after loading
        takes its state from :meth:`restored_generator_state`."""
        return {}

    def restored_generator_state(self, name: str) -> torch.Tensor | None:
        """The state a loaded checkpoint holds for generator ``name`` that no existing generator took yet."""
        return getattr(self, "_pending_generator_states", {}).pop(name, None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["random_generators"] = {name: generator.get_state()
                                           for name, generator in self.random_generators().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._pending_generator_states = dict(checkpoint.get("random_generators", {}))
        for name, generator in self.random_generators().items():
            state = self.restored_generator_state(name)
            if state is not None:
                generator.set_state(state)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Thresholds without normalisation: anomalib's min-max normalisation clamps test scores outside the
        validation range to 0 or 1, which ties them (a seeded model read image AUROC 0.375 instead of 0.4375)."""
        return PostProcessor(enable_normalization=False)

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image and pixel AUROC on raw scores, and AUPRO (FPR limit 0.3)."""
        return Evaluator(test_metrics=[
            RawScoreAUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            RawScoreAUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ])

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict the held-out batch; the post-processor collects normalisation statistics from it."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def configure_callbacks(self) -> list:
        """anomalib's components as callbacks, with the evaluator moved before the post-processor.

        anomalib's order runs the post-processor first, so test metrics would see scores min-max normalised
        with validation statistics and clamped to [0, 1] (ties: wrong AUROC); the evaluator must read raw scores.
        Last comes :class:`~distillad.models.validation.SyntheticValidation`, the per-epoch convergence score.
        """
        from distillad.models.validation import SyntheticValidation

        ordered = sorted(super().configure_callbacks(), key=lambda callback: callback is not self.evaluator)
        return [*ordered, SyntheticValidation()]

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images from a dataloader as the torch model expects them: pre-processed (resized), on its device.

        Lightning applies the pre-processor only to the batches of its own loops; loops a module or the
        pipeline runs itself (MSN epochs, standardisation statistics, evaluation) go through here.
        """
        images = images.to(self.device)
        return self.pre_processor.transform(images) if self.pre_processor else images

    def optimizer(self, index: int) -> torch.optim.Optimizer:
        """Optimiser ``index`` of a manually optimised module (Lightning returns a bare one when there is one)."""
        optimizers = self.optimizers()
        return optimizers[index] if isinstance(optimizers, list) else optimizers

    def optimize_outside_training_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One update of ``optimizer`` from ``loss`` in a loop the module runs itself (DMDD's MSN epoch).

        Lightning prepares precision and DDP only for ``training_step``, so this does what it would: scales the
        loss under ``16-mixed`` and averages the gradients over DDP ranks (DDP synchronises only the backward
        passes of its own forward). The bare optimiser is stepped, so these updates do not count as training
        steps (``max_steps`` counts the steps of ``training_step``).
        """
        bare = getattr(optimizer, "optimizer", optimizer)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        bare.zero_grad()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        average_gradients([p for group in bare.param_groups for p in group["params"] if p.grad is not None])
        if scaler is not None:
            scaler.step(bare)
            scaler.update()
        else:
            bare.step()

    def check_schedule(self, max_epochs: int | None, max_steps: int) -> None:
        """Raise ``ValueError`` for a trainer schedule (``max_epochs``, ``max_steps``; -1 = unset) this model
        cannot train sensibly; called before training by the pipeline and at fit start."""
        del max_epochs, max_steps

    def prepare_scoring(self, datamodule: AnomalibDataModule) -> None:
        """Fit whatever scoring needs beyond the weights (DSKD: Eq. 8's statistics) before a mid-training score."""
        del datamodule

    def training_report(self, datamodule: AnomalibDataModule, max_epochs: int | None, max_steps: int) -> dict:
        """What the model wants written beside the metrics about its training (schedule parts, choices made)."""
        del datamodule, max_epochs, max_steps
        return {}

    def on_fit_start(self) -> None:
        """Warn when validation (where anomalib fits its threshold) is the test set, as anomalib's ``MVTecAD``
        makes it by default."""
        if validation_sees_test_images(self.trainer.datamodule) and self.trainer.limit_val_batches != 0:
            logging.getLogger(__name__).warning(
                "the datamodule's validation split is taken from its test split (val_split_mode=%s): anomalib's "
                "threshold would be fitted on test images; pass val_split_mode='from_train'",
                ValSplitMode(self.trainer.datamodule.val_split_mode).value)

    def frozen_pass_precision(self, bf16: bool = False) -> AbstractContextManager:
        """The precision of a training step's no-grad passes (a frozen teacher, a frozen student's maps).

        - Under ``bf16-mixed`` / ``16-mixed``: float32 (autocast switched off), the precision inference,
          calibration and export compare the student in. A model trained on reduced-precision frozen features is
          scored on float32 ones: RD, DSKD and AAND lost up to 11.2 AUPRO points that way, and recovered with
          float32 teachers (:func:`float32_teacher`, ``benchmarks/results/precision_long.md``).
        - In float32 training, with ``bf16`` on a CPU known to compute bfloat16 natively
          (:func:`~distillad.training.cpu_has_native_bf16`): bfloat16 autocast. Frozen passes are forward-only,
          where bfloat16 pays most: on 2 AVX512-BF16 cores (Lite0, 256 px, no grad) the teacher encodes 16 images
          in 0.14 s instead of 0.36 s, and DMDD's student 32 in 0.48 s instead of 0.92 s, with features within
          1e-3 of float32 in cosine distance. Distances are taken in float32
          (:func:`~distillad.components.distance.cosine_distance_map`).
        - Otherwise (also without a trainer) a null context.
        """
        trainer = self._trainer
        if trainer is None:
            return nullcontext()
        if trainer.precision in ("bf16-mixed", "16-mixed"):
            return torch.autocast(self.device.type, enabled=False)
        if bf16 and self.device.type == "cpu" and trainer.precision == "32-true" and cpu_has_native_bf16(unknown=False):
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS


# Validation splits holding no test image: held out from train/good, synthetic anomalies on training images, or a
# folder of its own (MVTec LOCO's validation/good). anomalib's MVTecAD makes validation the test set by default
# (same_as_test) and Folder moves test images into it (from_test).
TRAINING_VALIDATION_SPLITS = (ValSplitMode.FROM_TRAIN, ValSplitMode.SYNTHETIC, ValSplitMode.FROM_DIR)


def validation_sees_test_images(datamodule: AnomalibDataModule | None) -> bool:
    """Whether ``datamodule``'s validation split is (part of) its test split."""
    mode = getattr(datamodule, "val_split_mode", ValSplitMode.NONE)
    return ValSplitMode(mode) in (ValSplitMode.SAME_AS_TEST, ValSplitMode.FROM_TEST)


def held_out_normal_loaders(datamodule: AnomalibDataModule) -> list[Iterable[Batch]]:
    """Loaders a model may fit score statistics on, in order of preference: validation, then training images.

    The validation loader is used only when its split holds no test image (:data:`TRAINING_VALIDATION_SPLITS`);
    the training loader is always the fallback. Callers keep only normal samples (``gt_label == 0``).
    """
    loaders = []
    val_data = getattr(datamodule, "val_data", None)
    mode = ValSplitMode(getattr(datamodule, "val_split_mode", ValSplitMode.NONE))
    if mode in TRAINING_VALIDATION_SPLITS and val_data is not None and len(val_data) > 0:
        loaders.append(datamodule.val_dataloader())
    loaders.append(datamodule.train_dataloader())
    return loaders


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Replace the gradients of ``parameters`` by their mean over the ranks of the default process group, if any."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world_size = torch.distributed.get_world_size()
    if world_size == 1 or not parameters:
        return
    flat = torch.cat([p.grad.flatten() for p in parameters])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for parameter in parameters:
        parameter.grad.copy_(flat[offset:offset + parameter.grad.numel()].view_as(parameter.grad))
        offset += parameter.grad.numel()


def frozen(module: nn.Module) -> nn.Module:
    """Freeze ``module`` (no gradients) and put it in eval mode; see :func:`keep_frozen_in_eval`."""
    module.requires_grad_(False)
    return module.eval()


def float32_teacher(encoder: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The frozen ``encoder``'s features of ``images`` in float32, also inside a mixed-precision (autocast) step.

    Under ``bf16-mixed`` the teacher's features would otherwise be rounded to bfloat16 for training while
    inference, calibration and export compare the student with float32 ones. RD, DSKD and AAND cache these
    features across epochs, so float32 costs one slower pass per training image. On weld (600 steps, Intel Xeon
    with AMX; I-AUROC / P-AUROC / AUPRO): RD seed 0 float32 88.4 / 87.3 / 58.9, bf16-mixed with a bfloat16 teacher
    87.6 / 87.2 / 59.1, with this float32 teacher 90.0 / 88.8 / 63.1. AAND seed 1 float32 91.8 / 85.9 / 53.3,
    bf16-mixed with the vanilla teacher alone in float32 91.1 / 81.2 / 42.7, with its fixed advanced teacher in
    float32 too 92.7 / 87.2 / 57.3 (``precision_long.md``).
    """
    with torch.autocast(images.device.type, enabled=False):
        return encoder(images.float())


def keep_frozen_in_eval(model: nn.Module, mode: bool, frozen_modules: list[nn.Module]) -> None:
    """Apply ``model.train(mode)`` but keep frozen teachers in eval mode (BatchNorm statistics fixed)."""
    nn.Module.train(model, mode)
    for module in frozen_modules:
        module.eval()


def channels_last(model: nn.Module) -> nn.Module:
    """Store ``model``'s convolution weights channels-last (NHWC), the layout oneDNN and cuDNN convolve fastest.

    With the encoder's inputs also channels-last (:meth:`~distillad.backbones.StagedEncoder.normalize`), every
    convolution downstream stays in that layout. Measured on 2 CPU cores (Lite0, 256 px): frozen encoder
    forward 22 -> 30 images/s, DMDD student forward + backward 5.5 -> 10.9 images/s, an RD step 1.3x faster.
    Outputs are equal to float rounding (same arithmetic, another summation order).
    """
    return model.to(memory_format=torch.channels_last)


def image_score(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Image-level score = the anomaly map's maximum (RD Sec. 3.4, DSKD Eq. 8, AAND Eq. 14)."""
    return anomaly_map.flatten(1).amax(dim=1)

