"""Camera frames through the daemon: `cellwatch replay DIR --model AST` scores a folder like a voraus
file, and one daemon runs both models at once, each on the sources made for it, joining a cycle's
signal score with the camera score of the same cycle.

The scores are checked against `cellwatch evaluate --scores` on the same images: what the daemon
writes for a frame is what the offline evaluation computes for that image.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from daemon.cli import main
from daemon.dataset import load_cycles
from flows.artifact import load_model
from flows.scorer import Scorer


def points(path: Path, measurement: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [x for x in lines if x["measurement"] == measurement]


def evaluate_scores(data: Path, model: Path, out: Path) -> dict[str, float]:
    """`cellwatch evaluate --scores`: the offline score of every test image, by its path in the folder."""
    assert (
        main(
            ["evaluate", "--data", str(data), "--model", str(model), "--device", "cpu", "--scores", str(out)]
        )
        == 0
    )
    with out.open() as fh:
        return {row["path"]: float(row["AST"]) for row in csv.DictReader(fh)}


def test_replaying_a_folder_scores_every_test_image_once_as_evaluate_does(
    tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    data, model = tiny_images_and_ast
    expected = evaluate_scores(data, model, tmp_path / "evaluate.csv")
    out, overlays = tmp_path / "scores.jsonl", tmp_path / "overlays"
    argv = ["replay", str(data), "--model", str(model), "--robot", "arm-2", "--camera", "top"]
    assert main([*argv, "--out", str(out), "--overlays", str(overlays)]) == 0

    rows = points(out, "image_score")
    assert sorted(r["frame"] for r in rows) == sorted(expected)  # every test image, exactly once
    for r in rows:
        assert np.isclose(r["score"], expected[r["frame"]], rtol=1e-4), r["frame"]
        assert r["label"] == r["frame"].split("/")[1]  # test/<label>/<file>
        assert (r["robot"], r["camera"], r["model"]) == ("arm-2", "top", model.name)
        assert r["is_anomaly"] == (r["normalized_score"] > 1.0)
    flagged = [r for r in rows if r["is_anomaly"]]
    assert flagged, "the tiny model flags some test images"
    for r in flagged:  # each frame over the threshold has its overlay, a PNG that opens
        with Image.open(overlays / r["overlay"]) as im:
            assert im.format == "PNG"
    assert all(r["overlay"] == "" for r in rows if not r["is_anomaly"])
    alerts = points(out, "alert")
    assert alerts
    assert all(a["camera"] == "top" and a["kind"] == "camera" for a in alerts)
    assert {a["state"] for a in alerts if a["alert_id"] == alerts[-1]["alert_id"]} >= {"resolved"}


def test_one_daemon_runs_both_models_and_joins_each_cycle_with_its_camera_frame(
    tiny_cell_and_model: tuple[Path, Path], tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    """A voraus replay and a camera folder in one config: signals go to the MVT-Flow, frames to the AST,
    and a frame named after a cycle (the camera's picture of the can in that cycle's scan pause) is joined
    with the cycle's signal score in one `cycle_fused` point that says which of the two fired."""
    cell, signal_model = tiny_cell_and_model
    images, image_model = tiny_images_and_ast
    loaded = load_model(signal_model)
    test = load_cycles(cell, loaded.card.signals, rate_divider=10, want_train=False).test
    samples = [int(s) for s in test.samples]

    camera = tmp_path / "camera"
    camera.mkdir()
    pictures = sorted((images / "test").glob("*/*.png"))
    joined = samples[: len(pictures)]
    for sample, picture in zip(joined, pictures, strict=False):
        shutil.copy(picture, camera / f"can_cycle{sample:04d}.png")
    config = {
        "sources": [
            {"type": "voraus_replay", "robot": "arm-1", "path": str(cell), "speed": 1e6},
            {
                "type": "image_folder",
                "mode": "replay",
                "path": str(camera),
                "robot": "arm-1",
                "camera": "can",
                "cycle_pattern": r"cycle(?P<cycle>\d+)",
            },
        ],
        "models": [{"path": str(signal_model)}, {"path": str(image_model), "batch": 4}],
        "scoring": {"batch": 8, "max_wait_ms": 5},
        "sinks": {"file": {"path": str(tmp_path / "scores.jsonl")}},
        "overlays": {"dir": str(tmp_path / "overlays")},
    }
    path = tmp_path / "cellwatch.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0

    out = tmp_path / "scores.jsonl"
    signal_rows = points(out, "anomaly_score")
    assert [r["cycle"] for r in signal_rows] == samples  # the signal model scored every test cycle once
    assert {r["model"] for r in signal_rows} == {signal_model.name}
    scorer = Scorer(loaded, device="cpu")
    expected = scorer.score(np.stack([scorer.prepare_cycle(x) for x in test.signals]))
    assert np.allclose([r["score"] for r in signal_rows], expected.raw, rtol=1e-5)

    frame_rows = points(out, "image_score")
    assert sorted(r["cycle"] for r in frame_rows) == joined  # every frame once, with the cycle of its name
    assert {r["model"] for r in frame_rows} == {image_model.name}

    fused = points(out, "cycle_fused")
    latest = {(r["robot"], r["camera"], r["cycle"]): r for r in fused}  # a rewrite replaces the point
    assert sorted(c for _, _, c in latest) == joined
    signal_by_cycle = {r["cycle"]: r for r in signal_rows}
    frame_by_cycle = {r["cycle"]: r for r in frame_rows}
    for (_, _, cycle), row in latest.items():
        sig, cam = signal_by_cycle[cycle], frame_by_cycle[cycle]
        assert np.isclose(row["signal_score"], sig["normalized_score"])
        assert np.isclose(row["camera_score"], cam["normalized_score"])
        which = {
            (False, False): "none",
            (True, False): "signals",
            (False, True): "camera",
            (True, True): "both",
        }
        assert row["fired"] == which[(sig["is_anomaly"], cam["is_anomaly"])]
        # each rewrite of a cycle's fused point lands on the same timestamp
        assert len({r["time_ns"] for r in fused if r["cycle"] == cycle}) == 1


