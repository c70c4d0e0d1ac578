"""Export to ONNX, OpenVINO and torch.export: parity with PyTorch on real images for every model, prediction
through the exported runtimes, the Lightning-free loader, and the one-line errors.

Every model is trained once on a tiny weld subset (64 px, 8 training and 8 test images) and exported once to
all three formats; the tests share both.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch

from distillad.cli import run
from distillad.errors import DistilladError
from distillad.export import FORMATS, TOLERANCE, export_formats, export_model, export_run
from distillad.pipeline import RunConfig, load_model
from distillad.runtime import MODEL_FILES, load_exported
from test_cli import assert_one_line_error, read_csv, run_main

#: Training epochs per model: AAND trains its amplification stage and its student in one epoch each.
EPOCHS = {"rd": 1, "dmdd": 1, "dskd": 1, "aand": 2}


@pytest.fixture(scope="module")
def exported(shared_weld_run, tmp_path_factory: pytest.TempPathFactory):
    """``exported(model)``: the model's shared weld run and its export to every format (made once per module)."""
    exports: dict[str, tuple[Path, dict[str, Path]]] = {}

    def get(model: str) -> tuple[Path, dict[str, Path]]:
        if model not in exports:
            _, run_dir = shared_weld_run(model, epochs=EPOCHS[model])
            exports[model] = run_dir, export_formats(run_dir, FORMATS, tmp_path_factory.mktemp(f"{model}-export"))
        return exports[model]

    return get


def run_test_images(run_dir: Path, count: int) -> list[Path]:
    """The first ``count`` test images of a run."""
    return [Path(row["path"]) for row in read_csv(run_dir / "test_scores.csv")][:count]


# --- parity ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(EPOCHS))
def test_every_format_matches_pytorch_on_real_images(model: str, exported, load_images) -> None:
    run_dir, files = exported(model)
    module, config = load_model(run_dir)
    images = load_images(run_test_images(run_dir, 5), config.image_size)  # 5: a batch size the export did not check
    with torch.no_grad():
        reference = module.model(images)
    assert float(reference.pred_score.max() - reference.pred_score.min()) > 0  # a comparison of something

    assert sorted(files) == sorted(FORMATS)
    for fmt, path in files.items():
        assert path.name == MODEL_FILES[fmt]
        metadata = json.loads((path.parent / "metadata.json").read_text())
        assert (metadata["format"], metadata["model"], metadata["backbone"], metadata["image_size"]) == (
            fmt, model, config.backbone, 64)
        assert (metadata["threshold"], metadata["score_floor"]) == (config.threshold, config.score_floor)
        assert metadata["map_range"] == list(config.map_range)
        assert list(metadata["inputs"]) == ["images"] and list(metadata["outputs"]) == ["anomaly_map", "pred_score"]
        assert {"torch", "onnxruntime", "openvino"} <= set(metadata["versions"])
        parity = metadata["parity"]
        assert parity["images"] == 8 and parity["batch_sizes"] == [8, 1]
        assert parity["max_abs_anomaly_map"] <= TOLERANCE and parity["max_abs_pred_score"] <= TOLERANCE

        runtime = load_exported(path.parent, threads=1)
        maps, scores = runtime(images.numpy())
        assert maps.shape == (5, 1, 64, 64) and scores.shape == (5,)
        assert np.abs(maps - reference.anomaly_map.numpy()).max() <= TOLERANCE, fmt
        assert np.abs(scores - reference.pred_score.numpy()).max() <= TOLERANCE, fmt
        with pytest.raises(DistilladError, match=r"shape \(B, 3, 64, 64\)"):
            runtime(np.zeros((1, 3, 32, 32), dtype=np.float32))


