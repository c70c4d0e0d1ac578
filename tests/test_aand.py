"""Tests of AAND: RAA residual gating, the stage losses, the two-stage schedule and an end-to-end fit."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from anomalib.data import ImageBatch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from distillad.models.aand import AAND, ResidualAnomalyAmplification, residual_intensity
from distillad.models.aand.lightning_model import stage1_epoch_count
from distillad.models.aand.loss import (
    AmplificationStageLoss,
    AnomalyAmplificationLoss,
    BinaryFocalLoss,
    NormalityDistillationLoss,
)
from distillad.models.aand.torch_model import MatchingResidualGate, downsample_mask, position_encoding
from distillad.synthesis import AnomalySynthesizer, SynthesisResult, texture_or_object

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WELD_GOOD = SHARED_DATA / "weld" / "train" / "good"
needs_weld = pytest.mark.skipif(not WELD_GOOD.is_dir(), reason=f"weld training images not found at {WELD_GOOD}")
NO_COMPONENTS = {"post_processor": False, "evaluator": False, "visualizer": False}


def tiny_aand(**options: object) -> AAND:
    """An AAND on the offline pretrained tf_efficientnet_lite0 for 64 px inputs, without anomalib extras."""
    return AAND(image_size=(64, 64), pre_processor=False, **NO_COMPONENTS, **options)


def weld_images(count: int, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` weld training images, resized, in [0, 1], with their paths."""
    paths = sorted(WELD_GOOD.iterdir())[:count]
    images = [cv2.resize(cv2.imread(str(p))[..., ::-1], (size, size), interpolation=cv2.INTER_AREA) for p in paths]
    batch = torch.stack([torch.from_numpy(image.copy()).permute(2, 0, 1) for image in images]).float() / 255
    return batch, [str(p) for p in paths]


# --- RAA -------------------------------------------------------------------------------------------------


def test_ground_truth_weights_leave_normal_patches_unchanged() -> None:
    torch.manual_seed(0)
    raa = ResidualAnomalyAmplification(channels=8, memory_items=5)
    features = torch.rand(2, 8, 6, 6) + 0.1
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 1:3, 2:5] = 1
    output = raa(features, mask)  # Eq. 6: ground-truth weights replace the gate
    normal, anomalous = (mask == 0).expand_as(features), (mask == 1).expand_as(features)
    assert torch.equal(output.amplified[normal], features[normal])
    expected = features + torch.tanh(raa.generator.projection(features)) * features  # Eq. 1 with w = 1, Eq. 5
    torch.testing.assert_close(output.amplified[anomalous], expected[anomalous])
    assert (output.amplified[anomalous] - features[anomalous]).abs().max() > 1e-3


def test_gate_is_summed_anomaly_softmax_weight() -> None:
    torch.manual_seed(0)
    raa = ResidualAnomalyAmplification(channels=8, memory_items=4, temperature=0.5)
    features = torch.rand(1, 8, 3, 5)
    gate = raa.gate
    query = gate.query(features + position_encoding(8, 3, 5, features))
    memory = torch.cat([gate.normal_memory, gate.anomaly_memory])
    similarity = F.cosine_similarity(query.permute(0, 2, 3, 1).unsqueeze(-2), memory, dim=-1)  # (1, 3, 5, 8)
    normal_weight = torch.softmax(similarity / 0.5, dim=-1)[..., :4].sum(-1)  # Eq. 3 over all 2L items
    predicted = raa(features).gate
    torch.testing.assert_close(predicted[:, 0], 1 - normal_weight)  # Eq. 4
    assert predicted.shape == (1, 1, 3, 5)


def test_mask_downsampling_marks_patches_by_area() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :4, :4] = 1  # one full patch of the 2x2 level
    mask[0, 0, 4, 4] = 1  # 1/16 of another: below the 0.3 threshold
    assert downsample_mask(mask, (2, 2))[0, 0].tolist() == [[True, False], [False, False]]


# --- losses ----------------------------------------------------------------------------------------------


