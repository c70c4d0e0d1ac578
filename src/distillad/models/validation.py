"""A convergence score that never sees a test image: held-out normal images against synthetic anomalies on them.

After every training epoch, :class:`SyntheticValidation` scores the held-out normal images (the validation split
when it was taken from the training images, else the training images; see
:func:`~distillad.models.base.held_out_normal_loaders`) and a twin of each with a synthetic anomaly (DRAEM-style
Perlin mask and texture over the whole image, fainter than the training anomalies of DMDD and AAND
(:data:`VALIDATION_BETA`), the same anomalies every epoch), and logs

- ``val_synthetic_image_AUROC``: twins ranked above the normal images by the image score;
- ``val_synthetic_pixel_AUROC``: anomaly-mask pixels ranked above all other pixels by the anomaly map.

Real defects differ from synthetic ones, so the score shows when a model stops learning, not how well it will
find real defects; it may be used for early stopping or checkpoint choice because it uses training images only.
It runs with the training RNG saved and restored, so training is bitwise the same with or without it.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from distillad.metrics import auroc
from distillad.synthesis import AnomalySynthesizer

#: Seed of the validation anomalies (fixed: every epoch and every run of a dataset sees the same ones).
VALIDATION_SEED = 20240
#: Opacity of the original image inside the validation anomalies (DRAEM's beta): fainter than in training (texture
#: weight 0.1-0.5 instead of 0.2-1.0). With training-strength anomalies the score saturated for a model trained on
#: them (DMDD, 30 steps on mtd at 128 px: image AUROC 1.0 at every epoch; 0.92 with these, pixel 0.94 -> 0.90).
VALIDATION_BETA = (0.5, 0.9)
#: Most held-out images scored per epoch (with their twins, twice as many forward passes).
MAX_VALIDATION_IMAGES = 64


@torch.no_grad()
def synthetic_validation_scores(module: LightningModule, loaders: list) -> dict[str, float]:
    """Image and pixel AUROC of ``module`` on the normal images of the first loader that has any, and their
    synthetic twins; empty when there are no normal images."""
    synthesizer = AnomalySynthesizer(foreground="none", beta_range=VALIDATION_BETA, anomaly_probability=1.0,
                                     seed=VALIDATION_SEED)
    scores, labels, maps, masks = [], [], [], []
    for loader in loaders:
        seen = 0
        for batch in loader:
            images = module.model_inputs(batch.image)
            if batch.gt_label is not None:
                images = images[batch.gt_label.to(images.device) == 0]
            images = images[: MAX_VALIDATION_IMAGES - seen]
            if len(images) == 0:
                continue
            synthesis = synthesizer(images)
            for label, part, mask in ((0, synthesis.normal, torch.zeros_like(synthesis.mask)),
                                      (1, synthesis.anomalous, synthesis.mask)):
                output = module.model(part)
                scores.append(output.pred_score.float().cpu())
                maps.append(output.anomaly_map.float().cpu())
                masks.append(mask.bool().cpu())
                labels.append(torch.full((len(part),), label, dtype=torch.long))
            seen += len(images)
            if seen >= MAX_VALIDATION_IMAGES:
                break
        if seen:
            break
    if not scores:
        return {}
    return {"val_synthetic_image_AUROC": auroc(torch.cat(scores), torch.cat(labels)),
            "val_synthetic_pixel_AUROC": auroc(torch.cat(maps), torch.cat(masks).long())}


class SyntheticValidation(Callback):
    """Log :func:`synthetic_validation_scores` at the end of every training epoch (see the module docstring)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from distillad.models.base import held_out_normal_loaders

        datamodule = trainer.datamodule
        if datamodule is None:
            return
        was_training = pl_module.training
        with torch.random.fork_rng(devices=[]):
            pl_module.prepare_scoring(datamodule)
            pl_module.eval()
            try:
                values = synthetic_validation_scores(pl_module, held_out_normal_loaders(datamodule))
            finally:
                pl_module.train(was_training)
        for name, value in values.items():
            pl_module.log(name, value, rank_zero_only=True)