@pytest.mark.slow
def test_predict_from_every_export_runs_without_lightning_or_anomalib(exported, tmp_path: Path) -> None:
    run_dir, files = exported("rd")
    images = [str(path) for path in run_test_images(run_dir, 2)]
    folders = [str(path.parent) for path in files.values()]
    script = (
        "import sys\n"
        "from distillad.cli import run\n"
        f"for index, folder in enumerate({folders!r}):\n"
        f"    assert run(['predict', '--exported', folder, '--input', *{images!r}, '--threads', '1',\n"
        f"                '--out', {str(tmp_path)!r} + f'/out{{index}}']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'anomalib', 'pytorch_lightning')\n"
        "             or m.startswith('distillad.models.rd') or m == 'distillad.pipeline'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"  # only the CLI's table of model names is loaded
    for index in range(len(folders)):
        rows = (tmp_path / f"out{index}" / "predictions.csv").read_text().splitlines()
        assert len(rows) == 3 and all(row.split(",")[1] for row in rows[1:])  # header + 2 scored images


# --- predict through the exported runtimes -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(EPOCHS))
def test_predict_with_each_runtime_gives_the_pytorch_scores_and_decisions(model: str, exported, tmp_path: Path) -> None:
    run_dir, files = exported(model)
    folder = tmp_path / "input"
    folder.mkdir()
    for path in run_test_images(run_dir, 5):
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    common = ["--input", str(folder), "--batch-size", "3", "--threads", "1"]
    assert run(["predict", "--run", str(run_dir), "--out", str(tmp_path / "pytorch"), *common]) == 0
    reference = {Path(row["path"]).name: row for row in read_csv(tmp_path / "pytorch" / "predictions.csv")}
    assert len(reference) == 6 and "broken.png" in reference["broken.png"]["error"]
    assert len(list((tmp_path / "pytorch" / "heatmaps").glob("*.png"))) == 5

    for fmt, path in files.items():
        out = tmp_path / fmt
        assert run(["predict", "--exported", str(path.parent), "--out", str(out), "--num-workers", "1", "--no-heatmaps",
                    *common]) == 0
        assert not (out / "heatmaps").exists()
        rows = {Path(row["path"]).name: row for row in read_csv(out / "predictions.csv")}
        assert rows.keys() == reference.keys()
        for name, row in rows.items():
            expected = reference[name]
            if expected["error"]:
                assert row["error"] == expected["error"]
                assert row["score"] == row["normalized_score"] == row["is_anomalous"] == ""
                continue
            assert float(row["score"]) == pytest.approx(float(expected["score"]), abs=TOLERANCE), (fmt, name)
            assert row["is_anomalous"] == expected["is_anomalous"], (fmt, name)
            normalized = float(row["normalized_score"])
            assert normalized == pytest.approx(float(expected["normalized_score"]), abs=TOLERANCE), (fmt, name)
            assert 0 <= normalized <= 1 and (normalized >= 0.5) == (row["is_anomalous"] == "1"), (fmt, name)


@pytest.mark.slow
def test_normalized_score_follows_the_calibration_and_is_empty_without_a_floor(shared_weld_run, tmp_path: Path) -> None:
    _, run_dir = shared_weld_run("rd")
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "model.ckpt", copy / "model.ckpt")
    config = json.loads((run_dir / "config.json").read_text())
    scores = [float(row["score"]) for row in read_csv(run_dir / "test_scores.csv")]
    threshold = float(np.median(scores))  # a floor and threshold inside the scores: values on both sides of 0.5
    floor = min(scores) + 0.1 * (threshold - min(scores))
    (copy / "config.json").write_text(json.dumps({**config, "threshold": threshold, "score_floor": floor}))
    inputs = [str(path) for path in run_test_images(run_dir, 8)]
    assert run(["predict", "--run", str(copy), "--input", *inputs, "--out", str(tmp_path / "calibrated")]) == 0
    rows = read_csv(tmp_path / "calibrated" / "predictions.csv")
    normalized = [float(row["normalized_score"]) for row in rows]
    expected = np.clip([0.5 + 0.5 * (float(row["score"]) - threshold) / (threshold - floor) for row in rows], 0, 1)
    assert normalized == pytest.approx(expected.tolist(), abs=1e-5)
    assert [value >= 0.5 for value in normalized] == [row["is_anomalous"] == "1" for row in rows]
    assert 0 < sum(value >= 0.5 for value in normalized) < len(rows) and min(normalized) == 0

    older = {key: value for key, value in config.items() if key != "score_floor"}  # a run saved before score_floor
    (copy / "config.json").write_text(json.dumps(older))
    assert run(["predict", "--run", str(copy), "--input", *inputs, "--out", str(tmp_path / "older"), "--no-heatmaps"]) == 0
    rows = read_csv(tmp_path / "older" / "predictions.csv")
    assert [row["normalized_score"] for row in rows] == [""] * 8 and all(row["score"] for row in rows)


