"""`cellwatch report`: one self-contained HTML file whose figures are real PNGs, whose AUROC table agrees
with the metrics computed independently, and whose alert table lists the daemon's alerts."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from daemon.cli import main
from daemon.commands.evaluate import cycle_scores
from daemon.dataset import load_cycles
from daemon.report import AlertRecord, alert_cycles, read_alerts, top_anomalous
from flows.artifact import load_model
from flows.metrics import per_category_auroc
from flows.scorer import Scorer

PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def alerts_file(tiny_cell_and_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The daemon's own JSON-lines output for the tiny cell (replayed as fast as it goes)."""
    cell, model = tiny_cell_and_model
    out = tmp_path_factory.mktemp("replay") / "scores.jsonl"
    argv = ["replay", str(cell), "--model", str(model), "--speed", "inf", "--robot", "r1", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def report(tiny_cell_and_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    cell, model = tiny_cell_and_model
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    assert main(["report", "--data", str(cell), "--model", str(model), "--out", str(out)]) == 0
    assert out.is_file()
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def alert_report(
    tiny_cell_and_model: tuple[Path, Path], alerts_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    cell, model = tiny_cell_and_model
    out = tmp_path_factory.mktemp("report") / "alerts.html"
    argv = ["report", "--data", str(cell), "--model", str(model), "--alerts", str(alerts_file)]
    assert main([*argv, "--out", str(out), "--top", "3"]) == 0
    return out.read_text(encoding="utf-8")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_is_one_self_contained_file_with_valid_pngs(report: str) -> None:
    images = PNG_URI.findall(report)
    assert len(images) == 2 + 5  # ROC, histograms, and the default top 5 temporal analyses
    assert report.count("data:image/png;base64,") == len(images)
    for encoded in images:
        data = base64.b64decode(encoded, validate=True)
        width, height = png_size(data)
        assert 300 < width < 2000
        assert 300 < height < 2000
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels.shape[:2] == (height, width)
        # data is drawn, not only axes, text and a legend: curves, bars and bands are in colour (axes
        # and text are grey), and they cover more than a legend's few swatches would
        rgb = pixels[..., :3]
        coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
        # counted left of the legend (which sits in the right third of the ROC figure): a good model's ROC
        # hugs the axes and its curves overlap (about 0.5-1.1 % there for the fused default), axes, grid
        # and the chance line are grey or black (0 %)
        plot_area = coloured[:, : int(0.7 * width)]
        assert plot_area.mean() > 0.0025, f"{plot_area.mean():.2%} of the plot area's pixels in colour"
    # nothing outside the file: no scripts, stylesheets or remote images
    assert "<script" not in report
    assert "<link" not in report
    assert not re.search(r'src="(?!data:)', report)
    assert len(report.encode()) < 1_500_000


def test_header_names_model_data_cycles_and_threshold(
    report: str, tiny_cell_and_model: tuple[Path, Path]
) -> None:
    cell, model = tiny_cell_and_model
    card = load_model(model).card
    assert f"<th>model</th><td>{model.name}</td>" in report
    assert f"<td>{cell}</td>" in report
    assert "<th>test cycles</th><td>36 (12 normal, 24 anomalous)</td>" in report
    assert f"{card.threshold.value:.6g}" in report
    assert re.search(r"<th>created</th><td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</td>", report)


def test_auroc_table_matches_independent_metrics(report: str, tiny_cell_and_model: tuple[Path, Path]) -> None:
    cell, model_dir = tiny_cell_and_model
    model = load_model(model_dir)
    data = load_cycles(cell, model.card.signals, rate_divider=10, want_train=False)
    test = data.test
    scores = cycle_scores(Scorer(model, device="cpu"), test.signals)
    expected = per_category_auroc(scores, test.categories, test.anomaly)

    rows = re.findall(
        r'<tr data-category="([^"]+)"><td>[^<]*</td><td class="num">(\d+)</td>'
        r'<td class="num" data-auroc="([^"]+)">([\d.]+)</td>',
        report,
    )
    present = {c for c, a in zip(test.categories, test.anomaly, strict=True) if a}
    assert len(present) == 12
    assert {r[0] for r in rows} == present
    for category, count, value, shown in rows:
        assert int(count) == expected.counts[category]
        assert float(value) == pytest.approx(expected.per_category[category], abs=1e-9)
        assert shown == f"{100 * expected.per_category[category]:.1f}"
    mean = re.search(
        r'<tr class="mean"><td>mean</td><td class="num">\d+</td><td class="num" data-auroc="([^"]+)"', report
    )
    assert mean is not None
    assert float(mean.group(1)) == pytest.approx(expected.mean, abs=1e-9)
    # without --alerts the temporal analyses are the highest-scoring anomalous cycles, best first
    top = [test.samples[i] for i in top_anomalous(scores, test.anomaly, 5)]
    assert [int(c) for c in re.findall(r'<div class="case" data-cycle="(\d+)">', report)] == top
    assert "<h2>3. Temporal analysis</h2>" in report
    assert "Alerts</h2>" not in report


def test_alert_table_lists_the_daemons_alerts(alert_report: str, alerts_file: Path) -> None:
    lines = [json.loads(line) for line in alerts_file.read_text().splitlines()]
    events = [line for line in lines if line["measurement"] == "alert"]
    latest: dict[str, dict[str, Any]] = {}
    for event in events:  # firing, updates, resolved: one row per alert, its latest state
        latest[event["alert_id"]] = event
    alerts = list(latest.values())
    assert alerts, "the tiny model raised no alert; the test needs some"
    assert len(events) > len(alerts)  # each alert was written when it fired and when it resolved
    assert {a["state"] for a in alerts} == {"resolved"}
    rows = re.findall(r'<tr class="alert" data-peak-cycle="(\d+)">(.*?)</tr>', alert_report)
    assert [int(cycle) for cycle, _ in rows] == [a["peak_cycle"] for a in alerts]
    for (_, row), alert in zip(rows, alerts, strict=True):
        assert f"<td>{alert['robot']}</td>" in row
        assert f"{alert['peak_score']:.2f}" in row
        assert alert["top_signals"] in row
        assert "not in this file" not in row  # every peak cycle is a test cycle of the replayed file
    # the temporal analyses are the peak cycles of the highest-peaking alerts, one per cycle
    by_peak = sorted(alerts, key=lambda a: -a["peak_score"])
    expected = list(dict.fromkeys(a["peak_cycle"] for a in by_peak))[:3]
    shown = [int(c) for c in re.findall(r'<div class="case" data-cycle="(\d+)">', alert_report)]
    assert shown == expected
    assert len(PNG_URI.findall(alert_report)) == 2 + len(expected)
    assert "<h2>3. Alerts</h2>" in alert_report
    assert "<h2>4. Temporal analysis</h2>" in alert_report


def test_missing_data_file_is_a_usage_error(
    tiny_cell_and_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, model = tiny_cell_and_model
    missing = tmp_path / "no-such-cell.parquet"
    out = tmp_path / "r.html"
    assert main(["report", "--data", str(missing), "--model", str(model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cellwatch report: error:" in err
    assert str(missing) in err
    assert not out.exists()


def test_missing_model_and_alerts_files_are_usage_errors(
    tiny_cell_and_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cell, model = tiny_cell_and_model
    assert main(["report", "--data", str(cell), "--model", str(tmp_path / "nomodel")]) == 2
    assert "model.json is missing" in capsys.readouterr().err
    missing = tmp_path / "scores.jsonl"
    argv = ["report", "--data", str(cell), "--model", str(model), "--alerts", str(missing)]
    assert main(argv) == 2
    assert f"alerts file {missing} does not exist" in capsys.readouterr().err
    missing.write_text('{"measurement": "alert", "time_ns": 1, "peak_score": 2.0}\n')
    assert main([*argv, "--out", str(tmp_path / "r.html")]) == 2
    assert f"{missing}:1: alert without 'peak_cycle'" in capsys.readouterr().err


def test_model_that_does_not_fit_the_data_is_a_usage_error(
    tiny_cell_and_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cell, model = tiny_cell_and_model
    other = tmp_path / "model"
    shutil.copytree(model, other)
    meta = json.loads((other / "model.json").read_text())
    meta["training"]["rate_divider"] = 5  # the data is then read at 20 Hz, the model expects 10 Hz
    (other / "model.json").write_text(json.dumps(meta))
    assert (
        main(["report", "--data", str(cell), "--model", str(other), "--out", str(tmp_path / "r.html")]) == 2
    )
    err = capsys.readouterr().err
    assert f"{other} does not fit {cell}" in err


def test_alert_cycles_rank_by_peak_and_skip_unknown_and_repeated_cycles() -> None:
    alerts = [
        AlertRecord(robot="a", start_ns=0, peak_cycle=7, peak_score=2.0),
        AlertRecord(robot="a", start_ns=1, peak_cycle=99, peak_score=9.0),  # not in the data
        AlertRecord(robot="a", start_ns=2, peak_cycle=5, peak_score=3.0),
        AlertRecord(robot="b", start_ns=3, peak_cycle=5, peak_score=2.5),  # same cycle again
        AlertRecord(robot="b", start_ns=4, peak_cycle=6, peak_score=1.5),
    ]
    samples = [5, 6, 7]
    assert alert_cycles(alerts, samples, 5) == [(3, 0), (1, 2), (5, 1)]
    assert alert_cycles(alerts, samples, 1) == [(3, 0)]
    assert top_anomalous(np.array([3.0, 9.0, 5.0, 7.0]), [True, False, True, True], 2) == [3, 2]


def test_read_alerts_keeps_alerts_only_and_names_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "scores.jsonl"
    path.write_text(
        '{"measurement": "anomaly_score", "time_ns": 5, "score": 1.0, "cycle": 3}\n'
        "\n"
        '{"measurement": "alert", "time_ns": 7, "robot": "r", "peak_cycle": 3, "peak_score": 1.5, '
        '"windows": 2, "top_signals": "a 50%"}\n'
    )
    (alert,) = read_alerts(path)
    assert alert == AlertRecord(
        robot="r", start_ns=7, peak_cycle=3, peak_score=1.5, windows=2, top_signals="a 50%"
    )
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"scores.jsonl:4: not a JSON line"):
        read_alerts(path)