def test_amplification_loss_matches_hand_computation() -> None:
    # One image, 1x4 patches: two anomalous (vanilla [1, 0] both) and two normal ([0, 1] and [1, 1]).
    vanilla = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)
    mask = torch.tensor([True, True, False, False]).view(1, 1, 1, 4)
    amplified = vanilla.clone()
    amplified[0, :, 0, 0] = torch.tensor([1.0, 0.5])
    amplified[0, :, 0, 1] = torch.tensor([0.0, -1.0])
    amplified.requires_grad_(True)
    loss = AnomalyAmplificationLoss(alpha=0.3).level_loss(vanilla, amplified, mask)
    # s(F_A^a, F_T^n) against normals [0, 1] and [1, 1]; S_ref = s(F_T^a, F_T^n) - 0.3 with F_T^a = [1, 0].
    s = [0.5 / math.sqrt(1.25), 1.5 / math.sqrt(1.25 * 2), -1.0, -1 / math.sqrt(2)]
    ref = [-0.3, 1 / math.sqrt(2) - 0.3, -0.3, 1 / math.sqrt(2) - 0.3]
    expected = sum(max(a, b) for a, b in zip(s, ref, strict=True)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert amplified.grad[0, :, 0, 0].abs().sum() > 0  # above its margin: pushed
    assert torch.equal(amplified.grad[0, :, 0, 1], torch.zeros(2))  # already beyond the margin: no gradient


def test_amplification_loss_samples_pairs_when_too_many() -> None:
    torch.manual_seed(0)
    vanilla, amplified = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    mask = torch.rand(2, 1, 5, 5) > 0.5
    every_pair = torch.maximum(
        F.normalize(amplified.permute(0, 2, 3, 1)[mask[:, 0]], dim=1) @ F.normalize(
            vanilla.permute(0, 2, 3, 1)[~mask[:, 0]], dim=1).T,
        F.normalize(vanilla.permute(0, 2, 3, 1)[mask[:, 0]], dim=1) @ F.normalize(
            vanilla.permute(0, 2, 3, 1)[~mask[:, 0]], dim=1).T - 0.3,
    )
    full = AnomalyAmplificationLoss(0.3).level_loss(vanilla, amplified, mask)
    assert full.item() == pytest.approx(every_pair.mean().item(), abs=1e-6)
    single = AnomalyAmplificationLoss(0.3, max_anomalous=1, max_normal=1).level_loss(vanilla, amplified, mask)
    assert torch.isclose(every_pair.flatten(), single).any()
    assert AnomalyAmplificationLoss(0.3).level_loss(vanilla, amplified, torch.zeros_like(mask)).item() == 0


def test_hard_distillation_takes_the_largest_patch_distances() -> None:
    angles = torch.tensor([0.0, 0.3, 1.2, 0.6, 1.5, 0.1])  # one image, six patches
    teacher = torch.stack([torch.ones(6), torch.zeros(6)]).view(1, 2, 1, 6)
    student = torch.stack([torch.cos(angles), torch.sin(angles)]).view(1, 2, 1, 6)
    distances = 1 - torch.cos(angles)  # per-patch 1 - s
    loss, parts = NormalityDistillationLoss(hard_samples=2)([teacher], [student])
    assert parts["hkd"].item() == pytest.approx(((distances[4] + distances[2]) / 2).item(), abs=1e-6)  # Eq. 11
    flat_kd = 1 - F.cosine_similarity(teacher.flatten(), student.flatten(), dim=0)  # Eq. 10
    assert parts["kd"].item() == pytest.approx(flat_kd.item(), abs=1e-6)
    assert loss.item() == pytest.approx(parts["kd"].item() + parts["hkd"].item(), abs=1e-6)  # Eq. 12
    _, everything = NormalityDistillationLoss(hard_samples=50)([teacher], [student])
    assert everything["hkd"].item() == pytest.approx(distances.mean().item(), abs=1e-6)
    off, off_parts = NormalityDistillationLoss(hard_samples=0)([teacher], [student])
    assert off_parts["hkd"].item() == 0 and off.item() == pytest.approx(flat_kd.item(), abs=1e-6)


@needs_weld
def test_amplification_pushes_anomalous_features_away_from_normal_ones() -> None:
    torch.manual_seed(0)
    model = tiny_aand()
    images, paths = weld_images(4)
    synthesis = AnomalySynthesizer(foreground="threshold", anomaly_probability=1.0, seed=0)(images, keys=paths)
    vanilla = model.model.encode(synthesis.anomalous)
    masks = [downsample_mask(synthesis.mask, f.shape[-2:]) for f in vanilla]
    weights = [m.float() for m in masks]
    assert masks[0].sum() > 0 and (~masks[0]).sum() > 0

    def mean_similarity(features: list[torch.Tensor]) -> float:
        """Mean cosine similarity of level-1 anomalous features to the vanilla normal features."""
        anomalous = features[0].permute(0, 2, 3, 1)[masks[0][:, 0]]
        normal = vanilla[0].permute(0, 2, 3, 1)[~masks[0][:, 0]]
        return (F.normalize(anomalous, dim=1) @ F.normalize(normal, dim=1).T).mean().item()

    optimizer = torch.optim.Adam(model.model.raa.parameters(), lr=0.005, betas=(0.5, 0.999))
    before = mean_similarity([o.amplified for o in model.model.amplify(vanilla, weights)])
    for _ in range(8):
        outputs = model.model.amplify(vanilla, weights)
        loss, _ = model.amplification_loss(vanilla, [o.amplified for o in outputs], [o.gate for o in outputs], masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = mean_similarity([o.amplified for o in model.model.amplify(vanilla, weights)])
    assert after < before - 0.05
    assert after < mean_similarity(vanilla) - 0.05  # beyond where the vanilla teacher put the anomalies
    intensity = residual_intensity(model.model, synthesis.anomalous, synthesis.mask)
    assert len(intensity.levels) == 3 and intensity.normal >= 0 and intensity.anomalous >= 0


def test_binary_focal_loss_matches_hand_computation() -> None:
    probability = torch.tensor([0.9, 0.3, 0.6, 0.05])
    target = torch.tensor([1, 0, 1, 0])
    terms = [-0.8 * 0.1**2 * math.log(0.9), -0.2 * 0.3**2 * math.log(0.7), -0.8 * 0.4**2 * math.log(0.6),
             -0.2 * 0.05**2 * math.log(0.95)]  # a = 0.8, g = 2 (the authors' code)
    assert BinaryFocalLoss()(probability, target).item() == pytest.approx(sum(terms) / 4, rel=1e-5)
    saturated = BinaryFocalLoss()(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))  # clamped: finite, large
    assert math.isfinite(saturated.item()) and saturated.item() > 1
    assert BinaryFocalLoss(alpha=0.5, gamma=0)(probability[:2], target[:2]).item() == pytest.approx(
        (-0.5 * math.log(0.9) - 0.5 * math.log(0.7)) / 2, rel=1e-5)  # gamma 0: weighted cross-entropy
    gate = torch.tensor([0.9, 0.3]).view(1, 1, 1, 2)
    mask = torch.tensor([True, False]).view(1, 1, 1, 2)
    _, parts = AmplificationStageLoss()([torch.ones(1, 2, 1, 2)], [torch.ones(1, 2, 1, 2)], [gate], [mask])
    assert parts["focal"].item() == pytest.approx(sum(terms[:2]) / 2, rel=1e-4)  # L_1 uses a = 0.8, g = 2


class _FixedSynthesis:
    """Stands in for the synthesizer: always the same anomalous images and mask."""

    def __init__(self, result: SynthesisResult) -> None:
        self.result = result

    def __call__(self, images: torch.Tensor, keys: list[str] | None = None) -> SynthesisResult:
        del images, keys
        return self.result


def test_stage_one_loss_is_eq_9_on_the_anomalous_images_with_ground_truth_weights() -> None:
    torch.manual_seed(0)
    module = tiny_aand(pretrained=False, memory_items=4)
    normal = torch.rand(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 8:40, 16:48] = 1
    anomalous = torch.where(mask.bool(), torch.rand(2, 3, 64, 64), normal)
    module._synthesizer = _FixedSynthesis(SynthesisResult(normal, anomalous, mask))
    loss, parts = module.amplification_step_loss(ImageBatch(image=normal, image_path=["a.png", "b.png"]))

    with torch.no_grad():
        vanilla = module.model.encoder(anomalous)[:3]  # stage 1 amplifies the synthesised image's features
        masks = [downsample_mask(mask, f.shape[-2:]) for f in vanilla]
        amplified = [v + m.float() * raa.generator(v) for v, m, raa in zip(vanilla, masks, module.model.raa,
                                                                          strict=True)]  # Eq. 6
        gates = [raa.gate(v) for v, raa in zip(vanilla, module.model.raa, strict=True)]
        focal = sum(BinaryFocalLoss()(g, m) for g, m in zip(gates, masks, strict=True))
        amplification = AnomalyAmplificationLoss(0.3)(vanilla, amplified, masks)
    assert parts["focal"].item() == pytest.approx(focal.item(), rel=1e-5)
    assert parts["amplification"].item() == pytest.approx(amplification.item(), rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx((focal + amplification).item(), rel=1e-5)


def test_the_advanced_teacher_gates_its_residual_with_the_predicted_weights() -> None:
    torch.manual_seed(0)
    model = tiny_aand(pretrained=False).model.eval()
    images = torch.rand(2, 3, 64, 64)
    features = model.encode(images)
    outputs = model.amplify(features)
    for output, vanilla in zip(outputs, features, strict=True):
        torch.testing.assert_close(output.amplified, vanilla + output.gate * output.residual)  # Eq. 1
        assert 0.05 < float(output.gate.mean()) < 0.95  # a real gate, neither 0 nor 1 everywhere
    model.train()
    advanced, _ = model(images)  # stage 2 distils the gated features
    for level, output in zip(advanced, outputs, strict=True):
        torch.testing.assert_close(level, output.amplified)


def test_mrg_temperature_defaults_to_0_2_and_reaches_every_gate() -> None:
    assert [raa.gate.temperature for raa in tiny_aand(pretrained=False).model.raa] == [0.2] * 3
    assert [raa.gate.temperature for raa in tiny_aand(pretrained=False, temperature=0.5).model.raa] == [0.5] * 3
    torch.manual_seed(0)
    gate = MatchingResidualGate(channels=8, memory_items=4)
    features = torch.rand(1, 8, 3, 5)
    query = F.normalize(gate.query(features + position_encoding(8, 3, 5, features)), dim=1)
    memory = F.normalize(torch.cat([gate.normal_memory, gate.anomaly_memory]), dim=1)
    logits = torch.einsum("bchw,mc->bmhw", query, memory)
    torch.testing.assert_close(gate(features), torch.softmax(logits / 0.2, dim=1)[:, 4:].sum(1, keepdim=True))
    assert not torch.allclose(gate(features), torch.softmax(logits, dim=1)[:, 4:].sum(1, keepdim=True), atol=1e-3)


def test_teacher_stays_in_eval_mode_and_unchanged_while_training() -> None:
    model = tiny_aand().model
    images = torch.rand(4, 3, 64, 64)
    model.eval()
    reference = model.encode(images)
    statistics = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model.train()
    assert not model.encoder.training and all(not m.training for m in model.encoder.modules())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    training = model.encode(images * 0.5 + 0.25)  # another batch: BatchNorm in train mode would use and move stats
    training = model.encode(images)
    for level, expected in zip(training, reference, strict=True):
        torch.testing.assert_close(level, expected)
    assert all(torch.equal(v, statistics[k]) for k, v in model.encoder.state_dict().items())


# --- schedule and switches --------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_epochs", "first", "second", "expected"), [
    (220, 100, 120, 100),  # the paper's schedule, exactly
    (10, 100, 120, 5),  # proportional: round(10 * 100 / 220)
    (2, 100, 120, 1),  # each stage at least one epoch
    (2, 1, 100, 1),
    (1, 100, 120, 0),  # a single epoch trains the student
    (None, 100, 120, 100),  # unbounded trainer: switch after stage1_epochs
    (7, 3, 0, 7),  # stage 2 off (MRG-only scoring)
    (7, 0, 5, 0),  # stage 1 off (vanilla teacher)
])
def test_stage_boundary(max_epochs: int | None, first: int, second: int, expected: int) -> None:
    assert stage1_epoch_count(max_epochs, first, second) == expected


