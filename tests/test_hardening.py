"""Hardening, through the real command line (a subprocess, its exit status and stderr):

- model files are data: a run directory or an export folder whose files carry a code-executing pickle is
  refused with one line, and the code never runs;
- truncated checkpoints, a run stopped before calibration, option values of the wrong type or range, a run
  directory that holds another run and an export folder that cannot be written each get one line, before
  anything is written;
- the files a run writes are replaced atomically.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from distillad.errors import DistilladError
from distillad.storage import atomic_writer, read_checkpoint
from test_cli import assert_one_line_error, run_main

CLI = [sys.executable, "-c", "from distillad.cli import main; main()"]


def cli(*args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``distillad ARGS`` in a fresh process (one torch thread, as the tests)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def assert_cli_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and one ``distillad: error:`` line that holds every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("distillad: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


class RunsCode:
    """Pickles into a call of ``os.system``: what a hostile model file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def hostile_checkpoint(path: Path, marker: Path) -> None:
    """A Lightning-looking checkpoint whose unpickling would create ``marker``; checks that it really would."""
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": RunsCode(marker)}}, path)
    torch.load(path, weights_only=False)  # the trap is real: an unrestricted load runs the command
    assert marker.exists()
    marker.unlink()


@pytest.fixture
def run_copy(shared_weld_run, tmp_path: Path) -> Path:
    """A copy of a finished RD run (64 px, weld subset) that the test may damage."""
    _, run_dir = shared_weld_run("rd")
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_a_hostile_model_file_never_runs_on_predict_test_export_or_resume(run_copy: Path, shared_data: Path,
                                                                        tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    hostile_checkpoint(run_copy / "model.ckpt", marker)
    hostile_checkpoint(run_copy / "checkpoints" / "last.ckpt", marker)
    image = next((shared_data / "weld" / "test" / "good").iterdir())
    for command in (["predict", "--run", run_copy, "--input", image, "--out", tmp_path / "predictions"],
                    ["test", "--run", run_copy, "--no-heatmaps"],
                    ["export", "--run", run_copy, "--format", "torch", "--out", tmp_path / "export"]):
        assert_cli_error(cli(*command), str(run_copy / "model.ckpt"), "not plain data", "posix.system")
    config = json.loads((run_copy / "config.json").read_text())
    resume = cli("fit", "--model", "rd", "--root", shared_data, "--category", "weld", "--image-size", "64",
                 "--epochs", "2", "--batch-size", "4", "--train-limit", "8", "--test-limit", "8", "--no-heatmaps",
                 "--out", run_copy, "--resume")
    assert_cli_error(resume, "last.ckpt", "not plain data")
    assert json.loads((run_copy / "config.json").read_text()) == config
    assert not marker.exists()
    assert not (tmp_path / "predictions" / "predictions.csv").exists()


@pytest.mark.parametrize("name", ["model.ckpt", "checkpoints/last.ckpt"])
def test_a_truncated_checkpoint_is_a_one_line_error(name: str, run_copy: Path, shared_data: Path) -> None:
    path = run_copy / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if name == "model.ckpt":
        result = cli("test", "--run", run_copy, "--no-heatmaps")
    else:
        result = cli("fit", "--model", "rd", "--root", shared_data, "--category", "weld", "--image-size", "64",
                     "--epochs", "2", "--batch-size", "4", "--train-limit", "8", "--test-limit", "8", "--out", run_copy,
                     "--resume")
    assert_cli_error(result, str(path), "truncated or corrupt")


def test_a_run_stopped_before_calibration_asks_for_resume(run_copy: Path, tmp_path: Path, shared_data: Path) -> None:
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "threshold": None}))
    image = next((shared_data / "weld" / "test" / "good").iterdir())
    assert_cli_error(cli("predict", "--run", run_copy, "--input", image, "--out", tmp_path / "p"),
                     "before calibration", "--resume")
    assert_cli_error(cli("test", "--run", run_copy), "before calibration", "--resume")


