"""Tests of the ``distillad`` command and the run-directory pipeline, end to end on a small subset of weld."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from distillad.cli import main, run
from distillad.metrics import auroc

FIT_LIMITS = ["--epochs", "1", "--image-size", "64", "--train-limit", "10", "--test-limit", "10"]


def fit_args(shared: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--model", "rd", "--root", str(shared), "--category", "weld", *FIT_LIMITS, "--out", str(out), *extra]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def scores_by_path(run_dir: Path) -> dict[str, float]:
    return {row["path"]: float(row["score"]) for row in read_csv(run_dir / "test_scores.csv")}


@pytest.fixture(scope="module")
def weld_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained run (1 epoch, 64 px, 10 train / 10 test images of weld), shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert run(fit_args(shared_data, out)) == 0
    return out


# --- fit / test / predict round trip ----------------------------------------------------------------------


@pytest.mark.slow
def test_fit_writes_a_complete_run_directory(weld_run: Path) -> None:
    for name in ("config.json", "model.ckpt", "checkpoints/last.ckpt", "metrics.json", "test_scores.csv"):
        assert (weld_run / name).is_file(), name
    metrics = json.loads((weld_run / "metrics.json").read_text())
    for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1max"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["num_test_images"] == 10 and 0 < metrics["num_anomalous"] < 10
    assert metrics["train_seconds"] > 0

    config = json.loads((weld_run / "config.json").read_text())
    assert (config["model"], config["image_size"], config["epochs"], config["backbone"]) == (
        "rd", 64, 1, "tf_efficientnet_lite0")
    assert config["threshold_source"] == "held-out normal images" and config["threshold"] == metrics["threshold"]

    rows = read_csv(weld_run / "test_scores.csv")
    assert len(rows) == 10 and len({row["path"] for row in rows}) == 10
    assert all(Path(row["path"]).is_file() for row in rows)
    # the reported AUROC is the AUROC of the written scores, and decisions follow the calibrated threshold
    labels = torch.tensor([row["label"] in ("1", "True") for row in rows], dtype=torch.long)
    scores = torch.tensor([float(row["score"]) for row in rows], dtype=torch.float64)
    assert int(labels.sum()) == metrics["num_anomalous"]
    assert metrics["image_AUROC"] == pytest.approx(auroc(scores, labels), abs=1e-5)
    assert [int(row["is_anomalous"]) for row in rows] == [int(s >= config["threshold"]) for s in scores.tolist()]

    heatmaps = sorted((weld_run / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 10


@pytest.mark.slow
def test_test_command_reproduces_the_fit_metrics(weld_run: Path) -> None:
    before_metrics = json.loads((weld_run / "metrics.json").read_text())
    before_scores = scores_by_path(weld_run)
    assert run(["test", "--run", str(weld_run), "--no-heatmaps"]) == 0
    after = json.loads((weld_run / "metrics.json").read_text())
    assert after["num_test_images"] == before_metrics["num_test_images"]  # the same test images, not the full split
    assert after["image_AUROC"] == pytest.approx(before_metrics["image_AUROC"], abs=1e-6)
    assert after["pixel_AUROC"] == pytest.approx(before_metrics["pixel_AUROC"], abs=1e-6)
    after_scores = scores_by_path(weld_run)
    assert after_scores.keys() == before_scores.keys()
    for path, score in before_scores.items():
        assert after_scores[path] == pytest.approx(score, abs=1e-5), path


@pytest.mark.slow
def test_predict_scores_images_and_reports_unreadable_files(weld_run: Path, tmp_path: Path) -> None:
    # two defective test images of the run (so their scores are known), a stray text file and a corrupt PNG
    known = {path: score for path, score in scores_by_path(weld_run).items() if "defective" in path}
    chosen = sorted(known)[:2]
    folder = tmp_path / "input"
    folder.mkdir()
    for path in chosen:
        shutil.copy(path, folder / Path(path).name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "predicted"
    assert run(["predict", "--run", str(weld_run), "--input", str(folder), "--out", str(out)]) == 0

    rows = {Path(row["path"]).name: row for row in read_csv(out / "predictions.csv")}
    assert set(rows) == {Path(p).name for p in chosen} | {"broken.png"}  # the .txt is skipped
    broken = rows["broken.png"]
    assert broken["score"] == "" and broken["is_anomalous"] == "" and "broken.png" in broken["error"]
    threshold = json.loads((weld_run / "config.json").read_text())["threshold"]
    for path in chosen:
        row = rows[Path(path).name]
        assert row["error"] == ""
        assert float(row["score"]) == pytest.approx(known[path], rel=1e-3)  # same model, same preprocessing as test
        assert int(row["is_anomalous"]) == int(float(row["score"]) >= threshold)
    assert len(list((out / "heatmaps").glob("*.png"))) == 2


# --- resume and determinism -------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(weld_run: Path, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(weld_run, out)
    first_epoch = read_csv(out / "logs" / "version_0" / "metrics.csv")
    assert [row["epoch"] for row in first_epoch if row.get("train_loss_epoch")] == ["0"]
    args = fit_args(shared_data, out, "--no-heatmaps")
    args[args.index("--epochs") + 1] = "2"
    assert run([*args, "--resume"]) == 0
    resumed = read_csv(out / "logs" / "version_1" / "metrics.csv")
    # only epoch 1 was trained in the second run: epoch 0 came from checkpoints/last.ckpt
    assert [row["epoch"] for row in resumed if row.get("train_loss_epoch")] == ["1"]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seconds_per_epoch"] == pytest.approx(metrics["train_seconds"])  # one epoch trained here

    # Resuming a finished run trains nothing: the timing of the epochs that were trained is kept.
    assert run([*args, "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train_seconds"] == metrics["train_seconds"]


@pytest.mark.slow
def test_same_seed_gives_identical_test_scores(weld_run: Path, shared_data: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert run(fit_args(shared_data, again, "--no-heatmaps")) == 0
    assert scores_by_path(again) == scores_by_path(weld_run)


# --- user errors: one line, exit status 2 -----------------------------------------------------------------


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the console entry point; assert it exits with 2 and return its stderr."""
    monkeypatch.setattr(sys, "argv", ["distillad", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("distillad: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def test_missing_root_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    missing = tmp_path / "nowhere"
    err = run_main(monkeypatch, capsys, ["fit", "--root", str(missing), "--category", "weld", "--out", str(tmp_path / "r")])
    assert_one_line_error(err, str(missing), "does not exist")


def test_missing_category_is_a_one_line_error(shared_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    err = run_main(monkeypatch, capsys, ["fit", "--root", str(shared_data), "--category", "nope", "--out", str(tmp_path / "r")])
    assert_one_line_error(err, "'nope'", "weld")  # names the available categories
    err = run_main(monkeypatch, capsys, ["fit", "--root", str(shared_data), "--out", str(tmp_path / "r")])
    assert_one_line_error(err, "--category")


def test_unknown_model_option_is_a_one_line_error(shared_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    err = run_main(monkeypatch, capsys, ["fit", "--root", str(shared_data), "--category", "weld", "--option", "nonsense=1",
                                         "--out", str(tmp_path / "r")])
    assert_one_line_error(err, "nonsense", "loss_mode")  # names the valid options


def test_predict_on_a_missing_run_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    missing = tmp_path / "no_run"
    err = run_main(monkeypatch, capsys, ["predict", "--run", str(missing), "--input", str(tmp_path), "--out",
                                         str(tmp_path / "p")])
    assert_one_line_error(err, str(missing), "distillad fit")
    assert not (tmp_path / "p" / "predictions.csv").exists()


@pytest.mark.parametrize("size", ["50", "16", "abc"])
def test_bad_image_size_is_rejected_by_the_parser(size: str, tmp_path: Path, monkeypatch, capsys) -> None:
    # argparse prints its usage lines and then the one error line.
    err = run_main(monkeypatch, capsys, ["fit", "--root", str(tmp_path), "--category", "x", "--image-size", size])
    last = err.strip().splitlines()[-1]
    assert last.startswith("distillad fit: error: argument --image-size")


def test_models_command_lists_rd_and_its_options(capsys) -> None:
    assert run(["models"]) == 0
    lines = {line.split(":", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"rd", "dmdd", "dskd", "aand"} <= set(lines)
    assert "loss_mode='pixel'" in lines["rd"] and "lr=0.005" in lines["rd"]
    assert "backbone" not in lines["rd"]  # managed by --backbone, not an --option
