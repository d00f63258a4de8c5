"""The video camera source against real video: an H.264 clip encoded here, played from the file, from
GStreamer's RTSP server (TCP and UDP) and from ffmpeg's HTTP server, both relaying the file's packets,
so every frame can be compared pixel for pixel with decoding the file directly."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from media import HttpStreamServer, RtspServer, damage_packet, decode_all, encode_clip
from services import free_port, poll

from ingest.camera.video import VideoSource
from ingest.errors import IngestError
from ingest.source import Frame, Source

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000
FPS = 20  # the clip's rate: frame i is at i * 50 ms
N = 20


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return encode_clip(tmp_path_factory.mktemp("video") / "clip.mp4", frames=N, fps=FPS)


@pytest.fixture(scope="module")
def reference(clip: Path) -> list[np.ndarray]:
    images = decode_all(clip)
    assert len(images) == N
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(images))
    return images


@pytest.fixture
def rtsp(clip: Path, tmp_path: Path) -> Iterator[RtspServer]:
    with RtspServer(tmp_path / "rtsp", clip) as server:
        yield server


def source(url: str | Path, **kw: Any) -> VideoSource:
    args: dict[str, Any] = {
        "robot": "r1",
        "camera": "cam1",
        "max_fps": None,
        "rtsp_transport": "tcp",
        "open_timeout_s": 5.0,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.4,
        "start_ns": None,
        "max_pixels": 10_000_000,
    }
    return VideoSource(str(url), **{**args, **kw})


def metric(src: VideoSource, name: str) -> float:
    [value] = [v for n, _, labels, v in src.metric_samples() if n == name and labels == {"source": src.name}]
    return value


async def read_all(src: VideoSource, pipeline_s: float = 0.0) -> list[Frame]:
    """Every frame of a source until its end; `pipeline_s` is the time a slow pipeline spends on each."""
    await src.start()
    try:
        frames = []
        async for delivery in src.deliveries():
            assert isinstance(delivery.item, Frame)
            frames.append(delivery.item)
            if pipeline_s:
                await asyncio.sleep(pipeline_s)  # scoring: the reader is far ahead and must wait
        return frames
    finally:
        await src.aclose()


class Collector:
    """Consumes a source's deliveries in a task, as the pipeline does."""

    def __init__(self, src: VideoSource) -> None:
        self.src = src
        self.frames: list[Frame] = []
        self.received_ns: list[int] = []  # the wall clock when each frame came out of the iterator
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        await self.src.start()
        self.task = asyncio.create_task(self._consume())
        return self

    async def _consume(self) -> None:
        async for delivery in self.src.deliveries():
            assert isinstance(delivery.item, Frame)
            self.frames.append(delivery.item)
            self.received_ns.append(time.time_ns())

    async def __aexit__(self, *exc: object) -> None:
        await self.src.aclose()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)  # the iterator ends when the source is closed