def test_schedules_that_leave_a_stage_empty_are_refused_and_budgets_reported() -> None:
    model = tiny_aand(pretrained=False)
    for max_epochs, max_steps in ((1, -1), (-1, 1)):
        with pytest.raises(ValueError, match="at least 2"):
            model.check_schedule(max_epochs, max_steps)
    model.check_schedule(2, -1)
    tiny_aand(pretrained=False, stage1_epochs=0).check_schedule(1, -1)  # Table V (d): no amplification stage
    assert model.stage_budgets(220, -1) == {"stage1_epochs": 100, "stage2_epochs": 120}
    assert model.stage_budgets(10, -1) == {"stage1_epochs": 5, "stage2_epochs": 5}
    assert model.stage_budgets(-1, 22) == {"stage1_steps": 10, "stage2_steps": 12}
    assert model.stage_budgets(None, -1) == {"stage1_epochs": 100, "stage2_epochs": 120}
    with pytest.raises(ValueError, match="student untrained"):
        tiny_aand(pretrained=False, stage2_epochs=0)
    with pytest.raises(ValueError, match="foreground"):
        tiny_aand(pretrained=False, foreground="otsu")


def test_one_epoch_fit_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from distillad.errors import DistilladError
    from distillad.pipeline import RunConfig, fit

    good = tmp_path / "good"
    good.mkdir()
    for index in range(2):
        cv2.imwrite(str(good / f"{index}.png"), np.full((32, 32, 3), 100 + index, np.uint8))
    config = RunConfig(model="aand", model_options={}, data={"kind": "folder", "normal_dir": str(good)},
                       image_size=32, epochs=1, pretrained=False)
    with pytest.raises(DistilladError, match="at least 2 epochs"):
        fit(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _texture_and_object() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(np.clip(rng.normal(128, 30, (128, 128, 3)), 0, 255).astype(np.uint8), (0, 0), 3)
    scene = np.full((128, 128, 3), 40, np.uint8)
    cv2.circle(scene, (64, 64), 35, (200, 180, 160), -1)
    scene = np.clip(scene + rng.normal(0, 10, scene.shape), 0, 255).astype(np.uint8)
    return texture, scene


def test_auto_foreground_takes_the_whole_image_for_textures_and_a_threshold_for_objects() -> None:
    from distillad.synthesis import otsu_separability, texture_or_object

    texture, scene = _texture_and_object()
    assert otsu_separability(texture) == pytest.approx(2 / math.pi, abs=0.05)  # a unimodal (Gaussian) histogram
    assert otsu_separability(scene) > 0.95
    assert otsu_separability(np.zeros((8, 8, 3), np.uint8)) == 0.0
    assert texture_or_object([texture, texture, scene])[0] == "none"  # the median decides
    assert texture_or_object([scene, scene, texture])[0] == "threshold"

    model = tiny_aand(pretrained=False)
    batch = ImageBatch(image=torch.from_numpy(np.stack([texture, texture])).permute(0, 3, 1, 2).float() / 255,
                       image_path=["a.png", "b.png"])
    model.synthesizer_for(batch.image)
    assert model.foreground_choice[0] == "none"
    assert model.synthesizer_for(batch.image).foregrounds.mode == "none"
    assert tiny_aand(pretrained=False, foreground="grabcut").resolve_foreground([texture]) == ("grabcut", None)


@pytest.mark.parametrize(("category", "mode"), [("mtd", "none"), ("weld", "threshold")])
def test_auto_foreground_on_real_categories(shared_data: Path, category: str, mode: str) -> None:
    from distillad.data import MVTecLayout
    from distillad.models.aand.lightning_model import sample_images

    datamodule = MVTecLayout(shared_data, category, image_size=(128, 128), train_limit=32)
    datamodule.setup()
    images = sample_images(datamodule.train_data)
    assert len(images) == 16
    assert tiny_aand(pretrained=False).training_report(datamodule, 10, -1) == {
        "stage1_epochs": 5, "stage2_epochs": 5, "foreground": mode,
        "foreground_separability": pytest.approx(texture_or_object(images)[1], abs=1e-4)}


def test_ablation_switches() -> None:
    images = torch.rand(2, 3, 64, 64)
    no_gate = tiny_aand(pretrained=False, gate=False)
    assert all(module.gate is None for module in no_gate.model.raa)
    features = no_gate.model.encode(images)
    ungated = no_gate.model.amplify(features)
    torch.testing.assert_close(ungated[0].amplified, features[0] + ungated[0].residual)  # Table V (b): w = 1
    free = tiny_aand(pretrained=False, residual="free").model.raa[0]
    torch.testing.assert_close(free.generator(features[0]), free.generator.projection(features[0]))  # Table VII (a)
    sigmoid = tiny_aand(pretrained=False, residual="sigmoid").model.raa[0].generator
    torch.testing.assert_close(sigmoid(features[0]), torch.sigmoid(sigmoid.projection(features[0])) * features[0])
    mrg = tiny_aand(pretrained=False, score="mrg", stage2_epochs=0).eval()
    output = mrg.model(images)  # Table V (a): the gate's weights are the anomaly map
    assert output.anomaly_map.shape == (2, 1, 64, 64) and 0 <= output.anomaly_map.min() <= output.pred_score.max() <= 1
    assert tiny_aand(pretrained=False, stage1_epochs=0).model.raa is None  # Table V (d)
    with pytest.raises(ValueError, match="mrg"):
        tiny_aand(pretrained=False, score="mrg", gate=False)
    with pytest.raises(ValueError, match="residual"):
        tiny_aand(pretrained=False, residual="relu")


class _Snapshots(Callback):
    """Parameters of the RAA modules and of the student at the start of every epoch and at the end."""

    def __init__(self) -> None:
        self.raa: list[dict] = []
        self.student: list[dict] = []
        self.stages: list[int] = []

    def _take(self, module: AAND) -> None:
        self.raa.append({k: v.clone() for k, v in module.model.raa.state_dict().items()})
        self.student.append({k: v.clone() for k, v in module.model.decoder.state_dict().items()})

    def on_train_epoch_start(self, trainer: Trainer, pl_module: AAND) -> None:
        self._take(pl_module)
        self.stages.append(pl_module.stage)

    def on_train_end(self, trainer: Trainer, pl_module: AAND) -> None:
        self._take(pl_module)


def _same(first: dict, second: dict) -> bool:
    return all(torch.equal(first[key], second[key]) for key in first)


def test_stage_two_leaves_raa_parameters_unchanged() -> None:
    torch.manual_seed(0)
    model = tiny_aand(pretrained=False, stage1_epochs=1, stage2_epochs=1)
    batch = ImageBatch(image=torch.rand(2, 3, 64, 64), image_path=["a.png", "b.png"])
    snapshots = _Snapshots()
    trainer = Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
                      **model.trainer_arguments)
    trainer.fit(model, train_dataloaders=DataLoader([batch, batch], batch_size=None))
    assert snapshots.stages == [1, 2]
    start, after_stage1, after_stage2 = snapshots.raa
    assert not _same(start, after_stage1)  # stage 1 trains the RAA modules ...
    assert _same(snapshots.student[0], snapshots.student[1])  # ... and nothing of the student
    assert _same(after_stage1, after_stage2)  # stage 2 does not touch them
    assert not _same(snapshots.student[1], snapshots.student[2])  # but trains the student


# --- end to end --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_stage_fit_on_weld_subset(fit_weld_subset) -> None:
    metrics, run_dir = fit_weld_subset("aand", epochs=2)
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["model"] == "aand" and 0 <= written["image_AUROC"] <= 1 and math.isfinite(metrics["threshold"])
    with next(run_dir.glob("logs/*/metrics.csv")).open() as handle:
        stages = [float(row["stage"]) for row in csv.DictReader(handle) if row.get("stage")]
    assert stages == [1.0, 2.0]  # 2 epochs with the paper's 100:120 split -> one epoch per stage
    assert (written["stage1_epochs"], written["stage2_epochs"], written["foreground"]) == (1, 1, "threshold")
