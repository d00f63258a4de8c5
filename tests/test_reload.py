"""SIGHUP: the running daemon re-reads its config file and model. A bad config is refused and the
daemon goes on with the old one; a new model path takes effect on the next points; changes that need a
restart (sources) are said so in the log."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemons import Daemon
from services import wait_until

pytestmark = pytest.mark.slow


def points(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [p for p in map(json.loads, path.read_text().splitlines()) if p["measurement"] == "anomaly_score"]


def logged(daemon: Daemon, level: str, text: str) -> bool:
    for line in daemon.stderr.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") == level and text in record.get("msg", ""):
            return True
    return False


def test_sighup_reloads_config_and_model(tiny_cell_and_model: tuple[Path, Path], tmp_path: Path) -> None:
    cell, model = tiny_cell_and_model
    model_b = tmp_path / "model-b"
    shutil.copytree(model, model_b)
    scores = tmp_path / "scores.jsonl"
    base: dict[str, Any] = {
        "sources": [{"type": "voraus_replay", "robot": "r1", "path": str(cell), "speed": 15}],
        "model": {"path": str(model)},
        "sinks": {"file": {"path": str(scores)}},
    }
    daemon = Daemon(tmp_path, "d", base).start()
    config = yaml.safe_load(daemon.config_path.read_text())  # with the metrics port the helper chose

    def reload(**changes: Any) -> None:
        daemon.config_path.write_text(yaml.safe_dump({**config, **changes}))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)

    try:
        wait_until(lambda: len(points(scores)) >= 2, 60, "the first scores")
        assert {p["model"] for p in points(scores)} == {model.name}

        reload(alerts={"k": 5, "n": 1})  # invalid: refused, the daemon keeps running on the old config
        wait_until(lambda: logged(daemon, "ERROR", "alerts: k (5) must not exceed n (1)"), 30, "the refusal")
        scored = len(points(scores))
        wait_until(lambda: len(points(scores)) > scored, 60, "scoring to go on after the refused reload")
        assert daemon.alive

        reload(model={"path": str(model_b)})
        wait_until(lambda: points(scores)[-1]["model"] == "model-b", 60, "points from the reloaded model")
        assert logged(daemon, "INFO", "reloaded config and model")

        sources = [{**config["sources"][0], "speed": 30}]
        reload(model={"path": str(model_b)}, sources=sources)
        wait_until(
            lambda: logged(daemon, "WARNING", "changes to sources take effect on restart"), 30, "warning"
        )
        assert daemon.stop() == 0
    finally:
        daemon.kill()
