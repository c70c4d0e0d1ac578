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
from distillad.components.distance import GaussianSmoothing
from distillad.data import FolderLayout
from distillad.models.base import held_out_normal_loaders
from distillad.models.dskd import DSKD, GlobalContextCondensingBlock, PositionalCondensingBlock
from distillad.models.dskd.loss import (
    DualStudentLoss,
    _affinity_divergence,
    _ContextualAffinityKL,
    contextual_affinity_map,
)

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


def unit_vectors(features: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) map as L2-normalised (B, N, C) vectors, as the contextual affinity sees it."""
    return torch.nn.functional.normalize(features.flatten(2).transpose(1, 2), dim=-1)


def direct_affinity_map(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference definition on the whole N x N matrix at once, under plain autograd: (B, 1, H, W)."""
    teacher_vectors = unit_vectors(teacher)
    kl = _affinity_divergence(unit_vectors(student), teacher_vectors, teacher_vectors, temperature)
    return kl.view(teacher.shape[0], 1, *teacher.shape[2:])


def features_pair(dtype: torch.dtype = torch.float32, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and a student ``noise`` away (B=2, C=24, 9 x 11: N = 99, which 16-row chunks do not divide)."""
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 24, 9, 11, generator=generator, dtype=dtype)
    return teacher, teacher + noise * torch.randn(teacher.shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fused_affinity_equals_direct_reference(temperature: float) -> None:
    teacher, student = features_pair(torch.float64)
    expected = direct_affinity_map(teacher, student, temperature)
    for grad_enabled in (False, True):  # inference and the autograd.Function
        with torch.set_grad_enabled(grad_enabled):
            fused = contextual_affinity_map(teacher, student.requires_grad_(grad_enabled), temperature, chunk_rows=16)
        torch.testing.assert_close(fused, expected, rtol=0, atol=1e-12)
    # float32 stays as close to the float64 reference as the float32 reference does (KL values ~0.03)
    fused32 = contextual_affinity_map(teacher.float(), student.detach().float(), temperature, chunk_rows=16)
    assert fused32.dtype == torch.float32
    torch.testing.assert_close(fused32.double(), expected, rtol=0, atol=1e-6 * max(temperature**2, 1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fused_affinity_gradient_equals_autograd_through_reference(temperature: float) -> None:
    # A student close to the teacher: p_S ~ p_T, so the gradient is a small difference of two means.
    teacher, student = features_pair(noise=0.3)
    weights = torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(1))  # a non-uniform upstream gradient
    student.requires_grad_()
    (fused_grad,) = torch.autograd.grad((weights * contextual_affinity_map(teacher, student, temperature, 16)).sum(),
                                        student)
    student64 = student.detach().double().requires_grad_()
    reference = (weights.double() * direct_affinity_map(teacher.double(), student64, temperature)).sum()
    (reference_grad,) = torch.autograd.grad(reference, student64)
    assert float((fused_grad.double() - reference_grad).abs().max() / reference_grad.abs().max()) < 1e-5


def test_fused_affinity_shifts_logits_beyond_the_float32_exp_range() -> None:
    # T = 0.01: logits reach 1/T = 100 and exp overflows float32 past 88.7, unless each softmax is
    # shifted by its row maximum. Clustered features keep the softmaxes from being one-hot, so the
    # values and gradients still mean something in float32 (KL up to ~0.5 nats).
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 24, 1, 1, generator=generator) + 0.2 * torch.randn(2, 24, 9, 11, generator=generator)
    student = (teacher + 0.2 * torch.randn(teacher.shape, generator=generator)).requires_grad_()
    result = contextual_affinity_map(teacher, student, 0.01, chunk_rows=16)
    (grad,) = torch.autograd.grad(result.sum(), student)
    student64 = student.detach().double().requires_grad_()
    expected = direct_affinity_map(teacher.double(), student64, 0.01)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student64)
    for value, reference in ((result, expected), (grad, expected_grad)):
        assert float((value.double() - reference).abs().max() / reference.abs().max()) < 1e-4


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fused_affinity_passes_gradcheck(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 1, 5, generator=generator, dtype=torch.float64)
    student = torch.randn(2, 3, 1, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_vectors = unit_vectors(teacher)
    student_vectors = unit_vectors(student).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: _ContextualAffinityKL.apply(s, teacher_vectors, temperature, 2),
                                    (student_vectors,))
    assert torch.autograd.gradcheck(lambda s: contextual_affinity_map(teacher, s, temperature, 2), (student,))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_gradient_descent_on_the_student_reduces_the_affinity_loss_as_predicted(temperature: float) -> None:
    # A first-order check on the scale and the sign of the analytic gradient (T^2 * KL has gradient
    # T * sum_j (p_S - p_T) f_T): a small step -lr * g must lower the loss by lr * |g|^2.
    teacher, student = features_pair(torch.float64)
    student.requires_grad_()
    losses = []
    for _ in range(20):
        loss = contextual_affinity_map(teacher, student, temperature, chunk_rows=16).sum()
        (grad,) = torch.autograd.grad(loss, student)
        lr = 1e-3 / float(grad.norm())
        with torch.no_grad():
            decrease = loss - contextual_affinity_map(teacher, student - lr * grad, temperature, chunk_rows=16).sum()
            assert float(decrease) == pytest.approx(lr * float(grad.square().sum()), rel=0.02)
            student -= 50.0 * grad  # then a real descent step
        losses.append(loss.item())
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0], losses


def test_affinity_under_bf16_autocast_is_float32() -> None:
    teacher, student = features_pair()
    student.requires_grad_()
    expected = contextual_affinity_map(teacher, student, chunk_rows=16)
    (expected_grad,) = torch.autograd.grad(expected.mean(), student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = contextual_affinity_map(teacher, student, chunk_rows=16)
        (grad,) = torch.autograd.grad(result.mean(), student)  # backward inside autocast too
        assert result.dtype == grad.dtype == torch.float32
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)
        bf16_student = torch.nn.Conv2d(24, 24, 1)(student)  # features computed under autocast are bf16
        assert bf16_student.dtype == torch.bfloat16
        assert contextual_affinity_map(teacher, bf16_student, chunk_rows=16).dtype == torch.float32


def test_affinity_saves_nothing_n_wide_for_backward() -> None:
    # N = 99 positions, C = 24, all in one chunk: a tensor of B * N * N = 19602 entries would be the
    # affinity matrix; the (B, N, C + 1) teacher vectors with ones are the largest allowed.
    teacher, student = features_pair()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        contextual_affinity_map(teacher, student.requires_grad_(), chunk_rows=99)
    assert saved and max(saved) <= 2 * 99 * 25


def test_teacher_requiring_gradient_uses_the_reference() -> None:
    teacher, student = features_pair(torch.float64)
    teacher.requires_grad_()
    student.requires_grad_()
    grads = torch.autograd.grad(contextual_affinity_map(teacher, student, 2.0, chunk_rows=16).sum(), (teacher, student))
    expected = torch.autograd.grad(direct_affinity_map(teacher, student, 2.0).sum(), (teacher, student))
    torch.testing.assert_close(grads, expected)


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


def test_positional_gccb_keeps_where_features_are() -> None:
    torch.manual_seed(0)
    gccb = PositionalCondensingBlock(16, 60, (5, 6))
    assert gccb.narrow.out_channels == 2  # 60 // 30 positions: the flattened map holds about g numbers
    features = torch.randn(2, 16, 5, 6)
    output = gccb(features)
    assert output.shape == features.shape
    assert not torch.allclose(output, output[..., :1, :1].expand_as(output))  # differs per position
    moved = features.flatten(2)[..., torch.randperm(30)].view_as(features)
    assert not torch.allclose(gccb(moved), output, atol=1e-3)  # the same features elsewhere: another input
    with torch.no_grad():
        vector = gccb.condense(gccb.narrow(features))
    assert vector.shape == (2, 60, 1, 1)  # through one g-dim vector per image
    torch.testing.assert_close(gccb.restore(gccb.expand(vector)), output)
    with pytest.raises(ValueError, match=r"built for \(5, 6\) maps"):
        gccb(torch.randn(1, 16, 4, 6))


def test_positional_gccb_spans_the_stage_four_map_of_the_image_size() -> None:
    model = tiny_dskd(pretrained=False, gccb_pooling="positional").model.eval()
    gccb = model.students["global"].embed.gccb
    assert isinstance(gccb, PositionalCondensingBlock)
    assert gccb.condense.kernel_size == (2, 2)  # 64 px / 32
    images = torch.rand(1, 3, 64, 64)
    assert model.fit_standardization([images]) == 1
    with torch.no_grad():
        assert model(images).anomaly_map.shape[-2:] == (64, 64)
    with pytest.raises(ValueError, match="gccb_pooling='max' must be one of 'mean', 'positional'"):
        tiny_dskd(pretrained=False, gccb_pooling="max")


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
    model.standardized.fill_(True)
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
    with torch.no_grad():
        per_student = model.standardized_maps(images)
    torch.testing.assert_close(per_student["local"], (summed[0] - 0.3) / 2.0)
    torch.testing.assert_close(per_student["global"], (summed[1] + 1.0) / 0.5)
    torch.testing.assert_close(output.pred_score, expected.flatten(1).amax(1))

    model.blur = GaussianSmoothing(4.0)  # the default width: the fused map is smoothed before the maximum
    with torch.no_grad():
        smoothed = model(images)
    torch.testing.assert_close(smoothed.anomaly_map, model.blur(expected))
    assert not torch.allclose(smoothed.anomaly_map, expected, atol=1e-3)
    assert isinstance(tiny_dskd(pretrained=False).model.blur, GaussianSmoothing)


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


def test_standardisation_is_the_population_mean_and_std_of_the_summed_maps() -> None:
    torch.manual_seed(0)
    model = tiny_dskd().model.eval()
    images = weld_images(3) if WELD_GOOD.is_dir() else torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        summed = model.summed_maps(*model._features(images), images.shape[-2:])
    assert model.fit_standardization([images[:2], images[2:]]) == 3
    for name, maps in summed.items():
        values = maps.double().flatten()
        student = model.students[name]
        assert float(student.map_mean) == pytest.approx(float(values.mean()), rel=1e-5)
        assert float(student.map_std) == pytest.approx(float(values.std(correction=0)), rel=1e-5)
        assert float(student.map_std) != pytest.approx(float(values.var()), rel=1e-2)  # sigma, not sigma^2


def test_unfitted_statistics_refuse_to_score_and_old_checkpoints_load_as_fitted() -> None:
    model = tiny_dskd(pretrained=False).model.eval()
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="not fitted"):
        model(images)
    state = model.state_dict()
    del state["standardized"]  # a checkpoint written before the flag existed
    model.load_state_dict(state)
    assert not model.standardized  # mu = 0 and sigma = 1: never fitted
    state["students.global.map_std"] = torch.tensor(3.0)
    model.load_state_dict(state)
    assert model.standardized
    model.fit_standardization([images])
    assert model(images).anomaly_map.shape == (2, 1, 32, 32)


def test_statistics_never_come_from_a_validation_split_taken_from_the_test_set(tmp_path: Path) -> None:
    from anomalib.data.utils import ValSplitMode

    datamodule = FolderLayout(_folder(tmp_path, 6), image_size=(32, 32), train_batch_size=4, val_split_ratio=0.34)
    datamodule.setup()
    for mode, sizes in ((ValSplitMode.FROM_TRAIN, [2, 4]), (ValSplitMode.SYNTHETIC, [2, 4]),
                        (ValSplitMode.FROM_DIR, [2, 4]), (ValSplitMode.SAME_AS_TEST, [4]),
                        (ValSplitMode.FROM_TEST, [4]), ("none", [4])):
        datamodule.val_split_mode = mode
        assert [len(loader.dataset) for loader in held_out_normal_loaders(datamodule)] == sizes, mode


def test_resuming_a_finished_checkpoint_still_fits_the_statistics(tmp_path: Path) -> None:
    datamodule = FolderLayout(_folder(tmp_path, 6), image_size=(32, 32), train_batch_size=4, val_split_ratio=0.34)
    arguments = {"max_epochs": 1, "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
                 "enable_model_summary": False, "default_root_dir": tmp_path}
    module = tiny_dskd()
    trainer = Trainer(**arguments, **module.trainer_arguments)
    trainer.fit(module, datamodule=datamodule)
    fitted = _stats(module)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")  # written at the epoch's end, before on_fit_end
    state = torch.load(checkpoint, weights_only=False)
    for key in state["state_dict"]:  # as a checkpoint written before any statistics were fitted
        if key.endswith(("map_mean", "map_std", "standardized")):
            state["state_dict"][key] = torch.tensor(1.0 if key.endswith("map_std") else 0.0).to(
                state["state_dict"][key].dtype)
    torch.save(state, checkpoint)

    resumed = tiny_dskd()
    Trainer(**arguments, **resumed.trainer_arguments).fit(resumed, datamodule=datamodule, ckpt_path=checkpoint)
    assert bool(resumed.model.standardized)
    assert _stats(resumed) == pytest.approx(fitted, rel=1e-5)


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
    loaders = held_out_normal_loaders(datamodule)
    assert len(loaders) == 2 and len(loaders[0].dataset) == 2 and len(loaders[1].dataset) == 4
    no_val = FolderLayout(folder, image_size=(32, 32), val_split_ratio=0)
    no_val.setup()
    assert [len(loader.dataset) for loader in held_out_normal_loaders(no_val)] == [6]

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


def test_training_step_uses_the_model_temperature_and_trains_every_student_parameter() -> None:
    torch.manual_seed(0)
    module = tiny_dskd(pretrained=False, temperature=2.0)
    module.model.train()
    images = torch.rand(2, 3, 32, 32)
    teacher, students = module.model(images)
    loss = module.loss(teacher, students)
    with torch.no_grad():
        local = sum(cosine_distance_map(t, s).mean() for t, s in zip(teacher, students["local"], strict=True))
        glob = [sum(contextual_affinity_map(t, s, temperature=value).mean()
                    for t, s in zip(teacher, students["global"], strict=True)) for value in (2.0, 1.0)]
    torch.testing.assert_close(loss.detach(), local + glob[0])  # Eq. 7 at the model's T, plus Eq. 2
    assert abs(float(glob[0] - glob[1])) > 1e-3 * float(glob[0])
    loss.backward()
    for name, student in module.model.students.items():
        missing = [key for key, parameter in student.named_parameters() if parameter.grad is None]
        assert not missing, f"{name} student parameters without gradient: {missing}"
        assert sum(float(parameter.grad.abs().sum()) for parameter in student.parameters()) > 0


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


@pytest.mark.slow
def test_engine_on_mvtecad_fits_statistics_on_training_images_and_thresholds_on_their_scale(
        shared_data: Path, tmp_path: Path) -> None:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.metrics import F1AdaptiveThreshold
    from lightning.pytorch import seed_everything
    from torchvision.transforms.v2 import Resize

    seed_everything(0, verbose=False)
    # anomalib's default validation split is the test set (same_as_test): 128 weld test images
    datamodule = MVTecAD(shared_data, "weld", train_batch_size=8, eval_batch_size=32, num_workers=0,
                         augmentations=Resize((32, 32)))
    module = DSKD(image_size=(32, 32), evaluator=False, visualizer=False)
    engine = Engine(max_epochs=1, limit_train_batches=1, default_root_dir=tmp_path, logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
    engine.fit(module, datamodule=datamodule)
    fitted = _stats(module)
    assert module.fit_standardization([datamodule.train_dataloader()]) == 37
    assert _stats(module) == pytest.approx(fitted, rel=1e-5)

    # anomalib's threshold (fitted on validation during fit) is on the scale of the final, standardised scores
    module.model.eval()
    threshold = F1AdaptiveThreshold(fields=["pred_score", "gt_label"])
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            threshold.update(batch.update(pred_score=module.model(module.model_inputs(batch.image)).pred_score))
    assert float(module.post_processor.image_threshold) == pytest.approx(float(threshold.compute()), rel=1e-4)
