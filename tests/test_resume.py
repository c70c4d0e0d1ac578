"""Kills lose nothing and change nothing: a ``distillad fit`` process is killed (SIGKILL) at a chosen point, rerun
with ``--resume``, and must end with the test scores and metrics of an uninterrupted run of the same seed, bit
for bit; and two runs of the same seed agree (determinism on CPU), for every model.

The kill points: inside a training step, right after the first epoch's checkpoint (AAND: inside its
amplification stage, whose anomaly synthesis must continue where it was), after AAND's last amplification
epoch (its stage switch), inside DMDD's MSN epoch (DMDD synthesising in DataLoader workers), during calibration
and while writing heatmaps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_hardening import CLI

KILLER = """
import os, signal, sys
point = sys.argv.pop(1)
from lightning.pytorch.callbacks import ModelCheckpoint
from distillad import pipeline
from distillad.models.aand import AAND
from distillad.models.dmdd import DMDD
from distillad.models.dmdd.lightning_model import SegmentationEpoch
from distillad.models.dskd import DSKD
from distillad.models.rd import RD

def kill_at(owner, name, call, after):
    original, calls = getattr(owner, name), [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == call and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapper)

model = {"rd": RD, "dmdd": DMDD, "dskd": DSKD, "aand": AAND}[sys.argv[sys.argv.index("--model") + 1]]
kill_at(*{
    "training-step": (model, "training_step", 3, False),
    "first-checkpoint": (ModelCheckpoint, "_save_checkpoint", 1, True),
    "second-checkpoint": (ModelCheckpoint, "_save_checkpoint", 2, True),
    "msn-epoch": (SegmentationEpoch, "on_train_epoch_end", 2, False),
    "calibration": (pipeline, "calibrate", 1, False),
    "heatmaps": (pipeline, "write_heatmaps", 1, False),
}[point])
from distillad.cli import main
main()
"""

#: What differs between two identical runs: wall-clock times. ``validation_curve`` misses the epoch whose
#: checkpoint was the last thing a killed process wrote (its log line was not flushed yet).
UNTIMED = ("train_seconds", "seconds_per_step", "seconds_per_epoch", "test_ms_per_image", "validation_curve")


#: AAND's amplification stage gets 2 of 3 epochs, so its second epoch resumes the anomaly synthesis.
SCHEDULES = {"aand": ("--epochs", "3", "--option", "stage1_epochs=2", "--option", "stage2_epochs=1")}
DEFAULT_SCHEDULE = ("--epochs", "2")
#: DMDD synthesises in DataLoader workers (its student's and its MSN's anomalies), the others in the step.
WORKERS = {"dmdd": 2}


def fit_args(shared_data: Path, model: str, out: Path, heatmaps: bool) -> list[str]:
    return ["fit", "--model", model, "--root", str(shared_data), "--category", "weld", "--image-size", "64",
            "--batch-size", "4", "--train-limit", "8", "--test-limit", "8", "--out", str(out),
            "--num-workers", str(WORKERS.get(model, 0)), *([] if heatmaps else ["--no-heatmaps"]),
            *SCHEDULES.get(model, DEFAULT_SCHEDULE)]


def run(args: list[str], kill_point: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", KILLER, kill_point, *args] if kill_point else [*CLI, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def outcome(run_dir: Path) -> tuple[str, dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return (run_dir / "test_scores.csv").read_text(), {key: value for key, value in metrics.items() if key not in UNTIMED}


@pytest.fixture(scope="module")
def uninterrupted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """``uninterrupted(model, heatmaps)``: the run directory of a complete fit in a fresh process (cached)."""
    runs: dict[tuple[str, bool], Path] = {}

    def get(model: str, heatmaps: bool = False) -> Path:
        if (model, heatmaps) not in runs:
            out = tmp_path_factory.mktemp(f"{model}-uninterrupted") / "run"
            result = run(fit_args(shared_data, model, out, heatmaps))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[model, heatmaps] = out
        return runs[model, heatmaps]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("model", "point", "heatmaps"), [
    ("rd", "training-step", False),
    ("rd", "calibration", False),
    ("rd", "heatmaps", True),
    ("dmdd", "msn-epoch", False),
    ("dskd", "first-checkpoint", False),
    ("aand", "first-checkpoint", False),
    ("aand", "second-checkpoint", False),
])
def test_a_killed_run_resumes_to_the_uninterrupted_result(model: str, point: str, heatmaps: bool, uninterrupted,
                                                          shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = run(fit_args(shared_data, model, out, heatmaps), kill_point=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    resumed = run([*fit_args(shared_data, model, out, heatmaps), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outcome(out) == outcome(uninterrupted(model, heatmaps))
    if heatmaps:
        reference = uninterrupted(model, heatmaps) / "heatmaps"
        assert sorted(path.name for path in (out / "heatmaps").iterdir()) == sorted(p.name for p in reference.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["rd", "dmdd", "dskd", "aand"])
def test_two_runs_of_one_seed_are_identical(model: str, uninterrupted, shared_data: Path, tmp_path: Path) -> None:
    from distillad.pipeline import RunConfig, fit

    options = {"stage1_epochs": 2, "stage2_epochs": 1} if model == "aand" else {}
    config = RunConfig(model=model, model_options=options, data={"kind": "mvtec_ad", "root": str(shared_data),
                                                                 "category": "weld"},
                       image_size=64, epochs=3 if model == "aand" else 2, batch_size=4,
                       num_workers=WORKERS.get(model, 0))
    fit(config, tmp_path / "run", train_limit=8, test_limit=8, heatmaps=False)
    assert outcome(tmp_path / "run") == outcome(uninterrupted(model))
