"""The command line on image data: `cellwatch synth --images`, then `train` and `evaluate` on an MVTec-layout
folder (AST), end to end through `daemon.cli.main` on a small generated brick data set and a tiny model.

The tiny configuration (64 px input, 2 coupling blocks, 16 channels, a few epochs) is far from the
defaults; the tests claim only what such a model must do: tell holes from good bricks better than chance
can (an exact permutation test, see `test_holes_are_detected_better_than_chance`), calibrate its threshold
through the same pipeline that scores at run time, and report numbers that an independent computation
from the per-image scores it writes reproduces.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.cli import main
from flows.ast.artifact import load_ast
from ingest.sim.images import write_image_dataset

EPOCHS = 4
TINY = [
    "--size", "64", "--blocks", "2", "--teacher-hidden", "16", "--student-width", "16",
    "--student-blocks", "1", "--lr", "1e-3", "--seed", "3", "--device", "cpu",
]  # fmt: skip
N_TRAIN, N_GOOD, N_DEFECT = 16, 10, 5
DEFECTS = ("hole", "scratch", "stain")


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Exit status and stdout of one command (module-scoped fixtures cannot use capsys)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(argv)
    return status, buffer.getvalue()


def flat(text: str) -> str:
    """Console text with rich's line wrapping undone (it wraps at 80 columns when not on a terminal)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "brick"
    write_image_dataset(
        root, seed=2, n_train=N_TRAIN, n_test_good=N_GOOD, n_per_defect=N_DEFECT, size=96, defects=DEFECTS
    )
    return root


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("model") / "ast"
    status, printed = run_cli(
        ["train", "--data", str(data), "--out", str(out), "--epochs", str(EPOCHS), *TINY]
    )
    assert status == 0
    return out, printed


@pytest.fixture(scope="module")
def evaluation(data: Path, trained: tuple[Path, str]) -> dict:
    model = trained[0]
    scores = model.parent / "scores.csv"
    argv = ["evaluate", "--data", str(data), "--model", str(model), "--json", "--baselines"]
    status, printed = run_cli([*argv, "--device", "cpu", "--scores", str(scores)])
    assert status == 0
    result = json.loads(printed)  # the whole of stdout is one JSON object
    with scores.open() as fh:
        result["rows"] = list(csv.DictReader(fh))
    return result


def test_the_model_card_records_how_it_was_trained(data: Path, trained: tuple[Path, str]) -> None:
    from flows.ast.artifact import data_fingerprint

    model, printed = trained[0], flat(trained[1])
    card = load_ast(model).card
    assert card.features.block == 10
    assert card.input_size == (64, 64)
    assert (card.architecture.coupling_blocks, card.architecture.teacher_hidden) == (2, 16)
    assert (card.scoring.reduce, card.scoring.sigma) == ("mean", 4.0)
    training = card.training
    assert training["counts"] == {"fit": 13, "calibration": 3, "rejected": {}}  # 20 % of 16, rounded
    assert len(training["losses"]["teacher"]) == len(training["losses"]["student"]) == EPOCHS
    assert training["losses"]["student"][-1] < training["losses"]["student"][0]  # it learned something
    files = sorted((data / "train" / "good").iterdir())
    assert training["data_fingerprint"] == data_fingerprint(files, root=data)
    assert card.threshold.target_fpr == 0.01
    assert "saved" in printed
    assert "threshold" in printed
    # 3 images cannot resolve 1 %: said so, and the threshold is their maximum
    assert "cannot resolve a 0.01 false-positive rate" in printed