def test_file_gives_every_frame_once_in_order_with_file_timestamps(
    clip: Path, reference: list[np.ndarray]
) -> None:
    """A video file gives each of its frames exactly once, in order, pixel for pixel what FFmpeg
    decodes, stamped start + its presentation time, then the iterator ends."""
    src = source(clip, start_ns=T0)
    assert isinstance(src, Source)
    assert (src.name, src.kind) == ("video:r1/cam1", "frames")
    frames = asyncio.run(read_all(src, pipeline_s=0.02))
    assert [f.seq for f in frames] == list(range(N))
    assert [f.ref for f in frames] == [f"clip.mp4#{i}" for i in range(N)]
    assert [f.time_ns for f in frames] == [T0 + i * 1_000_000_000 // FPS for i in range(N)]
    assert all((f.robot, f.camera, f.label, f.cycle) == ("r1", "cam1", None, None) for f in frames)
    for frame, expected in zip(frames, reference, strict=True):
        assert frame.image.dtype == np.uint8
        assert frame.image.shape == (120, 160, 3)
        assert np.array_equal(frame.image, expected)
    assert src.rejections == {}
    assert metric(src, "cellwatch_camera_frames_total") == N
    assert metric(src, "cellwatch_camera_frames_skipped_total") == 0


def test_file_without_start_is_stamped_from_its_modification_time(clip: Path) -> None:
    """Without a start time a file's first frame carries the file's modification time."""
    frames = asyncio.run(read_all(source(clip)))
    assert frames[0].time_ns == clip.stat().st_mtime_ns
    assert frames[-1].time_ns - frames[0].time_ns == (N - 1) * 1_000_000_000 // FPS


def test_max_fps_skips_frames_above_the_rate(clip: Path, reference: list[np.ndarray]) -> None:
    """max_fps 10 on a 20 fps file keeps every other frame; the rest are counted as skipped, not
    rejected, and keep their numbers (seq has gaps)."""
    src = source(clip, start_ns=T0, max_fps=10)
    frames = asyncio.run(read_all(src))
    assert [f.seq for f in frames] == list(range(0, N, 2))
    assert all(np.array_equal(f.image, reference[f.seq]) for f in frames)
    assert metric(src, "cellwatch_camera_frames_skipped_total") == N / 2
    assert metric(src, "cellwatch_camera_frames_total") == N / 2
    assert src.rejections == {}
    # a rate the clip does not exceed skips nothing; a low one keeps one frame in four
    assert len(asyncio.run(read_all(source(clip, start_ns=T0, max_fps=20)))) == N
    assert [f.seq for f in asyncio.run(read_all(source(clip, start_ns=T0, max_fps=5)))] == [0, 4, 8, 12, 16]


def test_frames_with_too_many_pixels_are_rejected(clip: Path) -> None:
    """A frame larger than max_pixels is rejected as too_many_pixels, and the source goes on."""
    src = source(clip, start_ns=T0, max_pixels=160 * 120 - 1)
    assert asyncio.run(read_all(src)) == []
    assert src.rejections == {"too_many_pixels": N}


def test_damaged_frame_is_rejected_and_the_rest_decoded(clip: Path, tmp_path: Path) -> None:
    """A frame whose data is garbage is rejected as decode_error; every other frame comes through,
    as FFmpeg decodes the damaged file."""
    damaged = damage_packet(clip, tmp_path / "damaged.mp4", index=7)
    src = source(damaged, start_ns=T0)
    frames = asyncio.run(read_all(src))
    expected = decode_all(damaged)
    assert len(frames) == len(expected) == N - 1
    assert src.rejections == {"decode_error": 1}
    assert [f.seq for f in frames] == list(range(N - 1))
    assert all(np.array_equal(f.image, e) for f, e in zip(frames, expected, strict=True))
    # the frame after the damaged one is stamped with its own time: the gap shows
    assert frames[7].time_ns - frames[6].time_ns == 2 * 1_000_000_000 // FPS


def test_unreadable_files_are_a_configuration_error(tmp_path: Path) -> None:
    """A missing file, or one that is no video, fails at start with an error naming it."""
    missing = tmp_path / "missing.mp4"
    with pytest.raises(IngestError, match=r"missing\.mp4"):
        asyncio.run(read_all(source(missing)))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(IngestError, match=r"garbage\.mp4"):
        asyncio.run(read_all(source(garbage)))

    async def first_read_without_start() -> None:
        src = source(missing)
        try:
            async for _ in src.deliveries():
                pass
        finally:
            await src.aclose()

    with pytest.raises(IngestError, match=r"missing\.mp4"):
        asyncio.run(first_read_without_start())


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_stream_frames_arrive(rtsp: RtspServer, reference: list[np.ndarray], transport: str) -> None:
    """Frames from a real RTSP server (the clip relayed packet for packet) arrive in order, decoded
    exactly as the file, stamped with the wall clock on arrival, over TCP or UDP."""

    started_ns = time.time_ns()

    async def main() -> Collector:
        async with Collector(source(rtsp.url, rtsp_transport=transport)) as got:
            await poll(lambda: len(got.frames) >= N, 20)
        return got

    got = asyncio.run(main())
    first = got.frames[:N]
    assert [f.seq for f in first] == list(range(N))
    assert [f.ref for f in first] == [f"cam1#{i}" for i in range(N)]
    # over UDP the server's end of session (RTCP BYE) can overtake the last RTP packet of the last
    # frame, which is then decoded without its second slice: the frames before it are exact
    exact = N if transport == "tcp" else N - 1
    for frame, expected in zip(first[:exact], reference[:exact], strict=True):
        assert np.array_equal(frame.image, expected)
    times = [f.time_ns for f in got.frames]
    assert times == sorted(times)
    assert started_ns <= times[0]
    assert all(t <= received for t, received in zip(times, got.received_ns, strict=True))
    assert got.src.rejections == {}


def test_rtsp_server_down_killed_and_restarted(clip: Path, tmp_path: Path) -> None:
    """A camera that is not up yet, then is killed, then comes back: the source retries with backoff
    (counted), reports itself disconnected, and frames come again once the server is back; frame
    numbers go on. It never ends or raises on its own."""
    server = RtspServer(tmp_path / "rtsp", clip)

    async def main() -> None:
        async with Collector(source(server.url)) as got:
            src = got.src
            await poll(lambda: src.reconnects >= 2, 10)  # nothing listens yet: reopened with backoff
            assert got.frames == []
            assert metric(src, "cellwatch_camera_connected") == 0
            await asyncio.to_thread(server.start)
            try:
                await poll(lambda: len(got.frames) >= 5, 20)
            finally:
                await asyncio.to_thread(server.stop)
            await poll(lambda: not src.connected, 10)
            seen, reconnects = len(got.frames), src.reconnects
            await poll(lambda: src.reconnects > reconnects, 10)  # still retrying, nothing to read
            assert len(got.frames) - seen <= 4  # at most what was queued when it was killed
            await asyncio.to_thread(server.start)
            try:
                await poll(lambda: len(got.frames) >= seen + 10, 20)
                assert metric(src, "cellwatch_camera_reconnects_total") >= 3
            finally:
                await asyncio.to_thread(server.stop)
            seqs = [f.seq for f in got.frames]
            assert seqs == sorted(set(seqs))  # increasing across reconnections: refs stay unique
            assert src.rejections == {}

    asyncio.run(main())


def test_http_stream_frames_arrive(clip: Path, tmp_path: Path, reference: list[np.ndarray]) -> None:
    """An MPEG-TS stream over HTTP (ffmpeg -listen looping the clip, its packets copied) gives the clip's
    frames in order, decoded exactly as the file, and the source reports itself connected."""
    with HttpStreamServer(tmp_path / "http", clip, loop=True) as server:

        async def main() -> list[Frame]:
            async with Collector(source(server.url)) as got:
                await poll(lambda: len(got.frames) >= N, 20)
                assert metric(got.src, "cellwatch_camera_connected") == 1
                assert metric(got.src, "cellwatch_camera_reconnects_total") == 0
            return got.frames

        frames = asyncio.run(main())
    assert [f.seq for f in frames[:N]] == list(range(N))
    assert all(np.array_equal(f.image, e) for f, e in zip(frames, reference, strict=False))


def test_aclose_is_prompt(clip: Path, tmp_path: Path) -> None:
    """Closing the source stops its reader thread at once: during a long backoff wait, and while a
    live stream plays (ffmpeg looping the clip)."""

    async def close_in(src: VideoSource, condition: Any) -> float:
        await src.start()
        await poll(condition, 20)
        started = time.monotonic()
        await src.aclose()
        return time.monotonic() - started

    nothing = source(f"rtsp://127.0.0.1:{free_port()}/cam", reconnect_min_s=60, reconnect_max_s=60)
    assert asyncio.run(close_in(nothing, lambda: nothing.last_error is not None)) < 1
    assert not any(t.name == "video-r1-cam1" for t in threading.enumerate())

    with HttpStreamServer(tmp_path / "http", clip, loop=True) as server:
        live = source(server.url, max_fps=1000)
        assert asyncio.run(close_in(live, lambda: live.decoded >= 5)) < 1
    assert not any(t.name == "video-r1-cam1" for t in threading.enumerate())


def test_stalled_stream_times_out_and_is_retried(clip: Path, tmp_path: Path) -> None:
    """A camera that hangs (its server stopped with SIGSTOP: the connection stays open, no data) is
    noticed after open_timeout_s, reported disconnected and retried; closing the source while a retry
    is blocked on the hung server returns within the timeout."""
    with HttpStreamServer(tmp_path / "http", clip, loop=True) as server:
        assert server.proc is not None
        pid = server.proc.pid

        async def main() -> None:
            src = source(server.url, open_timeout_s=1.0, reconnect_min_s=0.1, reconnect_max_s=0.1)
            async with Collector(src) as got:
                await poll(lambda: len(got.frames) >= 5 and src.connected, 20)
                os.kill(pid, signal.SIGSTOP)
                try:
                    await poll(lambda: not src.connected, 10)
                    assert src.last_error is not None
                    assert src.last_error.startswith("lost")
                    await poll(lambda: src.reconnects >= 2, 10)  # retries time out on the hung server
                    assert not src.connected
                    started = time.monotonic()
                    await src.aclose()
                    assert time.monotonic() - started < 2.0  # open_timeout_s, and slack for a busy machine
                    assert src._thread is not None
                    await poll(lambda: not src._thread.is_alive(), 2)  # type: ignore[union-attr]
                finally:
                    os.kill(pid, signal.SIGCONT)

        asyncio.run(main())


def test_slow_pipeline_drops_the_oldest_stream_frames(clip: Path, tmp_path: Path) -> None:
    """A pipeline that falls behind a live stream gets its newest frames: the oldest queued ones are
    dropped and counted, never blocking the stream."""
    with HttpStreamServer(tmp_path / "http", clip, loop=True) as server:

        async def main() -> None:
            src = source(server.url)
            await src.start()
            try:
                await poll(lambda: src.dropped >= 11, 20)  # nobody reads: the queue fills, then drops
                assert metric(src, "cellwatch_camera_frames_dropped_total") >= 11
                deliveries = src.deliveries()
                first = (await anext(deliveries)).item
                assert isinstance(first, Frame)
                assert first.seq >= 11  # the queue holds the newest frames: 0..10 were dropped
                await deliveries.aclose()  # type: ignore[attr-defined]
            finally:
                await src.aclose()

        asyncio.run(main())
