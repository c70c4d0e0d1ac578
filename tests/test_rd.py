"""Tests of Reverse Distillation: the loss by hand, the frozen teacher, learning on real images, inference, Engine."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import InferenceBatch
from lightning.pytorch import seed_everything

from distillad.components import MultiScaleAnomalyMap
from distillad.models.rd import RD, ReverseDistillationModel
from distillad.models.rd.loss import ReverseDistillationLoss

NO_COMPONENTS = {"post_processor": False, "evaluator": False, "visualizer": False}


def pixels(*vectors: tuple[float, ...]) -> torch.Tensor:
    """Feature vectors laid out in one row: a (1, C, 1, N) map, float64."""
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(1, len(vectors[0]), 1, len(vectors))


@pytest.fixture(scope="module")
def tiny_rd() -> RD:
    torch.manual_seed(0)
    return RD(image_size=(64, 64), **NO_COMPONENTS)


# --- loss -------------------------------------------------------------------------------------------------


def toy_features() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two samples, two levels. Sample 0: level 1 opposite (distance 2); level 2 pixel (1,0) vs (0,1) orthogonal and
    (0,10) vs (0,10) identical. Sample 1: the student equals the teacher (distance 0 everywhere)."""
    teacher_1 = torch.cat([pixels((1.0, 0.0)), pixels((0.0, 3.0))])
    student_1 = torch.cat([pixels((-1.0, 0.0)), pixels((0.0, 3.0))])
    teacher_2 = torch.cat([pixels((1.0, 0.0), (0.0, 10.0)), pixels((1.0, 2.0), (3.0, 4.0))])
    student_2 = torch.cat([pixels((0.0, 1.0), (0.0, 10.0)), pixels((1.0, 2.0), (3.0, 4.0))])
    return [teacher_1, teacher_2], [student_1, student_2]


def test_pixel_loss_equals_hand_computation() -> None:
    # Eq. 2: sum over levels of the mean (over samples and pixels) cosine distance.
    # Level 1: mean(2, 0) = 1. Level 2: mean(1, 0, 0, 0) = 0.25. Total 1.25.
    teacher, student = toy_features()
    loss = ReverseDistillationLoss("pixel")(teacher, student)
    assert float(loss) == pytest.approx(1.25)


def test_flat_loss_equals_hand_computation() -> None:
    # Official code: per sample, 1 - cos of the flattened maps. Level 1: mean(2, 0) = 1. Level 2 sample 0: flattened
    # (1, 0, 0, 10) vs (0, 0, 1, 10) -> 1 - 100/101; sample 1: 0 -> mean 1/202. Total 1 + 1/202.
    teacher, student = toy_features()
    loss = ReverseDistillationLoss("flat")(teacher, student)
    assert float(loss) == pytest.approx(1 + 1 / 202)


def test_loss_is_differentiable_and_rejects_unknown_modes() -> None:
    teacher, student = toy_features()
    student = [s.clone().requires_grad_(True) for s in student]
    ReverseDistillationLoss("pixel")(teacher, student).backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in student)
    with pytest.raises(ValueError, match="pixel"):
        ReverseDistillationLoss("cosine")


# --- frozen teacher ---------------------------------------------------------------------------------------


def test_encoder_is_frozen_and_stays_in_eval_mode(tiny_rd: RD) -> None:
    model = tiny_rd.model
    model.train()
    assert model.training and model.bottleneck.training and model.decoder.training
    assert not model.encoder.training
    assert not any(module.training for module in model.encoder.modules())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in [*model.bottleneck.parameters(), *model.decoder.parameters()])
    tiny_rd.train()  # through the Lightning module as the trainer does
    assert not model.encoder.training and model.decoder.training


def test_optimizer_updates_only_the_student(tiny_rd: RD) -> None:
    optimizer = tiny_rd.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    student = {id(p) for p in [*tiny_rd.model.bottleneck.parameters(), *tiny_rd.model.decoder.parameters()]}
    assert optimised == student
    assert optimizer.defaults["lr"] == 0.005 and optimizer.defaults["betas"] == (0.5, 0.999)