def test_fit_refuses_a_folder_that_holds_another_run(run_copy: Path, shared_data: Path) -> None:
    before = {path: path.read_bytes() for path in (run_copy / "config.json", run_copy / "model.ckpt")}
    common = ["--root", shared_data, "--category", "weld", "--image-size", "64", "--epochs", "2", "--batch-size", "4",
              "--train-limit", "8", "--test-limit", "8", "--out", run_copy]
    assert_cli_error(cli("fit", "--model", "dmdd", *common), "already holds a 'rd' run", "--resume", "--overwrite")
    assert_cli_error(cli("fit", "--model", "dmdd", *common, "--resume"), "model 'rd' -> 'dmdd'", "--overwrite")
    assert_cli_error(cli("fit", "--model", "rd", *common, "--resume", "--option", "lr=0.001"), "model_options")
    assert {path: path.read_bytes() for path in before} == before
    (run_copy / "export").mkdir()
    (run_copy / "notes.txt").write_text("the user's own file")
    replaced = cli("fit", "--model", "rd", *common, "--no-heatmaps", "--option", "lr=0.001", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert json.loads((run_copy / "config.json").read_text())["model_options"] == {"lr": 0.001}
    assert not (run_copy / "export").exists()
    assert (run_copy / "notes.txt").read_text() == "the user's own file"


def test_option_values_are_checked_before_anything_is_written(shared_data: Path, tmp_path: Path, monkeypatch,
                                                              capsys) -> None:
    out = tmp_path / "run"
    common = ["--model", "rd", "--root", shared_data, "--category", "weld", "--image-size", "64", "--train-limit", "4",
              "--out", out]
    assert_cli_error(cli("fit", *common, "--option", "lr=abc"), "'rd'", "lr='abc'", "a number")
    for option, fragments in (("lr=-1", ("lr=-1", "> 0")), ("sigma=abc", ("sigma='abc'", "a number")),
                              ("betas=(2,3)", ("betas=(2, 3)", "[0, 1)"))):
        err = run_main(monkeypatch, capsys, ["fit", *map(str, common), "--option", option])
        assert_one_line_error(err, "'rd'", *fragments)
    assert not out.exists()


def test_export_into_an_unwritable_folder_fails_before_tracing(run_copy: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_cli_error(cli("export", "--run", run_copy, "--format", "onnx", "--out", blocker / "export"),
                     "cannot write the export folder", str(blocker / "export" / "onnx"))


# --- export folders ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_export(shared_weld_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distillad.export import export_formats

    _, run_dir = shared_weld_run("rd")
    return export_formats(run_dir, ["torch"], tmp_path_factory.mktemp("export"))["torch"].parent


def test_a_hostile_program_archive_never_runs(torch_export: Path, shared_data: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(torch_export, tmp_path / "torch"))
    marker = tmp_path / "code-ran"
    payload = tmp_path / "payload.pt"
    torch.save((RunsCode(marker),), payload)
    archive = folder / "model.pt2"
    original = zipfile.ZipFile(archive)
    rebuilt = tmp_path / "model.pt2"
    with zipfile.ZipFile(rebuilt, "w") as target:
        for item in original.infolist():
            content = payload.read_bytes() if item.filename.endswith("sample_inputs/model.pt") else original.read(item)
            target.writestr(item, content)
    original.close()
    shutil.move(rebuilt, archive)
    image = next((shared_data / "weld" / "test" / "good").iterdir())
    assert_cli_error(cli("predict", "--exported", folder, "--input", image, "--out", tmp_path / "p"),
                     str(archive), "pickled objects")
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the trap is real: torch's loader falls back to an unrestricted load
        torch.export.load(str(archive))
    assert marker.exists()


def test_export_metadata_cannot_point_outside_its_folder(torch_export: Path, shared_data: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(torch_export, tmp_path / "torch"))
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "file": "../../model.pt2"}))
    image = next((shared_data / "weld" / "test" / "good").iterdir())
    assert_cli_error(cli("predict", "--exported", folder, "--input", image, "--out", tmp_path / "p"),
                     "../../model.pt2", "outside")
    (folder / "metadata.json").write_text(json.dumps({**metadata, "format": "pickle"}))
    assert_cli_error(cli("predict", "--exported", folder, "--input", image, "--out", tmp_path / "p"), "'pickle'")


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "torch"])
def test_a_pickle_in_place_of_an_exported_model_never_runs(fmt: str, tmp_path: Path, shared_data: Path) -> None:
    from distillad.runtime import MODEL_FILES

    folder, marker = tmp_path / fmt, tmp_path / "code-ran"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps({"format": fmt, "file": MODEL_FILES[fmt], "image_size": 64,
                                                      "threshold": 0.5, "map_range": [0, 1]}))
    hostile_checkpoint(folder / MODEL_FILES[fmt], marker)
    image = next((shared_data / "weld" / "test" / "good").iterdir())
    assert_cli_error(cli("predict", "--exported", folder, "--input", image, "--out", tmp_path / "p"),
                     str(folder / MODEL_FILES[fmt]))
    assert not marker.exists()


