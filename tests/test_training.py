"""Trainer settings: schedules in steps, precision, DDP (2 CPU processes) and the loops modules run themselves."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from distillad.cli import main
from distillad.models.aand.lightning_model import AAND
from distillad.models.base import average_gradients
from distillad.models.dmdd.torch_model import MultiPerceptionSegmentationNetwork
from distillad.pipeline import RunConfig, fit
from distillad.synthesis import AnomalySynthesizer
from distillad.training import cpu_has_native_bf16

RUN_FILES = {"config.json", "model.ckpt", "checkpoints/last.ckpt", "metrics.json", "test_scores.csv", "curves.json",
             "training.json"}


def weld_config(shared_data: Path, model: str, **settings) -> RunConfig:
    return RunConfig(model=model, model_options={}, data={"kind": "mvtec_ad", "root": str(shared_data), "category": "weld"},
                     image_size=64, batch_size=4, **settings)


def run_files(run_dir: Path) -> set[str]:
    return {str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file() and "logs" not in path.parts}


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--devices", "2"], "needs --strategy ddp"),
    (["--devices", "3", "--strategy", "ddp"], "not divisible by 3 devices"),
    pytest.param(["--accelerator", "gpu", "--devices", "64", "--strategy", "ddp"], "CUDA GPU(s) are visible",
                 id="more-gpus-than-visible"),
])
def test_device_settings_the_trainer_cannot_honour_are_one_line_errors(argv: list[str], fragment: str, shared_data: Path,
                                                                        tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["distillad", "fit", "--root", str(shared_data), "--category", "weld",
                                      "--batch-size", "16", "--out", str(tmp_path / "run"), *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_unknown_precision_is_rejected_by_the_parser(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["distillad", "fit", "--normal-dir", str(tmp_path), "--precision", "8"])
    with pytest.raises(SystemExit):
        main()
    assert "--precision" in capsys.readouterr().err


@pytest.mark.parametrize(("max_steps", "global_step", "stage"), [(10, 0, 1), (10, 4, 1), (10, 5, 2), (10, 9, 2)])
def test_aand_splits_a_schedule_in_steps_in_the_paper_ratio(max_steps: int, global_step: int, stage: int) -> None:
    module = SimpleNamespace(trainer=SimpleNamespace(max_steps=max_steps, max_epochs=-1, global_step=global_step),
                             hparams=SimpleNamespace(stage1_epochs=100, stage2_epochs=120), current_epoch=0)
    assert AAND.stage.fget(module) == stage  # round(10 * 100 / 220) = 5 steps of stage 1


@pytest.mark.slow
def test_max_steps_trains_that_many_steps_on_a_small_dataset(shared_data: Path, tmp_path: Path) -> None:
    # 8 images less the held-out normal image give 2 steps per epoch: 5 steps need a partial third epoch.
    metrics = fit(weld_config(shared_data, "rd", epochs=1, max_steps=5), tmp_path / "run", train_limit=8, test_limit=8,
                  heatmaps=False)
    assert metrics["train_steps"] == 5
    assert metrics["train_epochs"] == 3
    assert metrics["max_steps"] == 5


@pytest.mark.slow
def test_dmdd_msn_epoch_runs_in_the_trainer_precision(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[torch.dtype] = []
    original = MultiPerceptionSegmentationNetwork.forward

    def recording_forward(self, maps, image_size):
        logits, score = original(self, maps, image_size)
        if self.training:
            seen.append(logits.dtype)
        return logits, score

    monkeypatch.setattr(MultiPerceptionSegmentationNetwork, "forward", recording_forward)
    metrics = fit(weld_config(shared_data, "dmdd", epochs=1, precision="bf16-mixed"), tmp_path / "run", train_limit=8,
                  test_limit=8, heatmaps=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert metrics["train_steps"] == 2  # the MSN's updates are not training steps


def _average_in_rank(rank: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    parameters = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    parameters[0].grad = torch.full((3,), float(rank + 1))
    parameters[1].grad = torch.arange(4.0).view(2, 2) * (rank * 2 + 1)
    average_gradients(parameters)
    results[rank] = [p.grad.tolist() for p in parameters]
    torch.distributed.destroy_process_group()


def test_average_gradients_takes_the_mean_over_ranks(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_average_in_rank, args=(str(tmp_path / "init"), results), nprocs=2, start_method="spawn")
        results = dict(results)
    expected = [[1.5, 1.5, 1.5], [[0.0, 2.0], [4.0, 6.0]]]  # ranks: 1 and 2; arange * 1 and arange * 3
    assert results[0] == expected
    assert results[1] == expected


def test_synthesizer_pickles_with_its_random_state() -> None:
    images = torch.rand(2, 3, 32, 32)
    synthesizer = AnomalySynthesizer(foreground="none", seed=3)
    synthesizer(images)
    copy = pickle.loads(pickle.dumps(synthesizer))
    assert torch.equal(synthesizer(images).anomalous, copy(images).anomalous)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["rd", "dmdd", "dskd", "aand"])
def test_two_process_cpu_ddp_fit_writes_a_complete_run(model: str, shared_data: Path, tmp_path: Path) -> None:
    config = weld_config(shared_data, model, epochs=1, max_steps=4, accelerator="cpu", devices=2, strategy="ddp")
    metrics = fit(config, tmp_path / "run", train_limit=16, test_limit=8, heatmaps=False)
    assert run_files(tmp_path / "run") >= RUN_FILES
    assert metrics["train_steps"] == 4
    assert metrics["devices"] == 2
    assert 0.0 <= metrics["image_AUROC"] <= 1.0 and metrics["num_test_images"] == 8


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert cpu_has_native_bf16("processor : 0\nflags : fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16("flags\t\t: fpu avx512f avx512_bf16\n")
    assert not cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_vnni\n")


@pytest.mark.parametrize("model_class", ["rd", "dskd", "aand"])
def test_the_cached_teacher_runs_in_float32_inside_a_bf16_step(model_class: str) -> None:
    """Training sees the teacher features that inference compares with (models.base.float32_teacher)."""
    from distillad.models.aand.torch_model import AANDModel
    from distillad.models.dskd.torch_model import DSKDModel
    from distillad.models.rd.torch_model import ReverseDistillationModel

    classes = {"rd": ReverseDistillationModel, "dskd": DSKDModel, "aand": AANDModel}
    options = {"image_size": (64, 64)} if model_class == "dskd" else {}
    model = classes[model_class](pretrained=False, **options).train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.encode(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.encode(images)
    for level, reference in zip(features, expected, strict=True):
        assert level.dtype == torch.float32
        torch.testing.assert_close(level, reference, rtol=0, atol=0)


def test_aand_s_fixed_advanced_teacher_runs_in_float32_inside_a_bf16_step() -> None:
    from distillad.models.aand.torch_model import AANDModel

    model = AANDModel(pretrained=False).train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amplified, _ = model(images)
    for level, reference in zip(amplified, expected, strict=True):
        assert level.dtype == torch.float32
        torch.testing.assert_close(level, reference, rtol=0, atol=0)
