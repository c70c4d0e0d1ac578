"""Tests of DSKD: contextual affinity loss, GCCB, the two students, Eq. 8 standardisation and an end-to-end fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import pytest
import torch
from anomalib.data import ImageBatch
from lightning.pytorch import Trainer

from distillad.components import cosine_distance_map
from distillad.data import FolderLayout
from distillad.models.dskd import DSKD, GlobalContextCondensingBlock
from distillad.models.dskd.lightning_model import standardization_loaders
from distillad.models.dskd.loss import DualStudentLoss, contextual_affinity_map

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WELD_GOOD = SHARED_DATA / "weld" / "train" / "good"
needs_weld = pytest.mark.skipif(not WELD_GOOD.is_dir(), reason=f"weld training images not found at {WELD_GOOD}")
NO_COMPONENTS = {"post_processor": False, "evaluator": False, "visualizer": False}


def tiny_dskd(**options: object) -> DSKD:
    """A DSKD on the offline pretrained tf_efficientnet_lite0 for 64 px inputs, without anomalib extras."""
    return DSKD(image_size=(64, 64), pre_processor=False, **NO_COMPONENTS, **options)


def weld_images(count: int, size: int = 64) -> torch.Tensor:
    """The first ``count`` weld training images, resized, in [0, 1]."""
    paths = sorted(WELD_GOOD.iterdir())[:count]
    images = [cv2.resize(cv2.imread(str(p))[..., ::-1], (size, size), interpolation=cv2.INTER_AREA) for p in paths]
    return torch.stack([torch.from_numpy(image.copy()).permute(2, 0, 1) for image in images]).float() / 255


def as_map(vectors: list[tuple[float, ...]]) -> torch.Tensor:
    """Feature vectors laid out in one row: a (1, C, 1, N) map."""
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(1, len(vectors[0]), 1, len(vectors))


# --- contextual affinity loss (Eq. 3-7) ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_affinity_of_swapped_orthogonal_features_is_closed_form(temperature: float) -> None:
    # Teacher f_1 = (1, 0), f_2 = (0, 1); the student swaps them. Row 1: a^t = (1, 0), a^s = (0, 1), so
    # P_T = softmax((1, 0)/T) and P_S = softmax((0, 1)/T): KL = (p_1 - p_2)/T = tanh(1/(2T))/T; times T^2.
    teacher = as_map([(1.0, 0.0), (0.0, 1.0)])
    student = as_map([(0.0, 1.0), (1.0, 0.0)])
    expected = temperature * math.tanh(1 / (2 * temperature))
    result = contextual_affinity_map(teacher, student, temperature)
    torch.testing.assert_close(result, torch.full((1, 1, 1, 2), expected, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_affinity_loss_equals_scalar_hand_computation(temperature: float) -> None:
    teacher_vectors = [(1.0, 0.0, 0.5), (0.0, 1.0, 0.2), (1.0, 1.0, -1.0), (0.3, -0.4, 2.0)]
    student_vectors = [(1.0, 0.5, 0.0), (0.2, 1.0, 0.1), (-1.0, 1.0, 0.5), (0.3, 0.4, 1.0)]

    def cos(a: tuple[float, ...], b: tuple[float, ...]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    def softmax(values: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in values]
        return [e / sum(exps) for e in exps]

    expected = []
    for t_i, s_i in zip(teacher_vectors, student_vectors, strict=True):
        p = softmax([cos(t_i, t_j) for t_j in teacher_vectors])  # Eq. 3-4
        q = softmax([cos(s_i, t_j) for t_j in teacher_vectors])  # Eq. 5: student row against the teacher map
        expected.append(temperature**2 * sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True)))  # Eq. 6
    teacher, student = as_map(teacher_vectors), as_map(student_vectors)
    result = contextual_affinity_map(teacher, student, temperature)
    torch.testing.assert_close(result.flatten(), torch.tensor(expected, dtype=torch.float64))
    loss = DualStudentLoss({"global": "affinity"}, temperature)(3 * [teacher], {"global": 3 * [student]})
    torch.testing.assert_close(loss, torch.tensor(3 * sum(expected) / 4, dtype=torch.float64))  # Eq. 7


def test_affinity_is_zero_when_student_equals_teacher() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(contextual_affinity_map(teacher, teacher.clone(), 2.0), torch.zeros(2, 1, 5, 6,
                               dtype=torch.float64))
    assert float(contextual_affinity_map(teacher, torch.randn_like(teacher)).min()) > 0


@pytest.mark.parametrize("chunk_rows", [1, 4, 29])
def test_chunked_affinity_and_gradients_equal_direct(chunk_rows: int) -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    student = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    direct = contextual_affinity_map(teacher, student, 1.5, chunk_rows=35)
    (direct_grad,) = torch.autograd.grad(direct.square().sum(), student)
    chunked = contextual_affinity_map(teacher, student, 1.5, chunk_rows=chunk_rows)
    (chunked_grad,) = torch.autograd.grad(chunked.square().sum(), student)
    torch.testing.assert_close(chunked, direct)
    torch.testing.assert_close(chunked_grad, direct_grad)


# --- GCCB and the students ----------------------------------------------------------------------------


@pytest.mark.parametrize("condensed", [4, 16])
def test_gccb_ignores_the_spatial_arrangement(condensed: int) -> None:
    torch.manual_seed(0)
    gccb = GlobalContextCondensingBlock(16, condensed)
    features = torch.randn(2, 16, 5, 6)
    permuted = features.flatten(2)[..., torch.randperm(30)].view_as(features)
    output = gccb(features)
    assert output.shape == features.shape
    torch.testing.assert_close(output, output[..., :1, :1].expand_as(output))  # one vector, broadcast
    torch.testing.assert_close(gccb(permuted), output)
    assert not torch.allclose(gccb(features.flip(0)), output)  # but it does depend on the content


def test_gccb_with_encoder_width_has_no_convs() -> None:
    gccb = GlobalContextCondensingBlock(16, 16)
    features = torch.randn(2, 16, 3, 4)
    assert not list(gccb.parameters())
    torch.testing.assert_close(gccb(features), features.mean(dim=(2, 3), keepdim=True).expand_as(features))


def test_global_student_starts_as_trainable_copy_of_teacher_stage_four_on_f3() -> None:
    model = tiny_dskd().model.eval()
    embed = model.students["global"].embed
    images = torch.rand(2, 3, 64, 64)
    teacher = model.encoder(images)
    torch.testing.assert_close(embed.stage(teacher[2]), teacher[3])  # OCBE_glo on F_T^3
    assert all(p.requires_grad for p in embed.stage.parameters())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert [c.out_channels for c in (embed.gccb.compress, embed.gccb.restore)] == [1024, 320]  # g = 1024


def test_switches_select_students_losses_and_gccb() -> None:
    only_local = tiny_dskd(pretrained=False, global_loss=None).model
    assert list(only_local.students) == ["local"]
    swapped = tiny_dskd(pretrained=False, local_loss="affinity", global_loss="pixel", gccb=False).model
    assert isinstance(swapped.students["global"].embed.gccb, torch.nn.Identity)
    assert [swapped.students[name].loss_type for name in ("local", "global")] == ["affinity", "pixel"]
    for bad in ({"local_loss": None, "global_loss": None}, {"global_loss": "kl"}, {"temperature": 0}):
        with pytest.raises(ValueError, match=r"loss|temperature"):
            tiny_dskd(pretrained=False, **bad)


def test_score_map_is_the_gaussian_free_sum_of_standardised_student_maps() -> None:
    torch.manual_seed(0)
    model = tiny_dskd(pretrained=False, local_loss="affinity", global_loss="pixel", sigma=0).model.eval()
    model.students["local"].map_mean.fill_(0.3)
    model.students["local"].map_std.fill_(2.0)
    model.students["global"].map_mean.fill_(-1.0)
    model.students["global"].map_std.fill_(0.5)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        output = model(images)
        teacher = model.encoder(images)[:3]
        local = [contextual_affinity_map(t, s) for t, s in zip(teacher, model.students["local"](teacher), strict=True)]
        glob = [cosine_distance_map(t, s) for t, s in zip(teacher, model.students["global"](teacher), strict=True)]
    up = torch.nn.functional.interpolate
    summed = [sum(up(m, size=(32, 32), mode="bilinear") for m in maps) for maps in (local, glob)]
    expected = (summed[0] - 0.3) / 2.0 + (summed[1] + 1.0) / 0.5  # Eq. 8
    torch.testing.assert_close(output.anomaly_map, expected)
    torch.testing.assert_close(output.pred_score, expected.flatten(1).amax(1))


# --- Eq. 8 standardisation ----------------------------------------------------------------------------


def _stats(module: DSKD) -> list[float]:
    """mu and sigma of Eq. 8 of every student, flattened."""
    return [float(value) for s in module.model.students.values() for value in (s.map_mean, s.map_std)]


def test_standardisation_uses_normal_images_only() -> None:
    torch.manual_seed(0)
    module = tiny_dskd()
    normal = torch.rand(3, 3, 32, 32) * 0.2 + 0.4
    anomalous = torch.rand(1, 3, 32, 32)
    loader = [ImageBatch(image=torch.cat([normal[:2], anomalous]), gt_label=torch.tensor([0, 0, 1])),
              ImageBatch(image=normal[2:], gt_label=torch.tensor([0]))]
    module.model.train()
    assert module.fit_standardization([loader]) == 3
    assert module.model.training and not module.model.encoder.training  # the training mode is restored
    used = _stats(module)
    module.model.eval()
    assert module.model.fit_standardization([normal]) == 3
    assert _stats(module) == pytest.approx(used, rel=1e-5)
    module.model.fit_standardization([torch.cat([normal, anomalous])])
    assert _stats(module) != pytest.approx(used, rel=1e-3)  # including the anomalous image would change them


def test_standardisation_falls_back_to_training_images_without_normal_validation_images() -> None:
    module = tiny_dskd(pretrained=False)
    anomalous_only = [ImageBatch(image=torch.rand(2, 3, 32, 32), gt_label=torch.tensor([1, 1]))]
    training = [ImageBatch(image=torch.rand(4, 3, 32, 32), gt_label=torch.tensor([0, 0, 0, 0]))]
    assert module.fit_standardization([anomalous_only, training]) == 4
    with pytest.raises(ValueError, match="no normal images"):
        module.fit_standardization([anomalous_only])


def _folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for index in range(count):
        image = (torch.rand(48, 48, 3, generator=rng) * 255).to(torch.uint8).numpy()
        cv2.imwrite(str(folder / f"{index:03d}.png"), image)
    return folder


def test_training_end_fits_statistics_on_the_validation_split(tmp_path: Path) -> None:
    folder = _folder(tmp_path, 6)
    datamodule = FolderLayout(folder, image_size=(32, 32), train_batch_size=4, val_split_ratio=0.34)
    datamodule.setup()
    loaders = standardization_loaders(datamodule)
    assert len(loaders) == 2 and len(loaders[0].dataset) == 2 and len(loaders[1].dataset) == 4
    no_val = FolderLayout(folder, image_size=(32, 32), val_split_ratio=0)
    no_val.setup()
    assert [len(loader.dataset) for loader in standardization_loaders(no_val)] == [6]

    module = tiny_dskd()
    trainer = Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **module.trainer_arguments)
    trainer.fit(module, datamodule=datamodule)
    fitted = _stats(module)
    assert module.fit_standardization([datamodule.val_dataloader()]) == 2
    assert _stats(module) == pytest.approx(fitted, rel=1e-5)
    module.fit_standardization([datamodule.train_dataloader()])
    assert _stats(module) != pytest.approx(fitted, rel=1e-3)


# --- training -----------------------------------------------------------------------------------------


@needs_weld
def test_training_loss_of_both_students_decreases_on_weld_images() -> None:
    torch.manual_seed(0)
    module = tiny_dskd()
    optimizer = module.configure_optimizers()
    assert optimizer.defaults["betas"] == (0.5, 0.999) and optimizer.defaults["lr"] == 0.005
    images = weld_images(2)
    module.model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        teacher, students = module.model(images)
        terms = {name: module.loss(teacher, {name: features}) for name, features in students.items()}
        sum(terms.values()).backward()
        optimizer.step()
        losses.append({name: term.item() for name, term in terms.items()})
    for name in ("local", "global"):  # both students are trained together, by one optimiser
        assert losses[-1][name] < 0.8 * losses[0][name], losses


@pytest.mark.slow
def test_fit_on_weld_subset_writes_metrics_and_saves_statistics(fit_weld_subset) -> None:
    from distillad.pipeline import load_model

    metrics, run_dir = fit_weld_subset("dskd")
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["model"] == "dskd" and 0 <= written["image_AUROC"] <= 1 and math.isfinite(metrics["threshold"])
    loaded, _ = load_model(run_dir)
    stats = _stats(loaded)  # Eq. 8 statistics were fitted and saved in the checkpoint
    assert len(stats) == 4 and all(std > 0 for std in stats[1::2]) and stats != [0.0, 1.0, 0.0, 1.0]