# --- files -------------------------------------------------------------------------------------------------


def test_an_interrupted_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_writer(path) as handle:
        handle.write("half of the new")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]
    with atomic_writer(path) as handle:
        handle.write("new")
    assert path.read_text() == "new"
    umask = os.umask(0o022)
    try:
        with atomic_writer(tmp_path / "shared.csv") as handle:
            handle.write("readable by the group, as open() would make it")
    finally:
        os.umask(umask)
    assert (tmp_path / "shared.csv").stat().st_mode & 0o777 == 0o644


def test_a_checkpoint_of_plain_data_loads(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"weight": torch.ones(2)}, "hyper_parameters": {"image_size": (64, 64)}}, path)
    loaded = read_checkpoint(path, "fix")
    assert loaded["hyper_parameters"]["image_size"] == (64, 64)
    assert torch.equal(loaded["state_dict"]["weight"], torch.ones(2))


def test_every_unreadable_file_is_reported_before_training(shared_data: Path, tmp_path: Path) -> None:
    weld = shared_data / "weld"
    root = tmp_path / "data" / "weld"
    for split in ("train/good", "test/good", "test/defective", "ground_truth/defective"):
        (root / split).mkdir(parents=True)
    for image in sorted((weld / "train" / "good").iterdir())[:6]:
        shutil.copy(image, root / "train" / "good")
    shutil.copy(next((weld / "test" / "good").iterdir()), root / "test" / "good")
    defective = sorted((weld / "test" / "defective").iterdir())[:2]
    for image in defective:
        shutil.copy(image, root / "test" / "defective")
        mask = next((weld / "ground_truth" / "defective").glob(f"{image.stem}*"))
        shutil.copy(mask, root / "ground_truth" / "defective")
    bad = [root / "train" / "good" / "zz_truncated.png", root / "train" / "good" / "zz_empty.png",
           root / "ground_truth" / "defective" / next((weld / "ground_truth" / "defective").glob(f"{defective[0].stem}*")).name]
    bad[0].write_bytes(defective[0].read_bytes()[:60])
    bad[1].write_bytes(b"")
    bad[2].write_bytes(b"not a png")
    out = tmp_path / "run"
    result = cli("fit", "--model", "rd", "--root", tmp_path / "data", "--category", "weld", "--image-size", "64",
                 "--out", out)
    assert_cli_error(result, "3 file(s) cannot be read", *map(str, bad))
    assert not out.exists()


def _deliverable_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_a_ctrl_c_that_other_code_swallowed_still_stops_training_at_the_next_batch() -> None:
    import signal

    from distillad.pipeline import CtrlC

    callback, outside = CtrlC(), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        callback.on_train_start(None, None)
        callback.on_train_batch_end()  # nothing pressed yet
        with contextlib.suppress(KeyboardInterrupt):  # as C code that clears every error does
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            callback.on_train_batch_end()
        with pytest.raises(KeyboardInterrupt):
            callback.on_validation_batch_end()
        callback.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)


