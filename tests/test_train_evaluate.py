"""End to end on a small simulated cell: train a tiny model (the default fused detector, and MVT-Flow
alone by name), evaluate it by the paper's protocol, score windows, and check reproducibility and bf16
against fp32.

The tiny configuration (10 Hz, 25 epochs, ~60 training cycles) is far from the paper's; the test only
claims what such a model must do: separate anomalies from normals better than chance by a margin that
chance cannot produce (see `test_scores_separate_anomalies_from_normals`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.cli import main
from flows.artifact import load_model
from flows.metrics import roc_auc
from flows.scorer import Scorer
from ingest.sim.dataset import write_recording
from ingest.sim.scenarios import plan_recording

TINY = ["--rate-divider", "10", "--epochs", "25", "--milestones", "20", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cell") / "cell.parquet"
    write_recording(path, plan_recording(cycles=150, seed=4), seed=4)
    return path


@pytest.fixture(scope="module")
def model(cell: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "flow"
    assert main(["train", "--data", str(cell), "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def evaluation(cell: Path, model: Path) -> dict:
    scores = model.parent / "scores.csv"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert (
            main(
                [
                    "evaluate",
                    "--data",
                    str(cell),
                    "--model",
                    str(model),
                    "--json",
                    "--baselines",
                    "--scores",
                    str(scores),
                ]
            )
            == 0
        )
    result = json.loads(buffer.getvalue())
    result["scores_csv"] = scores
    return result


def test_model_records_how_it_was_trained(model: Path, cell: Path) -> None:
    loaded = load_model(model)
    card = loaded.card
    assert card.mode == "cycle"
    assert card.rate_hz == 10.0
    assert len(card.signals) == 130
    assert card.training["rate_divider"] == 10
    assert card.training["cycles_fit"] + card.training["cycles_calibration"] == 67  # PRE_A cycles of the plan
    assert len(card.training["loss"]) == 25
    assert card.training["loss"][-1] < card.training["loss"][0]  # it learned something
    assert len(card.training["data_fingerprint"]) == 64


def test_scaler_standardizes_the_fit_cycles_and_nothing_else(model: Path, cell: Path) -> None:
    """The scaler is fitted on the training cycles that are not held out for calibration: on exactly
    those, every varying signal comes out with mean 0 and std 1 (a scaler that had also seen the
    calibration or test cycles, anomalies included, would not give that), and a signal that never
    varies maps to 0 (std 1, not a division by zero)."""
    from daemon.dataset import load_cycles

    card = load_model(model).card
    data = load_cycles(cell, card.signals, rate_divider=10, want_test=False)
    held_out = set(card.training["calibration_samples"])
    fit = [
        x for x, sample in zip(data.train.signals, data.train.samples, strict=True) if sample not in held_out
    ]
    assert len(fit) == card.training["cycles_fit"]
    raw = np.concatenate(fit).astype(np.float64)
    z = np.concatenate([card.scaler.transform(x) for x in fit]).astype(np.float64)
    varying = raw.std(axis=0) > 1e-9 * np.maximum(np.abs(raw.mean(axis=0)), 1.0)
    assert varying.sum() > 100  # most of the 130 signals vary
    np.testing.assert_allclose(z[:, varying].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, varying].std(axis=0), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(card.scaler.std[~varying], 1.0)
    np.testing.assert_allclose(z[:, ~varying], 0.0, atol=1e-5)
    # and with the held-out cycles included the same scaler is off: they were not part of the fit
    everything = np.concatenate([card.scaler.transform(x) for x in data.train.signals]).astype(np.float64)
    assert np.abs(everything[:, varying].mean(axis=0)).max() > 1e-3


def test_scores_separate_anomalies_from_normals(evaluation: dict) -> None:
    """Pooled over all anomalous test cycles, AUROC under "no separation" is ~N(0.5, σ²) with
    σ² = (n_a + n_n + 1) / (12 n_a n_n) (Mann-Whitney). Demand 0.5 + 4σ (one-sided p < 4e-5): chance
    cannot pass it, a model that learned the normal cycle passes easily."""
    import csv

    with evaluation["scores_csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    normal = [float(r["fusion"]) for r in rows if r["anomaly"] == "0"]
    anomalous = [float(r["fusion"]) for r in rows if r["anomaly"] == "1"]
    n_n, n_a = len(normal), len(anomalous)
    sigma = math.sqrt((n_a + n_n + 1) / (12 * n_a * n_n))
    pooled = roc_auc(normal, anomalous)
    assert pooled > 0.5 + 4 * sigma, f"pooled AUROC {pooled:.3f}, needs > {0.5 + 4 * sigma:.3f}"
    # the paper's headline number is there too, for every category in the set
    assert set(evaluation["per_category"]) == set(evaluation["counts"])
    assert len(evaluation["per_category"]) == 12
    assert evaluation["mean"] == pytest.approx(np.mean(list(evaluation["per_category"].values())))
    assert evaluation["mean"] > 0.6


def mann_whitney_auroc(normal: list[float], anomalous: list[float]) -> float:
    """AUROC as P(anomalous > normal) + P(tie) / 2, computed independently of flows.metrics."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(anomalous, normal, alternative="two-sided").statistic
    return float(u) / (len(anomalous) * len(normal))