def test_a_watched_folder_is_scored_once_across_a_restart(
    tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    """The camera software drops pictures into a folder (written under a temporary name, then renamed);
    the daemon scores each once, as the model scores that image, and after a restart scores only the
    pictures it had not written yet, never one twice; the overlay of a frame over the threshold is served
    by the daemon's HTTP endpoint for the dashboard."""
    import urllib.request

    from daemons import Daemon
    from services import wait_until

    from flows.ast.artifact import load_ast
    from flows.ast.scorer import ImageScorer
    from ingest.images import read_image

    data, model = tiny_images_and_ast
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pictures = sorted((data / "test").glob("*/*.png"))
    first, second = pictures[:5], pictures[5:]

    def drop(files: list[Path]) -> None:
        for picture in files:
            name = f"{picture.parent.name}-{picture.name}"
            shutil.copy(picture, incoming / f"{name}.tmp")
            (incoming / f"{name}.tmp").rename(incoming / name)

    out = tmp_path / "scores.jsonl"
    config = {
        "sources": [
            {"type": "image_folder", "path": str(incoming), "robot": "arm-3", "camera": "can", "poll_s": 0.1}
        ],
        "model": {"path": str(model)},
        "scoring": {"max_wait_ms": 5, "device": "cpu"},
        "sinks": {"file": {"path": str(out)}},
        "overlays": {"dir": str(tmp_path / "overlays")},
    }
    daemon = Daemon(tmp_path, "watch", config).start()
    try:
        drop(first)
        wait_until(
            lambda: daemon.metric("cellwatch_frames_scored_total") >= len(first), 60, "the first frames"
        )
        assert daemon.stop() == 0
        drop(second)  # while it is down
        daemon.start()
        wait_until(lambda: daemon.metric("cellwatch_frames_scored_total") >= len(second), 60, "the rest")
        rows = points(out, "image_score")
        flagged = [r for r in rows if r["overlay"]]
        assert flagged, "the tiny model flags some test images (see the replay test)"
        for path in (flagged[-1]["overlay"], "latest/arm-3_can.png"):
            with urllib.request.urlopen(
                f"http://127.0.0.1:{daemon.port}/overlays/{path}", timeout=10
            ) as response:
                assert response.headers["Content-Type"] == "image/png"
                assert response.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        assert daemon.stop() == 0

    rows = points(out, "image_score")
    names = [f"{p.parent.name}-{p.name}" for p in pictures]
    assert sorted(r["frame"] for r in rows) == sorted(names)  # each picture exactly once
    scorer = ImageScorer(load_ast(model), device="cpu")
    expected = scorer.score([read_image(p) for p in pictures]).raw
    by_name = {r["frame"]: r["score"] for r in rows}
    assert np.allclose([by_name[n] for n in names], expected, rtol=1e-4)


def test_sighup_swaps_the_image_model_for_the_next_frames(
    tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    """A new AST model (here the same weights under another name, the `model` tag) is loaded on SIGHUP
    off the event loop; frames dropped after the reload carry its tag, those before the old one's, and
    none is lost or scored twice."""
    import signal

    from daemons import Daemon
    from services import wait_until

    data, model = tiny_images_and_ast
    renamed = tmp_path / "can-v2"
    shutil.copytree(model, renamed)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pictures = sorted((data / "test").glob("*/*.png"))[:4]
    out = tmp_path / "scores.jsonl"
    config = {
        "sources": [{"type": "image_folder", "path": str(incoming), "robot": "arm-4", "poll_s": 0.1}],
        "model": {"path": str(model)},
        "scoring": {"max_wait_ms": 5, "device": "cpu"},
        "sinks": {"file": {"path": str(out)}},
        "overlays": {"dir": str(tmp_path / "overlays")},
    }

    def drop(picture: Path, name: str) -> None:
        shutil.copy(picture, incoming / f"{name}.tmp")
        (incoming / f"{name}.tmp").rename(incoming / name)

    daemon = Daemon(tmp_path, "reload", config).start()
    try:
        drop(pictures[0], "before-0.png")
        drop(pictures[1], "before-1.png")
        wait_until(lambda: daemon.metric("cellwatch_frames_scored_total") >= 2, 60, "the first frames")
        running = yaml.safe_load(daemon.config_path.read_text())  # with the metrics port it was given
        daemon.config_path.write_text(yaml.safe_dump({**running, "model": {"path": str(renamed)}}))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.metric("cellwatch_reloads_total") >= 1, 60, "the reload")
        drop(pictures[2], "after-2.png")
        drop(pictures[3], "after-3.png")
        wait_until(lambda: daemon.metric("cellwatch_frames_scored_total") >= 4, 60, "the frames after it")
    finally:
        assert daemon.stop() == 0
    rows = points(out, "image_score")
    assert sorted(r["frame"] for r in rows) == ["after-2.png", "after-3.png", "before-0.png", "before-1.png"]
    assert {r["frame"]: r["model"] for r in rows} == {
        "before-0.png": model.name,
        "before-1.png": model.name,
        "after-2.png": renamed.name,
        "after-3.png": renamed.name,
    }
