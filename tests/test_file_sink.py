"""The JSON-lines file sink: strict JSON whatever the values, fsync before acks, rotation by size."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, parse_config
from daemon.pipeline import FileSink as FromPipeline
from daemon.sinks.file import FileSink
from daemon.sinks.lineprotocol import Point

T0 = 1_700_000_000_000_000_000


def strict(line: str) -> dict[str, Any]:
    """json.loads as a strict parser (Go, jq, JSON.parse in a browser): NaN/Infinity are errors."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return dict(json.loads(line, parse_constant=refuse))


def score(i: int, value: float = 0.5) -> Point:
    return Point("anomaly_score", {"score": value, "cycle": i}, T0 + i, {"robot": "r1"})


def test_output_is_strict_json_whatever_the_values(tmp_path: Path) -> None:
    """Before: an infinite score was written as `Infinity`, which no strict JSON reader accepts."""
    path = tmp_path / "scores.jsonl"
    pts = [
        score(0, float("inf")),
        score(1, float("nan")),
        score(2, -float("inf")),
        score(3, 1e308),
        Point("alert", {"peak_score": float("inf"), "text": "r1: anomaly"}, T0, {"robot": "r1"}),
    ]

    async def run() -> FileSink:
        sink = FileSink(path)
        await sink.write(pts)
        await sink.close()
        return sink

    sink = asyncio.run(run())
    rows = [strict(line) for line in path.read_text().splitlines()]
    assert [r["score"] for r in rows[:4]] == [None, None, None, 1e308]  # the point is kept, the value null
    assert [r.get("nonfinite_fields") for r in rows] == [
        ["score"],
        ["score"],
        ["score"],
        None,
        ["peak_score"],
    ]
    assert rows[0] == {
        "measurement": "anomaly_score",
        "time_ns": T0,
        "robot": "r1",
        "score": None,
        "cycle": 0,
        "nonfinite_fields": ["score"],
    }
    assert rows[4]["text"] == "r1: anomaly"
    assert ("cellwatch_file_nonfinite_fields_total", "counter", {"sink": "file"}, 4) in sink.metric_samples()


def test_flush_fsyncs_what_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline releases acks after `flush`: by then the lines must be on disk, not in a cache."""
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "scores.jsonl"

    async def run() -> None:
        sink = FileSink(path)
        await sink.write([score(i) for i in range(3)])
        assert synced == []  # a write alone hands the lines to the OS only
        assert path.read_text().count("\n") == 3  # ... where a crash of the process cannot lose them
        await sink.flush()
        assert synced == [path.stat().st_size]  # the whole file, as it stood
        await sink.close()

    asyncio.run(run())


def test_rotates_by_size_and_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "scores.jsonl"
    line_bytes = len(
        json.dumps({"measurement": "anomaly_score", "time_ns": T0, "robot": "r1", "score": 0.5, "cycle": 0})
    )
    max_bytes = 10 * (line_bytes + 5)  # about ten lines a file

    async def run() -> FileSink:
        sink = FileSink(path, max_bytes=max_bytes, keep=2)
        for i in range(0, 100, 7):  # writes of several lines: rotation falls inside them
            await sink.write([score(j) for j in range(i, min(i + 7, 100))])
        await sink.close()
        return sink

    sink = asyncio.run(run())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["scores.jsonl", "scores.jsonl.1", "scores.jsonl.2"]  # older ones removed
    cycles: list[int] = []
    for name in ("scores.jsonl.2", "scores.jsonl.1", "scores.jsonl"):
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= max_bytes
        assert text.endswith("\n")  # a line is never split across two files
        cycles += [strict(line)["cycle"] for line in text.splitlines()]
    assert cycles == list(range(100 - len(cycles), 100))  # the newest lines, in order, none missing
    assert len(cycles) > 20
    samples = {name: value for name, _, _, value in sink.metric_samples()}
    assert samples["cellwatch_file_sink_rotations_total"] >= 9
    assert samples["cellwatch_file_sink_bytes_total"] == sum(
        len(
            json.dumps(
                {"measurement": "anomaly_score", "time_ns": T0 + i, "robot": "r1", "score": 0.5, "cycle": i}
            )
        )
        + 1
        for i in range(100)
    )


def test_a_restart_appends_and_counts_what_the_file_already_holds(tmp_path: Path) -> None:
    path = tmp_path / "scores.jsonl"
    path.write_text('{"earlier": 1}\n' * 10)
    before = path.stat().st_size

    async def run() -> None:
        sink = FileSink(path, max_bytes=before + 10, keep=1)
        await sink.write([score(0)])  # would pass the bound: the old content is rotated first
        await sink.close()

    asyncio.run(run())
    assert (tmp_path / "scores.jsonl.1").read_text() == '{"earlier": 1}\n' * 10
    assert strict(path.read_text())["cycle"] == 0


def test_config_and_the_old_import_path(tmp_path: Path) -> None:
    config = parse_config(
        {"sources": [{"type": "voraus_replay", "robot": "r", "path": "x.parquet"}], "model": {"path": "m"}},
        origin="test",
    )
    assert config.sinks.file is not None
    assert (config.sinks.file.max_mb, config.sinks.file.keep) == (100, 5)  # the embedded default
    with pytest.raises(ConfigError, match="keep"):
        parse_config(
            {
                "sources": [{"type": "voraus_replay", "robot": "r", "path": "x.parquet"}],
                "model": {"path": "m"},
                "sinks": {"file": {"path": "s.jsonl", "keep": 0}},
            },
            origin="test",
        )
    assert FromPipeline is FileSink  # `from daemon.pipeline import FileSink` still works