def auroc_per_category(rows: list[dict[str, str]], column: str) -> dict[str, float]:
    normal = [float(r[column]) for r in rows if r["anomaly"] == "0"]
    out = {}
    for category in {r["category"] for r in rows if r["anomaly"] == "1"}:
        anomalous = [float(r[column]) for r in rows if r["anomaly"] == "1" and r["category"] == category]
        out[category] = mann_whitney_auroc(normal, anomalous)
    return out


def test_reported_aurocs_match_an_independent_computation(evaluation: dict) -> None:
    """The table's numbers, for the fused model, each of its components and both baselines, are the
    Mann-Whitney U statistics of the per-cycle scores written beside them (scipy, not flows.metrics),
    and their mean is unweighted."""
    import csv

    with evaluation["scores_csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert evaluation["detector"] == "fusion"
    results = {"fusion": evaluation, **evaluation["components"], **evaluation["baselines"]}
    assert set(results) == {"fusion", "MVT-Flow", "linres", "PCA-res", "1-NN", "PCA"}
    for name, result in results.items():
        expected = auroc_per_category(rows, name)
        assert set(result["per_category"]) == set(expected) == set(evaluation["counts"])
        for category, value in expected.items():
            # the CSV holds 6 significant digits: ties it creates can move an AUROC by a hair
            assert result["per_category"][category] == pytest.approx(value, abs=2e-3), (name, category)
        assert result["mean"] == pytest.approx(np.mean(list(result["per_category"].values())))


def test_the_fused_score_is_the_most_anomalous_of_its_normalized_parts(cell: Path, model: Path) -> None:
    """A fusion model's score is the highest of its components, each in normal spreads from its normal
    median; the NLL part is exactly the flow's own score, and the threshold sits on the fused scale."""
    from daemon.dataset import load_cycles

    loaded = load_model(model)
    assert loaded.card.detector == "fusion"
    assert loaded.fusion is not None
    assert set(loaded.fusion.config.components) == {"nll", "linres", "pca"}
    data = load_cycles(cell, loaded.card.signals, rate_divider=10, want_train=False)
    scorer = Scorer(loaded, device="cpu")
    x = np.stack([scorer.prepare_cycle(c) for c in data.test.signals[:12]])
    result = scorer.score(x)
    assert result.components is not None
    parts = np.stack(list(result.components.values()))
    np.testing.assert_allclose(result.raw, parts.max(axis=0), rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        nll = loaded.flow.score(torch.from_numpy(x)).double().numpy()
    norm = loaded.fusion.normalizers["nll"]
    np.testing.assert_allclose(
        result.components["nll"], (nll - norm.center) / norm.scale, rtol=1e-5, atol=1e-5
    )
    assert np.array_equal(result.is_anomaly, result.raw > loaded.card.threshold.value)


def test_mvt_flow_stays_available_by_name(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--detector mvt-flow trains the published model alone: no linear parts, its score is the NLL."""
    out = tmp_path / "flow-only"
    args = ["--rate-divider", "10", "--epochs", "2", "--device", "cpu", "--detector", "mvt-flow"]
    assert main(["train", "--data", str(cell), "--out", str(out), *args]) == 0
    loaded = load_model(out)
    assert loaded.card.detector == "mvt-flow"
    assert loaded.fusion is None
    assert not (out / "detector.safetensors").exists()
    scorer = Scorer(loaded, device="cpu")
    x = torch.randn(3, 130, loaded.card.time_steps)
    result = scorer.score(x.numpy())
    assert result.components is None
    with torch.no_grad():
        np.testing.assert_allclose(result.raw, loaded.flow.score(x).double().numpy(), rtol=1e-6)
    capsys.readouterr()
    assert main(["evaluate", "--data", str(cell), "--model", str(out), "--json"]) == 0
    result_json = json.loads(capsys.readouterr().out)
    assert result_json["detector"] == "mvt-flow"
    assert "components" not in result_json


def test_training_is_reproducible_from_a_seed(cell: Path, tmp_path: Path) -> None:
    args = ["--rate-divider", "10", "--epochs", "2", "--seed", "9", "--device", "cpu"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--data", str(cell), "--out", str(a), *args]) == 0
    assert main(["train", "--data", str(cell), "--out", str(b), *args]) == 0
    wa, wb = load_model(a).flow.state_dict(), load_model(b).flow.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_scores_agree_with_fp32(cell: Path, model: Path) -> None:
    from daemon.dataset import load_cycles

    loaded = load_model(model)
    data = load_cycles(cell, loaded.card.signals, rate_divider=10, want_train=False)
    fp32, bf16 = Scorer(loaded, device="cpu"), Scorer(load_model(model), device="cpu", bf16=True)
    x = np.stack([fp32.prepare_cycle(c) for c in data.test.signals])
    a, b = fp32.score(x).raw, bf16.score(x).raw
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    assert np.corrcoef(rank_a, rank_b)[0, 1] > 0.95  # bf16 keeps the ranking (what AUROC sees)
    anomaly = np.asarray(data.test.anomaly)
    assert abs(roc_auc(a[~anomaly], a[anomaly]) - roc_auc(b[~anomaly], b[anomaly])) < 0.05


def test_window_mode_scores_windows_of_a_stream(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "windows"
    args = ["--rate-divider", "10", "--epochs", "4", "--mode", "window", "--window", "32", "--hop", "16"]
    assert main(["train", "--data", str(cell), "--out", str(out), *args]) == 0
    card = load_model(out).card
    assert (card.mode, card.time_steps, card.window, card.hop) == ("window", 32, 32, 16)
    capsys.readouterr()
    scores = tmp_path / "window-scores.csv"
    assert (
        main(["evaluate", "--data", str(cell), "--model", str(out), "--json", "--scores", str(scores)]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert set(result["counts"]) == set(result["per_category"])
    import csv

    with scores.open() as fh:
        rows = list(csv.DictReader(fh))
    # a cycle's score is its worst window: recomputed here window by window from the file
    from daemon.dataset import load_cycles
    from flows.preprocess import window_starts

    model = load_model(out)
    scorer = Scorer(model, device="cpu")
    data = load_cycles(cell, model.card.signals, rate_divider=10, want_train=False)
    for i in (0, len(rows) // 2, len(rows) - 1):
        x = data.test.signals[i]
        windows = np.stack([scorer.prepare_cycle(x[s : s + 32]) for s in window_starts(len(x), 32, 16)])
        assert int(rows[i]["sample"]) == data.test.samples[i]
        assert float(rows[i]["fusion"]) == pytest.approx(float(scorer.score(windows).raw.max()), rel=1e-4)
    # and even a briefly trained window model tells anomalies from normals better than chance can
    normal = [float(r["fusion"]) for r in rows if r["anomaly"] == "0"]
    anomalous = [float(r["fusion"]) for r in rows if r["anomaly"] == "1"]
    sigma = math.sqrt((len(normal) + len(anomalous) + 1) / (12 * len(normal) * len(anomalous)))
    pooled = mann_whitney_auroc(normal, anomalous)
    assert pooled > 0.5 + 4 * sigma, f"pooled AUROC {pooled:.3f}, needs > {0.5 + 4 * sigma:.3f}"


def test_bad_arguments_are_clear_errors(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--data", str(cell), "--out", str(tmp_path / "m"), "--fpr", "2"]) == 2
    assert "--fpr is out of range: 2" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(cell), "--model", str(tmp_path / "none")]) == 2
    assert "model.json is missing" in capsys.readouterr().err


def test_demo_runs_the_main_job_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main job, both halves, shrunk: simulate, inspect, train, evaluate with baselines, then
    the same on generated images (tests/test_image_report.py checks the image half's outputs)."""
    work = tmp_path / "demo"
    tiny_images = [
        "--image-size",
        "64",
        "--image-epochs",
        "1",
        "--image-counts",
        "8,3,1",
        "--image-width",
        "8",
    ]
    assert main(["demo", "--dir", str(work), "--scale", "0.03", "--epochs", "2", *tiny_images]) == 0
    out = capsys.readouterr().out
    assert (work / "image-model" / "model.json").is_file()
    assert (work / "image-report.html").is_file()
    assert (work / "cell.parquet").is_file()
    assert (work / "model" / "model.json").is_file()
    assert "AUROC % per category" in out
    assert "1-NN" in out
    assert "PCA" in out