def test_a_training_step_leaves_the_teacher_untouched(tiny_rd: RD) -> None:
    torch.manual_seed(0)
    rd = tiny_rd
    before = {k: v.clone() for k, v in rd.model.encoder.state_dict().items()}
    decoder_before = next(rd.model.decoder.parameters()).detach().clone()
    optimizer = rd.configure_optimizers()
    rd.train()
    loss = rd.training_step(SimpleNamespace(image=torch.rand(4, 3, 64, 64)))["loss"]
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in rd.model.encoder.parameters())
    for key, value in rd.model.encoder.state_dict().items():  # weights and BatchNorm running statistics
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(next(rd.model.decoder.parameters()).detach(), decoder_before)
    rd.eval()


# --- learning on real images ------------------------------------------------------------------------------


def test_training_loss_falls_on_real_weld_images(shared_data: Path, load_images) -> None:
    seed_everything(0, verbose=False)
    paths = sorted((shared_data / "weld" / "train" / "good").iterdir())[:10]
    images = load_images(paths, 64)
    rd = RD(image_size=(64, 64), **NO_COMPONENTS)
    optimizer = rd.configure_optimizers()
    rd.train()
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = rd.training_step(SimpleNamespace(image=images))["loss"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(math.isfinite(value) for value in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


# --- inference --------------------------------------------------------------------------------------------


def test_eval_returns_map_and_score_equal_to_its_max(tiny_rd: RD) -> None:
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 64)
    model = tiny_rd.model.eval()
    with torch.no_grad():
        output = model(images)
        teacher = model.encoder(images)[:3]
        student = model.decoder(model.bottleneck(teacher))
        expected_map = MultiScaleAnomalyMap(sigma=4.0)(teacher, student, (64, 64))
    assert isinstance(output, InferenceBatch)
    assert output.anomaly_map.shape == (3, 1, 64, 64)
    torch.testing.assert_close(output.anomaly_map, expected_map)
    torch.testing.assert_close(output.pred_score, output.anomaly_map.flatten(1).amax(1))
    assert (output.anomaly_map >= 0).all() and (output.anomaly_map <= 3 * 2).all()  # 3 levels of distances in [0, 2]


def test_training_mode_returns_teacher_and_student_features(tiny_rd: RD) -> None:
    model = tiny_rd.model.train()
    teacher, student = model(torch.rand(2, 3, 64, 64))
    assert [t.shape for t in teacher] == [s.shape for s in student]
    assert [t.shape[1] for t in teacher] == model.encoder.channels[:3]
    assert not any(t.requires_grad for t in teacher) and all(s.requires_grad for s in student)
    model.eval()


def test_sigma_zero_gives_an_unsmoothed_map() -> None:
    torch.manual_seed(0)
    model = ReverseDistillationModel(sigma=0).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        output = model(images)
        teacher = model.encoder(images)[:3]
        student = model.decoder(model.bottleneck(teacher))
    # the finest level is stride 4: without smoothing the map is the bilinear sum of the three distance maps
    expected = MultiScaleAnomalyMap(sigma=0)(teacher, student, (64, 64))
    torch.testing.assert_close(output.anomaly_map, expected)


# --- anomalib Engine --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rd_runs_from_anomalib_engine_and_reports_raw_score_metrics(shared_data: Path, tmp_path: Path) -> None:
    from anomalib.engine import Engine

    from distillad.data import MVTecLayout
    from distillad.metrics import auroc

    seed_everything(0, verbose=False)
    datamodule = MVTecLayout(shared_data, "weld", train_limit=8, test_limit=16, image_size=(64, 64))
    model = RD(image_size=(64, 64))
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                    enable_model_summary=False)
    engine.fit(model, datamodule=datamodule)
    (results,) = engine.test(model, datamodule=datamodule, verbose=False)
    assert set(results) == {"image_RawScoreAUROC", "pixel_RawScoreAUROC", "pixel_AUPRO"}
    assert all(0.0 <= value <= 1.0 for value in results.values())

    # The metrics must be computed on the model's raw scores, not on anomalib's post-processed ones (min-max
    # normalised with validation statistics and clamped to [0, 1], which creates ties).
    model.eval()
    scores, labels, maps, masks = [], [], [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            output = model.model(model.pre_processor.transform(batch.image))
            scores.append(output.pred_score)
            labels.append(batch.gt_label)
            maps.append(output.anomaly_map)
            masks.append(batch.gt_mask)
    assert results["image_RawScoreAUROC"] == pytest.approx(auroc(torch.cat(scores), torch.cat(labels)), abs=1e-6)
    assert results["pixel_RawScoreAUROC"] == pytest.approx(auroc(torch.cat(maps), torch.cat(masks)), abs=1e-5)
