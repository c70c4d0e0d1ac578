"""Tests of ``distillad benchmark`` (resumable cells, failing cells, tables, plots) and of the decision threshold."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from distillad.benchmark import BenchmarkSettings, _example_images, markdown, run_benchmark
from distillad.cli import main
from distillad.errors import DistilladError
from distillad.inference import decision_threshold, normalize_scores
from distillad.metrics import aupro, auroc, pro_curve, roc_curve

# --- threshold rule and normalised scores on toy scores --------------------------------------------------


def test_threshold_is_the_99th_percentile_of_normal_scores() -> None:
    normal = torch.arange(1, 101, dtype=torch.float64)  # 1..100
    threshold = decision_threshold(normal[torch.randperm(100)])
    assert threshold == pytest.approx(99.01)  # linear interpolation between 99 and 100 at rank 0.99 * 99
    assert int((normal >= threshold).sum()) == 1  # flags 1% of the normal images


def test_normalised_scores_put_the_floor_at_0_and_the_threshold_at_half() -> None:
    scores = torch.tensor([2.0, 4.0, 6.0, 8.0, 10.0, 50.0, 0.0])
    unit = normalize_scores(scores, threshold=6.0, floor=2.0)
    assert unit.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.0])
    assert ((unit >= 0.5) == (scores >= 6.0)).all()


# --- curves ------------------------------------------------------------------------------------------------


def test_roc_curve_matches_a_hand_computed_curve_and_auroc() -> None:
    scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    fpr, tpr = roc_curve(scores * 40 + 3, labels)  # raw scores outside [0, 1]
    assert fpr.tolist() == pytest.approx([0, 0, 0.5, 0.5, 1])
    assert tpr.tolist() == pytest.approx([0, 0.5, 0.5, 1, 1])
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(auroc(scores, labels)) == pytest.approx(0.75)


def test_pro_curve_reaches_full_overlap_for_a_perfect_map_and_integrates_to_aupro() -> None:
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    masks[0, 0, 2:6, 2:6] = 1
    masks[1, 0, 8:14, 9:12] = 1
    noisy = masks.float() + 0.3 * torch.rand(masks.shape, generator=torch.Generator().manual_seed(0))
    fpr, pro = pro_curve(masks.float(), masks)
    assert float(fpr[-1]) == pytest.approx(0.3, abs=1e-6) and float(pro[fpr > 0].min()) == pytest.approx(1.0)
    fpr, pro = pro_curve(noisy, masks)
    assert float(torch.trapezoid(pro, fpr) / fpr[-1]) == pytest.approx(aupro(noisy, masks), abs=1e-6)


# --- tables -------------------------------------------------------------------------------------------------


def test_markdown_reports_paper_triplets_means_and_failed_cells() -> None:
    rows = [
        {"category": "a", "model": "rd", "image_AUROC": 0.9, "pixel_AUROC": 0.8, "pixel_AUPRO": 0.7},
        {"category": "b", "model": "rd", "image_AUROC": 0.7, "pixel_AUROC": 0.6, "pixel_AUPRO": 0.5},
        {"category": "a", "model": "dmdd", "image_AUROC": 1.0, "pixel_AUROC": 0.9, "pixel_AUPRO": 0.8},
        {"category": "b", "model": "dmdd", "error": "category 'b' not found"},
    ]
    text = markdown(rows, BenchmarkSettings(root="r"), ["rd", "dmdd"], ["a", "b"])
    assert "| a | 90.0/80.0/70.0 | 100.0/90.0/80.0 |" in text
    assert "| b | 70.0/60.0/50.0 | failed |" in text
    assert "| **mean** | 80.0/70.0/60.0 | 100.0/90.0/80.0 (1 of 2) |" in text
    assert "failed: category 'b' not found" in text


def test_markdown_adds_the_mvtec_loco_table_when_cells_report_spro() -> None:
    loco = {"sPRO_logical": 0.5, "sPRO_structural": 0.7, "sPRO_mean": 0.6, "image_AUROC_logical": 0.8,
            "image_AUROC_structural": 0.9, "image_AUROC_mean": 0.85}
    rows = [{"category": "a", "model": "dskd", "image_AUROC": 0.9, "pixel_AUROC": 0.8, "pixel_AUPRO": 0.7, **loco},
            {"category": "b", "model": "dskd", "image_AUROC": 0.9, "pixel_AUROC": 0.8, "pixel_AUPRO": 0.7,
             **{key: value / 2 for key, value in loco.items()}}]
    text = markdown(rows, BenchmarkSettings(root="r"), ["dskd"], ["a", "b"])
    assert "| a | 50.0/70.0/60.0 · 80.0/90.0/85.0 |" in text
    assert "| **mean** | 37.5/52.5/45.0 · 60.0/67.5/63.7 |" in text  # 0.6375 is 63.74999... in binary
    plain = [{key: value for key, value in rows[0].items() if key not in loco}]
    assert "MVTec LOCO" not in markdown(plain, BenchmarkSettings(root="r"), ["dskd"], ["a"])


def test_the_paper_preset_gives_every_model_its_papers_settings() -> None:
    from distillad.benchmark import cell_config

    settings = BenchmarkSettings(root="r", dataset="visa", epochs=3, max_steps=10, preset="paper")
    aand, rd = cell_config(settings, "candle", "aand"), cell_config(settings, "candle", "rd")
    assert (aand.backbone, aand.image_size, aand.batch_size, aand.epochs, aand.max_steps) == (
        "wide_resnet50_2", 256, 16, 220, None)
    assert (rd.epochs, rd.data) == (200, {"kind": "visa", "root": "r", "category": "candle"})
    plain = cell_config(BenchmarkSettings(root="r", epochs=3), "a", "aand")
    assert (plain.backbone, plain.epochs) == ("tf_efficientnet_lite0", 3)
    assert "each paper's encoder" in markdown([], settings, ["aand"], ["candle"])


def test_examples_take_one_image_per_defect_type_in_turn(shared_data: Path, tmp_path: Path) -> None:
    test_dir = shared_data / "mtd" / "test"
    chosen = {kind: sorted((test_dir / kind).glob("*"))[:2] for kind in ("blowhole", "crack", "fray")}
    (tmp_path / "config.json").write_text(json.dumps({"data": {"root": str(shared_data), "category": "mtd"}}))
    with (tmp_path / "test_scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([str(path), 1] for paths in chosen.values() for path in paths)
        writer.writerow([str(sorted((test_dir / "good").glob("*"))[0]), 0])
    picked = _example_images(tmp_path, 4)
    assert [Path(image).parent.name for image, _ in picked] == ["blowhole", "crack", "fray", "blowhole"]
    assert [image for image, _ in picked][:3] == [str(paths[0]) for paths in chosen.values()]
    assert all(Path(mask).is_file() for _, mask in picked)


# --- the benchmark, end to end on weld -------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_reports_a_broken_cell_completes_the_others_and_resumes(shared_data: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the cells run in spawned processes
    settings = BenchmarkSettings(root=str(shared_data), image_size=64, epochs=1, batch_size=4, train_limit=8, test_limit=10)
    out = tmp_path / "bench"
    log: list[str] = []
    rows = run_benchmark(settings, ["rd"], ["nope", "weld"], out, log=log.append)

    broken, finished = rows
    assert "'nope'" in broken["error"] and "error" not in finished
    assert 0 <= finished["image_AUROC"] <= 1 and finished["infer_ms_per_image_batch1"] > 0
    assert finished["peak_memory_MB"] > 100 and finished["versions"]["torch"] == torch.__version__
    text = (out / "results.md").read_text()
    assert "| nope | failed |" in text and "| weld | " in text
    with (out / "results.csv").open() as handle:
        assert [row["category"] for row in csv.DictReader(handle)] == ["nope", "weld"]
    assert json.loads((out / "results.json").read_text())["cells"][1]["image_AUROC"] == finished["image_AUROC"]
    for name in ("roc_weld.png", "pro_weld.png", "examples_weld.png"):
        assert (out / "plots" / name).stat().st_size > 10_000

    checkpoint = out / "cells" / "weld" / "rd" / "model.ckpt"
    trained_at = checkpoint.stat().st_mtime_ns
    log.clear()
    rerun = run_benchmark(settings, ["rd"], ["nope", "weld"], out, plots=False, log=log.append)
    assert checkpoint.stat().st_mtime_ns == trained_at  # the finished cell was not retrained
    assert rerun[1] == finished
    assert any("weld / rd] finished earlier" in line for line in log)
    assert any("nope / rd] training" in line for line in log)  # the failed cell is retried

    with pytest.raises(DistilladError, match="epochs"):
        run_benchmark(BenchmarkSettings(**{**settings.__dict__, "epochs": 2}), ["rd"], ["weld"], out)


def test_benchmark_cli_rejects_an_option_for_a_model_it_does_not_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["distillad", "benchmark", "--models", "rd", "--root", str(tmp_path),
                                      "--categories", "x", "--option", "dmdd:msn=False", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "dmdd" in lines[0] and "--models" in lines[0]


def test_benchmark_cli_rejects_an_unknown_model_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["distillad", "benchmark", "--models", "rd,nonsense", "--root", str(tmp_path),
                                      "--categories", "x", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit):
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nonsense" in lines[0]
    assert not (tmp_path / "b" / "cells").exists()


def test_peer_layers_are_chosen_by_stride() -> None:
    from distillad.peers import feature_levels

    assert feature_levels("wide_resnet50_2", (4, 8, 16)) == {"layer1": 256, "layer2": 512, "layer3": 1024}  # PaDiM's
    assert list(feature_levels("tf_efficientnet_lite0", (8, 16))) == ["blocks.2", "blocks.4"]  # PatchCore's
    with pytest.raises(DistilladError, match="stride"):
        feature_levels("tf_efficientnet_lite0", (3,))


def test_peers_run_beside_the_models_with_the_same_data_and_metric_code(shared_data: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from distillad.metrics import auroc

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = BenchmarkSettings(root=str(shared_data), image_size=128, train_limit=12, test_limit=16)
    rows = run_benchmark(settings, ["patchcore", "padim"], ["weld"], tmp_path / "bench", plots=False,
                         log=lambda line: None)
    for row in rows:
        assert "error" not in row, row
        with (tmp_path / "bench" / "cells" / "weld" / row["model"] / "test_scores.csv").open() as handle:
            tested = list(csv.DictReader(handle))
        assert len(tested) == 16  # the same test subset the distillation models get
        scores = torch.tensor([float(r["score"]) for r in tested])
        assert row["image_AUROC"] == pytest.approx(auroc(scores, torch.tensor([int(r["label"]) for r in tested])))
        # measured: pixel AUROC 0.84 (PatchCore) and 0.84 (PaDiM) on this subset; image AUROC 0.69 and 0.56
        assert row["pixel_AUROC"] > 0.75 and row["image_AUROC"] > 0.5 and row["trainable_parameters_M"] == 0
    assert "| weld | " in (tmp_path / "bench" / "results.md").read_text()


def test_benchmark_cli_rejects_an_unknown_peer(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["distillad", "benchmark", "--peers", "patchcore,fastflow", "--root",
                                      str(tmp_path), "--categories", "x", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit):
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "fastflow" in lines[0]


def test_patchcore_peer_selects_anomalibs_coreset_from_its_matrix_vector_distances() -> None:
    from anomalib.models.components import KCenterGreedy

    from distillad.peers import _patchcore

    embedding = torch.randn(3000, 24, generator=torch.Generator().manual_seed(0))
    seed_everything(1, verbose=False)
    expected = KCenterGreedy(embedding, sampling_ratio=0.05).sample_coreset()
    peer = _patchcore("tf_efficientnet_lite0", training_patches=30)  # 30 patches: anomalib's ratio 0.1
    peer.model.embedding_store.extend(embedding.split(1000))
    seed_everything(1, verbose=False)  # the same projection and random first centre
    peer.model.subsample_embedding(0.05)
    assert peer.model.memory_bank.shape == (150, 24)
    assert torch.equal(peer.model.memory_bank, expected)
    assert not peer.model.embedding_store


def test_curves_thin_a_pixel_roc_with_more_points_than_float32_counts_exactly() -> None:
    from distillad.pipeline import _thinned

    points = 30_038_832  # DSKD's pixel ROC on mtd: in float32 its last index 30,038,831 rounded past the end
    x = torch.zeros(points)
    x[-1] = 1.0
    thinned = _thinned(x, x, 300)
    assert len(thinned["x"]) == 300
    assert thinned["x"][-1] == 1.0 and thinned["y"][0] == 0.0
