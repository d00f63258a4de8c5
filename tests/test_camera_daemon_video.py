"""Video cameras through the daemon: a recorded clip of the data set's test pictures, given to
`cellwatch run` as a `video` source from the file, from an RTSP server and from an HTTP stream, is scored
frame by frame as the model scores the same frames decoded from the file, each frame once.

The clip is H.264 (no B-frames), which both servers relay packet for packet, so a frame the daemon
decodes from a stream is bit-identical to the file's frame and its score matches exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import yaml
from daemons import Daemon
from media import HttpStreamServer, RtspServer, decode_all
from services import wait_until

from daemon.cli import main
from flows.ast.artifact import load_ast
from flows.ast.scorer import ImageScorer
from ingest.images import read_image

pytestmark = pytest.mark.slow
START = "2024-05-01T06:00:00Z"
T0 = 1_714_543_200_000_000_000  # START in ns
FPS = 10  # frame i of the clip is at i * 100 ms


def encode_pictures(path: Path, images: list[np.ndarray], fps: int) -> Path:
    """The pictures as an H.264 MP4 at `fps`, as tests/media.encode_clip encodes its frames: no B-frames
    (decode order is display order), a key frame every 5 frames."""
    height, width = images[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(
            "libx264",
            rate=fps,
            options={"g": "5", "bf": "0", "preset": "ultrafast", "tune": "zerolatency"},
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in images:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return path


class Clip:
    """The data set's test pictures (good and defective) recorded as a clip, its frames as decoded from
    the file, and the score the model gives each of them."""

    def __init__(self, path: Path, frames: list[np.ndarray], scores: Any) -> None:
        self.path, self.frames, self.scores = path, frames, scores
        self.n = len(frames)

    def nearest(self, score: float) -> int:
        """The file frame whose score is closest to `score`."""
        return int(np.argmin(np.abs(self.scores.raw - score)))


@pytest.fixture(scope="module")
def clip(tiny_images_and_ast: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Clip:
    data, model = tiny_images_and_ast
    pictures = [read_image(p) for p in sorted((data / "test").glob("*/*.png"))]
    path = encode_pictures(tmp_path_factory.mktemp("video") / "clip.mp4", pictures, FPS)
    frames = decode_all(path)
    assert len(frames) == len(pictures)
    scores = ImageScorer(load_ast(model), device="cpu").score(frames)
    raw = np.sort(scores.raw)
    # every frame's score differs from the others' by far more than the tolerance: a score names its frame
    assert np.all(np.diff(raw) > 1e-3 * np.abs(raw[1:]))
    return Clip(path, frames, scores)


def points(path: Path, measurement: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [x for x in lines if x["measurement"] == measurement]


def camera_rows(out: Path, camera: str) -> list[dict[str, Any]]:
    return [r for r in points(out, "image_score") if r["camera"] == camera]


@pytest.fixture
def rtsp(clip: Clip, tmp_path: Path) -> Iterator[RtspServer]:
    with RtspServer(tmp_path / "rtsp", clip.path) as server:
        yield server


def test_a_video_file_is_scored_frame_by_frame_as_the_model_scores_its_frames(
    clip: Clip, tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    """A recorded clip given to `cellwatch run` as a video source: the run ends with the file, every
    frame scored exactly once with the score the model gives that frame, named `clip.mp4#<frame>`,
    stamped from the configured start at the clip's own frame rate."""
    _, model = tiny_images_and_ast
    out = tmp_path / "scores.jsonl"
    config = {
        "sources": [
            {"type": "video", "url": str(clip.path), "robot": "arm-4", "camera": "cell", "start": START}
        ],
        "model": {"path": str(model)},
        "scoring": {"max_wait_ms": 5, "device": "cpu"},
        "sinks": {"file": {"path": str(out)}},
        "overlays": {"dir": str(tmp_path / "overlays")},
    }
    path = tmp_path / "cellwatch.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0

    rows = points(out, "image_score")
    assert [r["seq"] for r in rows] == list(range(clip.n))  # every frame once, in order
    assert [r["frame"] for r in rows] == [f"clip.mp4#{i}" for i in range(clip.n)]
    assert [r["time_ns"] for r in rows] == [T0 + i * 1_000_000_000 // FPS for i in range(clip.n)]
    assert all((r["robot"], r["camera"], r["model"]) == ("arm-4", "cell", model.name) for r in rows)
    assert np.allclose([r["score"] for r in rows], clip.scores.raw, rtol=1e-4)
    assert np.allclose([r["normalized_score"] for r in rows], clip.scores.normalized, rtol=1e-4, atol=1e-6)
    assert [r["is_anomaly"] for r in rows] == list(clip.scores.is_anomaly)
    assert any(r["is_anomaly"] for r in rows), "the tiny model flags some frames (the holes)"
    assert all(bool(r["overlay"]) == r["is_anomaly"] for r in rows)  # an overlay for each flagged frame
    assert all((r["cycle"], r["label"]) == (-1, "") for r in rows)


def test_rtsp_and_http_cameras_are_scored_as_the_file_frames_they_carry(
    clip: Clip, rtsp: RtspServer, tiny_images_and_ast: tuple[Path, Path], tmp_path: Path
) -> None:
    """The clip served by an RTSP camera (each session replays it from the start; the daemon reconnects
    when one ends) and by an HTTP camera (MPEG-TS, looping): the daemon scores the frames as they come,
    each one once, and each frame's score is the score of the file frame it carries; frame numbers go on
    across the camera's sessions. A recorded file capped by max_fps in the same daemon is scored at that
    rate, by its frames' own timestamps, and the frames above it are counted as skipped."""
    _, model = tiny_images_and_ast
    out = tmp_path / "scores.jsonl"
    stream = {"robot": "arm-5", "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "open_timeout_s": 5}
    with HttpStreamServer(tmp_path / "http", clip.path, loop=True) as http:
        config = {
            "sources": [
                {"type": "video", "url": rtsp.url, "camera": "rtsp", **stream},
                {"type": "video", "url": http.url, "camera": "http", **stream},
                {
                    "type": "video",
                    "url": str(clip.path),
                    "robot": "arm-5",
                    "camera": "file",
                    "start": START,
                    "max_fps": FPS / 2,
                },
            ],
            "model": {"path": str(model)},
            "scoring": {"max_wait_ms": 5, "device": "cpu"},
            "sinks": {"file": {"path": str(out)}},
        }
        daemon = Daemon(tmp_path, "video", config)
        started_ns = time.time_ns()
        daemon.start()
        try:

            def handed_on(camera: str) -> float:
                return daemon.metric("cellwatch_camera_frames_total", source=f"video:arm-5/{camera}")

            def skipped() -> float:
                return daemon.metric("cellwatch_camera_frames_skipped_total", source="video:arm-5/file")

            # two sessions of the RTSP camera (it replays the clip once, ends, and is reopened), two
            # loops of the HTTP one, and the whole file read
            wait_until(
                lambda: (
                    handed_on("rtsp") >= 2 * clip.n
                    and handed_on("http") >= 2 * clip.n
                    and handed_on("file") + skipped() >= clip.n
                ),
                60,
                "two clips' worth of frames from each camera, and the file read",
            )
            wait_until(
                lambda: (
                    daemon.metric("cellwatch_frames_scored_total")
                    >= sum(handed_on(c) for c in ("rtsp", "http", "file"))
                ),
                30,
                "the frames handed on to be scored",
            )
            file_frames, file_skipped = handed_on("file"), skipped()
            reconnects = daemon.metric("cellwatch_camera_reconnects_total", source="video:arm-5/rtsp")
        finally:
            assert daemon.stop() == 0, daemon.log_tail()
    stopped_ns = time.time_ns()
    assert reconnects >= 1  # the first session ended: the second is a new one

    for camera in ("rtsp", "http"):
        rows = camera_rows(out, camera)
        assert len(rows) >= 2 * clip.n
        seqs = [r["seq"] for r in rows]
        assert seqs == sorted(set(seqs)), camera  # no frame scored twice
        assert [r["frame"] for r in rows] == [f"{camera}#{s}" for s in seqs]
        times = [r["time_ns"] for r in rows]
        assert times == sorted(times)
        assert started_ns <= times[0]
        assert times[-1] <= stopped_ns  # stamped with the wall clock as they came
        for r in rows:
            # a session (or a loop of the file) gives the clip's frames in order from its first: the
            # frame numbered seq carries file frame seq mod N, and has exactly that frame's score
            k = r["seq"] % clip.n
            nearest = clip.nearest(r["score"])
            assert np.isclose(r["score"], clip.scores.raw[k], rtol=1e-4), (camera, r["seq"], k, nearest)

    rows = camera_rows(out, "file")
    kept = list(range(0, clip.n, 2))  # max_fps at half the clip's rate: every other frame
    assert [r["seq"] for r in rows] == kept
    assert [r["time_ns"] for r in rows] == [T0 + i * 1_000_000_000 // FPS for i in kept]
    assert np.allclose([r["score"] for r in rows], clip.scores.raw[kept], rtol=1e-4)
    assert (file_frames, file_skipped) == (len(kept), clip.n - len(kept))  # the rest skipped, counted
