"""`cellwatch run`: replaying a simulated test split through the pipeline into the real InfluxDB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from services import InfluxServer
from test_influx_sink import create_db

from daemon.cli import main
from daemon.dataset import load_cycles
from flows.artifact import load_model
from flows.scorer import Scorer


@pytest.fixture
def setup(tiny_cell_and_model: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_cell_and_model


def test_replay_lands_one_score_per_cycle_in_influxdb(
    setup: tuple[Path, Path], influx: InfluxServer, tmp_path: Path
) -> None:
    cell, model = setup
    create_db(influx, "replay")
    config = {
        "sources": [
            {
                "type": "voraus_replay",
                "robot": "arm-1",
                "path": str(cell),
                "speed": 1e6,
                "start": "2026-01-01T00:00:00Z",
            }
        ],
        "model": {"path": str(model)},
        "scoring": {"batch": 8, "max_wait_ms": 5},
        "sinks": {
            "influxdb": {
                "url": influx.url,
                "database": "replay",
                "spool_dir": str(tmp_path / "spool"),
                "batch_points": 16,
            },
            "file": {"path": str(tmp_path / "scores.jsonl")},
        },
    }
    path = tmp_path / "cellwatch.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0

    loaded = load_model(model)
    data = load_cycles(cell, loaded.card.signals, rate_divider=10, want_train=False)
    scorer = Scorer(loaded, device="cpu")
    expected = scorer.score(np.stack([scorer.prepare_cycle(x) for x in data.test.signals]))

    fields = '"score", "normalized_score", "is_anomaly", "cycle", "robot", "model", "mode"'
    rows = influx.series(f'SELECT {fields} FROM "anomaly_score"', "replay")
    assert [r[4] for r in rows] == [int(s) for s in data.test.samples]  # one point per test cycle, in order
    raw = np.array([r[1] for r in rows])
    assert np.allclose(raw, expected.raw, rtol=1e-5)  # float32 sums differ slightly with batch composition
    assert np.allclose([r[2] for r in rows], loaded.card.threshold.normalize(raw), rtol=1e-9)
    assert [r[3] for r in rows] == list(raw > loaded.card.threshold.value)
    assert {(r[5], r[6], r[7]) for r in rows} == {("arm-1", "model", "cycle")}
    times = [r[0] for r in rows]
    assert times == sorted(times)
    assert len(set(times)) == len(times)

    # alerts (defaults: every over-threshold window opens one; hysteresis keeps consecutive ones together)
    alerts = influx.series(
        'SELECT "cycles", "peak_score", "event_time_ns", "end_ns", "top_signals" FROM "alert"', "replay"
    )
    flagged = [r[4] for r in rows if r[3]]
    assert flagged, "the tiny model flags some cycles"
    assert sorted(int(c) for a in alerts for c in a[1].split(",")) == flagged  # every flagged cycle, once
    point_time = {r[4]: r[0] for r in rows}
    for start, cycles, peak, event_ns, end_ns, top in alerts:
        first = int(cycles.split(",")[0])
        assert start == point_time[first]
        assert end_ns >= start
        assert peak >= 1.0  # normalized: the threshold is 1
        assert len(top.split(", ")) == 3
        # the localized event lies inside one of the alert's cycles (at most ~13 s before its end)
        assert start - 14e9 <= event_ns <= end_ns

    lines = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    # the file has every event of each alert's life: it fired first, and resolved last
    events: dict[str, list[str]] = {}
    for line in lines:
        if line["measurement"] == "alert":
            events.setdefault(line["alert_id"], []).append(line["state"])
    assert len(events) == len(alerts)
    assert all(states[0] == "firing" and states[-1] == "resolved" for states in events.values()), events
    assert [x["cycle"] for x in lines if x["measurement"] == "anomaly_score"] == [
        r[4] for r in rows
    ]  # the local file holds the same series

    # timestamps come from the data: replaying again rewrites the same points instead of adding new ones
    assert main(["run", "--config", str(path)]) == 0
    assert len(influx.series('SELECT "score" FROM "anomaly_score"', "replay")) == len(rows)


def test_replay_shortcut_writes_the_local_file_by_default(setup: tuple[Path, Path], tmp_path: Path) -> None:
    cell, model = setup
    out = tmp_path / "out.jsonl"
    assert main(["replay", str(cell), "--model", str(model), "--speed", "1e6", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    scores = [x for x in lines if x["measurement"] == "anomaly_score"]
    assert len(scores) == 36  # the test cycles of the 60-cycle plan
    assert {"score", "normalized_score", "threshold", "is_anomaly", "cycle", "robot"} <= set(scores[0])


def test_bad_config_fails_at_start_naming_field_and_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "sources": [{"type": "voraus_replay", "robot": "r", "path": "x", "speed": 0}],
                "model": {"path": "m"},
            }
        )
    )
    assert main(["run", "--config", str(path)]) == 2
    assert "sources[0].speed: Input should be greater than 0 (got 0)" in capsys.readouterr().err