class ToyModel(torch.nn.Module):
    """A distillad-shaped model with a submodule named like a Python keyword (as DSKD's ``students['global']``)."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = torch.nn.ModuleDict({"local": torch.nn.Conv2d(3, 1, 3, padding=1),
                                             "global": torch.nn.Conv2d(3, 1, 1)})

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        anomaly_map = sum(branch(images) for branch in self.branches.values())
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)


def test_export_of_a_model_with_keyword_named_submodules(tmp_path: Path) -> None:
    model = ToyModel().eval()
    images = torch.rand(3, 3, 32, 32)
    files = export_model(model, 32, {"torch": tmp_path / "torch"}, images, {"model": "toy"})
    assert list(model.branches) == ["local", "global"]  # the original is left alone
    with torch.no_grad():
        reference = model(images)
    maps, scores = load_exported(files["torch"], threads=1)(images.numpy())
    assert np.abs(maps - reference.anomaly_map.numpy()).max() <= TOLERANCE
    assert np.abs(scores - reference.pred_score.numpy()).max() <= TOLERANCE


def test_an_export_beyond_the_tolerance_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("distillad.export.TOLERANCE", -1.0)  # every difference, even 0, is too large
    with pytest.raises(DistilladError, match="differs from PyTorch by") as error:
        export_model(ToyModel().eval(), 32, {"torch": tmp_path / "torch"}, torch.rand(2, 3, 32, 32), {"model": "toy"})
    assert "\n" not in str(error.value)
    assert (tmp_path / "torch" / "model.pt2").is_file() and not (tmp_path / "torch" / "metadata.json").exists()


# --- user errors: one line, exit status 2 -----------------------------------------------------------------


def unfinished_run(tmp_path: Path) -> Path:
    """A run directory whose training never finished: config.json but no model.ckpt."""
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    RunConfig(model="rd", model_options={}, data={"kind": "mvtec_ad", "root": str(tmp_path), "category": "weld"}).save(run_dir)
    return run_dir


def test_export_of_a_run_without_checkpoint_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    run_dir = unfinished_run(tmp_path)
    err = run_main(monkeypatch, capsys, ["export", "--run", str(run_dir), "--format", "onnx", "openvino"])
    assert_one_line_error(err, str(run_dir), "no model.ckpt", "--resume")
    with pytest.raises(DistilladError, match=r"no model\.ckpt"):
        export_run(run_dir, "torch")
    assert not (run_dir / "export").exists()


def test_unknown_format_exits_with_status_2(tmp_path: Path, monkeypatch, capsys) -> None:
    err = run_main(monkeypatch, capsys, ["export", "--run", str(tmp_path), "--format", "tflite"])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distillad export: error: argument --format")
    assert "'onnx', 'openvino', 'torch'" in lines[0]
    with pytest.raises(DistilladError, match="unknown export format 'tflite'; choose from onnx, openvino, torch"):
        export_run(unfinished_run(tmp_path), "tflite")


@pytest.mark.parametrize(("fmt", "missing", "fix"), [
    ("onnx", "onnxruntime", "pip install onnxruntime"),
    ("openvino", "openvino", "pip install openvino"),
    ("onnx", "onnxscript", "pip install onnx onnxscript"),
])
def test_export_without_a_package_names_the_pip_install(fmt: str, missing: str, fix: str, tmp_path: Path,
                                                        monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # makes 'import <missing>' fail
    with pytest.raises(DistilladError, match=fix) as error:
        export_run(unfinished_run(tmp_path), fmt)  # checked before the run is loaded
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("fmt", "missing"), [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_loading_without_the_runtime_names_the_pip_install(fmt: str, missing: str, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "metadata.json").write_text(json.dumps({"format": fmt, "file": MODEL_FILES[fmt], "image_size": 64}))
    (tmp_path / MODEL_FILES[fmt]).write_bytes(b"")
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(DistilladError, match=f"pip install {missing}"):
        load_exported(tmp_path)


def test_predict_from_a_folder_that_is_no_export_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(b"")
    err = run_main(monkeypatch, capsys, ["predict", "--exported", str(tmp_path), "--input", str(image), "--out",
                                         str(tmp_path / "p")])
    assert_one_line_error(err, str(tmp_path), "metadata.json", "distillad export")
    err = run_main(monkeypatch, capsys, ["predict", "--input", str(image), "--out", str(tmp_path / "p")])
    assert "one of the arguments --run --exported is required" in err
