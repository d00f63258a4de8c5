"""SIGHUP: the running daemon re-reads its config file and model. A bad config is refused and the
daemon goes on with the old one; a new model takes effect atomically (scaler, weights, threshold, mode
and tag together) from one point on; changes that need a restart (sources) are said so in the log."""

from __future__ import annotations

import itertools
import json
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


@pytest.fixture(scope="module")
def other_model(tiny_cell_and_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuinely different second model: window mode, another rate (5 Hz, not 10), another
    architecture and seed, and so another threshold."""
    from daemon.cli import main

    cell, _ = tiny_cell_and_model
    out = tmp_path_factory.mktemp("reload") / "model-b"
    argv = ["train", "--data", str(cell), "--out", str(out), "--rate-divider", "20", "--mode", "window"]
    argv += ["--window", "40", "--hop", "20", "--epochs", "1", "--blocks", "2", "--seed", "3", "--fpr", "0.2"]
    assert main(argv) == 0
    return out


def test_sighup_reloads_config_and_model(
    tiny_cell_and_model: tuple[Path, Path], other_model: Path, tmp_path: Path
) -> None:
    from flows.artifact import load_model

    cell, model = tiny_cell_and_model
    model_b = other_model
    card_a, card_b = load_model(model).card, load_model(model_b).card
    assert (card_a.mode, card_b.mode) == ("cycle", "window")
    assert card_a.threshold.value != card_b.threshold.value
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
        wait_until(
            lambda: [p["model"] for p in points(scores)][-3:] == ["model-b"] * 3,
            60,
            "the reloaded model's points",
        )
        assert logged(daemon, "INFO", "reloaded config and model")
        # atomic: every point up to the swap is model A's, every point after it model B's, with B's
        # threshold and mode; B's windows are cut at B's rate and length
        got = points(scores)
        first_b = next(i for i, p in enumerate(got) if p["model"] == "model-b")
        before, after = got[:first_b], got[first_b:]
        assert {(p["model"], p["mode"], p["threshold"]) for p in before} == {
            (model.name, "cycle", card_a.threshold.value)
        }
        assert {(p["model"], p["mode"], p["threshold"]) for p in after} == {
            ("model-b", "window", card_b.threshold.value)
        }
        # window mode: several windows per cycle, 20 steps (4 s at 5 Hz) apart
        steps = [b["time_ns"] - a["time_ns"] for a, b in itertools.pairwise(after)]
        assert 4_000_000_000 in steps

        sources = [{**config["sources"][0], "speed": 30}]
        reload(model={"path": str(model_b)}, sources=sources)
        wait_until(
            lambda: logged(daemon, "WARNING", "changes to sources take effect on restart"), 30, "warning"
        )
        assert daemon.stop() == 0
    finally:
        daemon.kill()
