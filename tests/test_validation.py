"""The per-epoch synthetic validation score: what it ranks, that it sees no test image and leaves training alone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from lightning.pytorch import Trainer

from distillad.data import FolderLayout
from distillad.models.rd import RD
from distillad.models.validation import SyntheticValidation, synthetic_validation_scores


class _Reference(torch.nn.Module):
    """Anomaly map = distance to the closest remembered normal image: the synthetic anomalies, exactly."""

    def __init__(self, normal: torch.Tensor, constant: bool = False) -> None:
        super().__init__()
        self.normal = normal
        self.constant = constant

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        distance = (images[:, None] - self.normal[None]).abs().mean(dim=2)  # (B, N, H, W)
        closest = distance.flatten(2).mean(2).argmin(1)
        maps = distance[torch.arange(len(images)), closest].unsqueeze(1)
        if self.constant:
            maps = torch.zeros_like(maps)
        return InferenceBatch(pred_score=maps.flatten(1).amax(1), anomaly_map=maps)


def test_scores_rank_the_synthetic_twins_and_their_anomaly_pixels() -> None:
    torch.manual_seed(0)
    normal = torch.rand(6, 3, 32, 32) * 0.2 + 0.4
    loader = [ImageBatch(image=torch.cat([normal[:3], torch.rand(1, 3, 32, 32)]), gt_label=torch.tensor([0, 0, 0, 1])),
              ImageBatch(image=normal[3:], gt_label=torch.tensor([0, 0, 0]))]
    module = SimpleNamespace(model=_Reference(normal), model_inputs=lambda images: images)
    scores = synthetic_validation_scores(module, [loader])
    assert scores == {"val_synthetic_image_AUROC": 1.0, "val_synthetic_pixel_AUROC": pytest.approx(1.0, abs=0.02)}
    module.model = _Reference(normal, constant=True)  # a model that sees nothing ranks at chance
    assert synthetic_validation_scores(module, [loader]) == {"val_synthetic_image_AUROC": 0.5,
                                                             "val_synthetic_pixel_AUROC": 0.5}
    anomalous_only = [ImageBatch(image=torch.rand(2, 3, 32, 32), gt_label=torch.tensor([1, 1]))]
    assert synthetic_validation_scores(module, [anomalous_only]) == {}


def _folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        cv2.imwrite(str(folder / f"{index:03d}.png"), (rng.random((40, 40, 3)) * 255).astype(np.uint8))
    return folder


def _fit_rd(tmp_path: Path, folder: Path, name: str) -> tuple[RD, Path]:
    torch.manual_seed(0)
    datamodule = FolderLayout(folder, image_size=(32, 32), train_batch_size=4, val_split_ratio=0.25, seed=0)
    model = RD(image_size=(32, 32), post_processor=False, evaluator=False, visualizer=False)
    trainer = Trainer(max_epochs=2, limit_val_batches=0, default_root_dir=tmp_path / name, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, deterministic=True,
                      **model.trainer_arguments)
    trainer.fit(model, datamodule=datamodule)
    return model, tmp_path / name


def test_every_epoch_logs_the_score_and_training_is_unchanged_by_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path, 8)
    validated, run = _fit_rd(tmp_path, folder, "with")
    logged = (next(run.glob("lightning_logs/*/metrics.csv"))).read_text().splitlines()
    header = logged[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in logged[1:]]
    values = [float(row["val_synthetic_image_AUROC"]) for row in rows if row.get("val_synthetic_image_AUROC")]
    assert len(values) == 2 and all(0 <= value <= 1 for value in values)  # one per epoch

    monkeypatch.setattr(SyntheticValidation, "on_train_epoch_end", lambda *args: None)
    plain, _ = _fit_rd(tmp_path, folder, "without")
    for (name, a), b in zip(validated.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the score's data loading and synthesis leave the training RNG alone


@pytest.mark.slow
def test_fit_writes_the_learning_curve(fit_weld_subset) -> None:
    metrics, run_dir = fit_weld_subset("rd", epochs=2)
    written = json.loads((run_dir / "metrics.json").read_text())
    curve = written["validation_curve"]
    assert [point["epoch"] for point in curve] == [0, 1] and curve == metrics["validation_curve"]
    assert all(0 <= point["image_AUROC"] <= 1 and 0 <= point["pixel_AUROC"] <= 1 for point in curve)
