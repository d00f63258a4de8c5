"""`cellwatch publish` refuses what it cannot do with one clear line and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from services import free_port

from daemon.cli import main
from ingest.loadgen import Target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:80/t", "--to must be kafka://HOST:PORT/TOPIC or mqtt://HOST:PORT/TOPIC"),
        ("mqtt://127.0.0.1:1883/cell/signals", "needs exactly one '+' level for the robot id"),
        ("kafka://127.0.0.1:9092/", "needs a host and a topic"),
        ("kafka://127.0.0.1:port/t", "bad port"),
    ],
)
def test_bad_targets(url: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", str(tmp_path / "x.parquet"), "--to", url]) == 2
    assert message in capsys.readouterr().err


def test_missing_file_and_unreachable_brokers(
    tiny_cell_and_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cell, _ = tiny_cell_and_model
    assert main(["publish", str(tmp_path / "nope.parquet"), "--to", "kafka://127.0.0.1:9092/t"]) == 2
    assert "nope.parquet: no such file" in capsys.readouterr().err
    port = free_port()  # nothing listens there
    for url in (f"kafka://127.0.0.1:{port}/t", f"mqtt://127.0.0.1:{port}/cell/+/signals"):
        assert main(["publish", str(cell), "--to", url, "--speed", "inf"]) == 2
        err = capsys.readouterr().err
        assert f"cellwatch publish: error: {url}:" in err


def test_topics_per_robot() -> None:
    assert Target.parse("mqtt://h:1883/plant/+/signals").topic_for("r7") == "plant/r7/signals"
    assert Target.parse("kafka://h/signals").topic_for("r7") == "signals"
    assert Target.parse("kafka://h/signals").port == 9092