def test_the_threshold_is_calibrated_on_held_out_images_by_the_run_time_scorer(
    data: Path, trained: tuple[Path, str]
) -> None:
    """The held-out images, scored by the ImageScorer the daemon runs, give the recorded threshold: with
    3 of them and a 1 % target it is their maximum, so none is above it and the median is the reference."""
    from flows.ast.scorer import ImageScorer
    from ingest.images import read_image

    loaded = load_ast(trained[0])
    card = loaded.card
    held_out = card.training["calibration_images"]
    assert len(held_out) == len(set(held_out)) == 3
    assert all(name.startswith("train/good/") for name in held_out)
    scores = ImageScorer(loaded, device="cpu").score([read_image(data / name) for name in held_out]).raw
    assert card.threshold.value == pytest.approx(scores.max(), rel=1e-4)
    assert card.threshold.reference == pytest.approx(np.median(scores), rel=1e-4)
    assert card.threshold.calibration_fpr == 0.0
    assert card.threshold.calibration_windows == 3


@pytest.fixture(scope="module")
def moved(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The data set copied elsewhere with a truncated PNG added to train/good, and a model trained on it."""
    copy = tmp_path_factory.mktemp("elsewhere") / "brick-copy"
    shutil.copytree(data, copy)
    good = copy / "train" / "good"
    whole = (good / "000.png").read_bytes()
    (good / "100.png").write_bytes(whole[: len(whole) // 2])  # truncated mid-stream
    out = copy.parent / "model"
    status, printed = run_cli(["train", "--data", str(copy), "--out", str(out), "--epochs", "1", *TINY])
    assert status == 0
    return copy, out, printed


def test_a_corrupt_training_image_is_rejected_counted_and_training_goes_on(
    moved: tuple[Path, Path, str],
) -> None:
    model, printed = moved[1], flat(moved[2])
    assert "rejected 1 (unreadable 1)" in printed
    card = load_ast(model).card
    counts = card.training["counts"]
    assert counts["rejected"] == {"unreadable": 1}
    assert counts["fit"] + counts["calibration"] == N_TRAIN
    assert "train/good/100.png" not in card.training["calibration_images"]


def test_the_fingerprint_follows_the_trained_images_not_the_folder(
    trained: tuple[Path, str], moved: tuple[Path, Path, str]
) -> None:
    """Moved elsewhere, with a file added that was rejected, the images trained on are the same: so is
    the fingerprint. One training image changed in place changes it."""
    from flows.ast.artifact import data_fingerprint

    copy, model, _ = moved
    original = load_ast(trained[0]).card.training["data_fingerprint"]
    assert load_ast(model).card.training["data_fingerprint"] == original
    edited = copy.parent / "edited"
    shutil.copytree(copy, edited)
    (edited / "train" / "good" / "100.png").unlink()
    files = sorted((edited / "train" / "good").iterdir())
    assert data_fingerprint(files, root=edited) == original
    pixels = np.asarray(Image.open(files[5])).copy()
    pixels[10:14, 10:14] = 255 - pixels[10:14, 10:14]
    Image.fromarray(pixels).save(files[5])
    assert data_fingerprint(files, root=edited) != original


def test_evaluate_json_has_every_metric_in_range_for_every_defect_folder(
    evaluation: dict, data: Path
) -> None:
    folders = {p.name for p in (data / "test").iterdir() if p.name != "good"}
    assert folders == set(DEFECTS)
    results = {"ast": evaluation, **evaluation["baselines"]}
    assert set(results) == {"ast", "teacher_nll", "feature_nn"}
    for name, result in results.items():
        for key in ("image_auroc", "pixel_auroc", "au_pro"):
            assert 0.0 <= result[key] <= 1.0, (name, key)
        assert set(result["per_defect"]) == folders, name
        assert all(0.0 <= v <= 1.0 for v in result["per_defect"].values())
        assert result["image_auroc"] == pytest.approx(np.mean(list(result["per_defect"].values())))
    assert evaluation["counts"] == dict.fromkeys(DEFECTS, N_DEFECT)
    assert evaluation["normals"] == N_GOOD
    assert set(evaluation["seconds"]) >= {"ast", "teacher_nll", "feature_nn"}


def mann_whitney(normal: list[float], anomalous: list[float]) -> tuple[float, float]:
    """AUROC (P(anomalous > normal) + ties / 2) and the exact one-sided p-value, from scipy."""
    from scipy.stats import mannwhitneyu

    result = mannwhitneyu(anomalous, normal, alternative="greater", method="exact")
    return float(result.statistic) / (len(anomalous) * len(normal)), float(result.pvalue)


def test_reported_image_aurocs_match_the_written_scores(evaluation: dict) -> None:
    rows = evaluation["rows"]
    assert len(rows) == N_GOOD + N_DEFECT * len(DEFECTS)
    results = {"AST": evaluation, "teacher_nll": evaluation["baselines"]["teacher_nll"]}
    results["feature_nn"] = evaluation["baselines"]["feature_nn"]
    for column, result in results.items():
        normal = [float(r[column]) for r in rows if r["label"] == "good"]
        for defect in DEFECTS:
            anomalous = [float(r[column]) for r in rows if r["label"] == defect]
            auroc, _ = mann_whitney(normal, anomalous)
            # the CSV holds 6 significant digits: ties it creates can move an AUROC by a hair
            assert result["per_defect"][defect] == pytest.approx(auroc, abs=0.02), (column, defect)


def test_holes_are_detected_better_than_chance(evaluation: dict) -> None:
    """5 hole images against 10 good ones: under "no separation" every ranking is equally likely, and an
    exact Mann-Whitney test says how unlikely the observed one is. Demand p < 0.005 (an AUROC of about
    0.9 or more) from the model, and localization well above chance from its maps."""
    rows = evaluation["rows"]
    normal = [float(r["AST"]) for r in rows if r["label"] == "good"]
    holes = [float(r["AST"]) for r in rows if r["label"] == "hole"]
    auroc, p = mann_whitney(normal, holes)
    assert p < 0.005, f"hole AUROC {auroc:.3f}, p = {p:.4f}"
    assert evaluation["pixel_auroc_per_defect"]["hole"] > 0.8


def test_the_threshold_behaviour_on_the_test_set_matches_the_scores(evaluation: dict) -> None:
    rows = evaluation["rows"]
    threshold = evaluation["threshold"]
    flagged = {r["path"]: float(r["AST"]) > threshold["value"] for r in rows}
    assert all(flagged[r["path"]] == (r["flagged"] == "1") for r in rows)
    good = [flagged[r["path"]] for r in rows if r["label"] == "good"]
    assert threshold["test_fpr"] == pytest.approx(np.mean(good))
    assert set(threshold["detection_rate"]) == set(DEFECTS)
    for defect in DEFECTS:
        rate = np.mean([flagged[r["path"]] for r in rows if r["label"] == defect])
        assert threshold["detection_rate"][defect] == pytest.approx(rate)


def test_evaluate_prints_a_table_with_the_baselines_side_by_side(
    data: Path, trained: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--data", str(data), "--model", str(trained[0]), "--baselines", "--device", "cpu"]
    assert main(argv) == 0
    out = flat(capsys.readouterr().out)
    for word in ("hole", "scratch", "stain", "mean", "pooled", "AST", "NLL", "NN", "PRO"):
        assert word in out
    assert "calibrated threshold" in out
    assert "test/good" in out


def test_bad_folders_and_wrong_kinds_are_clear_errors(
    data: Path, trained: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(trained[0])
    # not the layout: the missing folder is named
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m"), *TINY]) == 2
    assert "empty/train/good: missing" in flat(capsys.readouterr().err)
    # a flag of the other kind, given explicitly, is named
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--mode", "window"]) == 2
    assert "--mode applies to signal recordings only" in flat(capsys.readouterr().err)
    assert main(["evaluate", "--data", str(data), "--model", model, "--bf16"]) == 2
    assert "--bf16" in flat(capsys.readouterr().err)
    recording = tmp_path / "cell.parquet"
    recording.touch()
    assert main(["train", "--data", str(recording), "--out", str(tmp_path / "m"), "--block", "4"]) == 2
    assert "--block applies to image data only" in flat(capsys.readouterr().err)
    # a model of the other kind says which kind each is
    assert main(["evaluate", "--data", str(recording), "--model", model]) == 2
    err = flat(capsys.readouterr().err)
    assert "signal recording" in err
    assert "AST image model" in err
    signal_model = make_signal_model(tmp_path / "flow")
    assert main(["evaluate", "--data", str(data), "--model", str(signal_model)]) == 2
    err = flat(capsys.readouterr().err)
    assert "image folder" in err
    assert "MVT-Flow signal model" in err


def test_test_splits_that_cannot_be_evaluated_and_too_few_images_are_clear_errors(
    data: Path, trained: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(trained[0])
    only_train = tmp_path / "only-train"
    shutil.copytree(data / "train", only_train / "train")
    assert main(["evaluate", "--data", str(only_train), "--model", model, "--device", "cpu"]) == 2
    assert "only-train/test: missing" in flat(capsys.readouterr().err)
    shutil.copytree(data / "test" / "good", only_train / "test" / "good")
    assert main(["evaluate", "--data", str(only_train), "--model", model, "--device", "cpu"]) == 2
    assert "no defect folders" in flat(capsys.readouterr().err)
    (only_train / "test" / "hole").mkdir()
    assert main(["evaluate", "--data", str(only_train), "--model", model, "--device", "cpu"]) == 2
    assert "have no usable images" in flat(capsys.readouterr().err)
    few = tmp_path / "few"
    (few / "train" / "good").mkdir(parents=True)
    for name in ("000.png", "001.png", "002.png"):
        shutil.copy(data / "train" / "good" / name, few / "train" / "good" / name)
    (few / "train" / "good" / "003.png").write_bytes(b"")
    assert main(["train", "--data", str(few), "--out", str(tmp_path / "m"), *TINY]) == 2
    err = flat(capsys.readouterr().err)
    assert "has 3 usable images" in err
    assert "empty 1" in err
    assert "need at least 4" in err


def make_signal_model(path: Path) -> Path:
    """A small MVT-Flow artifact, as `cellwatch train` writes for a parquet file."""
    from flows.artifact import ModelCard, Threshold, save_model
    from flows.mvtflow import MVTFlow, MVTFlowConfig
    from flows.preprocess import Standardizer

    flow = MVTFlow(MVTFlowConfig(signals=2, time_steps=16)).eval()
    card = ModelCard(
        signals=("a", "b"),
        rate_hz=100.0,
        mode="cycle",
        time_steps=16,
        window=None,
        hop=None,
        scaler=Standardizer(mean=np.zeros(2), std=np.ones(2)),
        threshold=Threshold(
            value=1.0, reference=0.0, target_fpr=0.01, calibration_fpr=0.0, calibration_windows=5
        ),
        architecture=flow.config,
        training={},
    )
    save_model(path, flow, card)
    return path


def test_synth_images_writes_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ingest.images import MvtecDataset

    out = tmp_path / "gravel"
    argv = ["synth", "--images", "--out", str(out), "--category", "gravel", "--size", "48"]
    assert main([*argv, "--train", "3", "--test-good", "2", "--per-defect", "1", "--seed", "5"]) == 0
    printed = flat(capsys.readouterr().out)
    assert "train/good 3" in printed
    assert "test/good 2" in printed
    assert "test/hole 1" in printed
    dataset = MvtecDataset(out)
    train = list(dataset.train())
    test = list(dataset.test())
    assert len(train) == 3
    assert train[0].image.shape == (48, 48, 3)
    assert dataset.defect_types == sorted(["scratch", "hole", "stain", "missing", "color_shift"])
    assert [item.label for item in test].count("good") == 2
    masks = [item.mask for item in test if item.label != "good"]
    assert len(masks) == 5
    assert all(mask is not None and mask.any() for mask in masks)
    assert not dataset.rejections
    # a folder that is not empty is refused (old files would join the new set); signal flags are named
    assert main(["synth", "--images", "--out", str(out)]) == 2
    assert "not an empty directory" in flat(capsys.readouterr().err)
    assert main(["synth", "--images", "--out", str(tmp_path / "new"), "--rate", "500"]) == 2
    assert "--rate applies to signal recordings only" in flat(capsys.readouterr().err)