def test_ctrl_c_during_training_says_how_to_resume(shared_data: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    process = subprocess.Popen([*CLI, "fit", "--model", "rd", "--root", str(shared_data), "--category", "weld",
                                "--image-size", "64", "--epochs", "200", "--batch-size", "4", "--train-limit", "8",
                                "--test-limit", "8", "--no-heatmaps", "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               # A child inherits an ignored or blocked SIGINT (Lightning ignores it after a Ctrl-C
                               # in this process), and Python then installs no KeyboardInterrupt handler: start clean.
                               preexec_fn=_deliverable_sigint)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "last.ckpt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before its first checkpoint: nothing left to interrupt"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "distillad: interrupted; rerun the same 'distillad fit' command with --resume" in stderr


def test_the_threshold_is_the_quantile_of_the_held_out_and_calibration_images(shared_data: Path,
                                                                               tmp_path: Path) -> None:
    from distillad.pipeline import RunConfig, build_datamodule

    extra = tmp_path / "more-normal"
    extra.mkdir()
    for image in sorted((shared_data / "mtd" / "train" / "good").iterdir())[:5]:
        shutil.copy(image, extra)
    out = tmp_path / "run"
    result = cli("fit", "--model", "rd", "--root", shared_data, "--category", "weld", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "4", "--train-limit", "8", "--test-limit", "8", "--no-heatmaps",
                 "--false-alarm-rate", "0.2", "--calibration-dir", extra, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the decision threshold rests on 6 normal image(s) only" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["calibration_images"], metrics["false_alarm_rate"]) == (6, 0.2)
    datamodule = build_datamodule(RunConfig.load(out), train_limit=8)
    datamodule.setup()
    held_out = [row.image_path for row in datamodule.val_data.samples.itertuples()]
    assert len(held_out) == 1
    predicted = cli("predict", "--run", out, "--input", *held_out, extra, "--out", tmp_path / "p", "--no-heatmaps")
    assert "threshold from 6 normal images" in predicted.stdout
    with (tmp_path / "p" / "predictions.csv").open() as handle:
        scores = torch.tensor([float(row["score"]) for row in csv.DictReader(handle)], dtype=torch.float64)
    assert metrics["threshold"] == pytest.approx(float(torch.quantile(scores, 0.8)), abs=1e-5)
    assert metrics["threshold"] != pytest.approx(float(torch.quantile(scores, 0.99)), abs=1e-5)


# --- the bad-input matrix, through the command line -----------------------------------------------------------


def write_awkward_category(shared_data: Path, category: Path) -> None:
    """A category in MVTec layout made of real weld images in every awkward form a user may have: grayscale,
    RGBA, 16-bit, JPEG, BMP and TIFF files of several sizes, stray non-image files, masks at half resolution."""
    import cv2
    import numpy as np

    weld = shared_data / "weld"
    for split in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (category / split).mkdir(parents=True)
    forms = [
        ("png", lambda image: cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)),
        ("png", lambda image: cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)),
        ("png", lambda image: image.astype(np.uint16) * 257),
        ("jpg", lambda image: image),
        ("bmp", lambda image: cv2.resize(image, None, fx=0.5, fy=0.5)),
        ("tiff", lambda image: cv2.resize(image, None, fx=0.75, fy=0.6)),
    ]
    for index, path in enumerate(sorted((weld / "train" / "good").iterdir())[:12]):
        suffix, form = forms[index % len(forms)]
        cv2.imwrite(str(category / "train" / "good" / f"{index:03d}.{suffix}"), form(cv2.imread(str(path))))
    for index, path in enumerate(sorted((weld / "test" / "good").iterdir())[:2]):
        suffix, form = forms[(index + 2) % len(forms)]
        cv2.imwrite(str(category / "test" / "good" / f"{index:03d}.{suffix}"), form(cv2.imread(str(path))))
    for index, path in enumerate(sorted((weld / "test" / "defective").iterdir())[:3]):
        shutil.copy(path, category / "test" / "crack" / f"{index:03d}.png")
        mask = cv2.imread(str(next((weld / "ground_truth" / "defective").glob(f"{path.stem}*"))), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(category / "ground_truth" / "crack" / f"{index:03d}_mask.png"),
                    cv2.resize(mask, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_NEAREST))
    for folder in ("train/good", "test/crack"):
        (category / folder / "notes.txt").write_text("not an image")
        (category / folder / ".DS_Store").write_bytes(b"\x00\x01")


@pytest.fixture(scope="module")
def awkward_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("awkward")
    write_awkward_category(shared_data, root / "parts")
    return root


def test_awkward_but_valid_images_train_and_test(awkward_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("fit", "--model", "rd", "--root", awkward_root, "--category", "parts", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "4", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["num_test_images"], metrics["num_anomalous"]) == (5, 3)
    assert len(list((out / "heatmaps").iterdir())) == 5


def _broken_copies(awkward_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    for name, damage in (("empty", lambda c: [p.unlink() for p in (c / "train" / "good").iterdir()]),
                         ("nomask", lambda c: (c / "ground_truth" / "crack" / "001_mask.png").unlink())):
        shutil.copytree(awkward_root / "parts", root / name)
        damage(root / name)
    return root


def test_every_bad_input_is_one_line_naming_the_fix(awkward_root: Path, tmp_path: Path) -> None:
    broken = _broken_copies(awkward_root, tmp_path)
    base = ["fit", "--model", "rd", "--image-size", "64", "--epochs", "1"]
    data = ["--root", str(awkward_root), "--category", "parts"]
    cases = {
        "missing root": ([*base, "--root", str(tmp_path / "nowhere"), "--category", "parts"], ("nowhere",)),
        "missing category": ([*base, "--root", str(awkward_root), "--category", "bolts"], ("'bolts' not found",)),
        "empty train set": ([*base, "--root", str(broken), "--category", "empty"], ("empty train set", "train/good")),
        "defective image without its mask": ([*base, "--root", str(broken), "--category", "nomask"], ("no mask", "001.png")),
        "unknown backbone": ([*base, *data, "--backbone", "resnet9000"], ("resnet9000",)),
        "missing weights file": ([*base, *data, "--weights", str(tmp_path / "none.pth")], ("none.pth",)),
        "devices without a strategy": ([*base, *data, "--devices", "2"], ("--strategy ddp",)),
        "zero epochs": ([*base, *data, "--epochs", "0"], ("--epochs",)),
        "image size not a multiple of 32": ([*base, *data, "--image-size", "50"], ("--image-size",)),
        "unknown model": (["fit", "--model", "patchcore", *data], ("--model",)),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {name: subprocess.Popen([*CLI, *args, "--out", str(tmp_path / name.replace(" ", "-"))],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for name, (args, _) in cases.items()}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=600)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if name in ("zero epochs", "image size not a multiple of 32", "unknown model"):  # argparse's own line
            assert result.returncode == 2 and "Traceback" not in stderr, (name, stderr[-2000:])
            assert all(fragment in stderr for fragment in cases[name][1]), (name, stderr[-2000:])
        else:
            assert_cli_error(result, *cases[name][1])
        assert not (tmp_path / name.replace(" ", "-")).exists(), name


def test_runs_saved_before_dataset_names_resume_as_mvtec_ad(tmp_path: Path) -> None:
    from distillad.pipeline import RunConfig, claim_run_dir

    old = {"model": "rd", "model_options": {}, "data": {"kind": "mvtec", "root": "/data", "category": "weld"}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = RunConfig(model="rd", model_options={}, data={"kind": "mvtec_ad", "root": "/data", "category": "weld"})
    claim_run_dir(config, tmp_path, resume=True, overwrite=False)  # the same run: no error
    assert RunConfig.load(tmp_path).data["kind"] == "mvtec_ad"
    other = RunConfig(model="rd", model_options={}, data={"kind": "mvtec_ad", "root": "/data", "category": "mtd"})
    with pytest.raises(DistilladError, match="'category': 'weld'"):
        claim_run_dir(other, tmp_path, resume=True, overwrite=False)
