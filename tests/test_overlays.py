"""Anomaly-map overlays (daemon/overlays.py) and how the metrics endpoint serves them (daemon/metrics.py)."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from daemon import metrics as metrics_module
from daemon.metrics import MetricsServer, render
from daemon.overlays import (
    LEGEND_HEIGHT,
    MAP_ALPHA,
    MAX_SIDE,
    SCALE_TOP,
    OverlayNameError,
    OverlayStore,
    _lut,
    render_overlay,
)

T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
THRESHOLD = 22.5
REFERENCE = 21.9  # an AST card's median calibration score: maps sit near it, far from 0


def frame(height: int = 120, width: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 200, (height, width, 3), dtype=np.uint8)


def amap(normalized: np.ndarray) -> np.ndarray:
    """A raw map whose pixels are `normalized` on the scores' scale (threshold = 1, reference = 0)."""
    return (REFERENCE + normalized * (THRESHOLD - REFERENCE)).astype(np.float32)


def cold_map_with_hot_square(value: float, size: int = 32) -> np.ndarray:
    normalized = np.full((size, size), 0.2, np.float32)
    normalized[8:16, 8:16] = value
    return amap(normalized)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def expected_blend(pixel: np.ndarray, strength: float) -> np.ndarray:
    colour = _lut()[round(strength * 255)].astype(float)
    alpha = round(MAP_ALPHA * round(strength * 255)) / 255
    return pixel.astype(float) * (1 - alpha) + colour * alpha


def store(tmp_path: Path, **kw: int) -> OverlayStore:
    return OverlayStore(
        tmp_path / "overlays", max_files=kw.get("max_files", 100), max_bytes=kw.get("max_bytes", 10**9)
    )


# --- drawing -------------------------------------------------------------------------------------------
def test_overlay_shows_the_frame_with_its_map_coloured_only_above_the_threshold(tmp_path: Path) -> None:
    """A user opening an overlay sees the camera frame at its own aspect ratio, untouched where the
    model's map is below the threshold, and the anomaly coloured (turbo, fixed scale) where it is above,
    with a legend line under it."""
    overlays = store(tmp_path)
    image = frame(120, 200)
    name = overlays.save(
        "cell1-arm", "cam1", T0, 7, image, cold_map_with_hot_square(SCALE_TOP * 4), THRESHOLD, REFERENCE
    )
    assert name == f"cell1-arm_cam1_{T0}_7.png"
    png = read_png(overlays.directory / name)
    assert png.shape == (120 + LEGEND_HEIGHT, 200, 3), "the frame's size, plus the legend line"
    picture = png[:120]
    # the map (32 x 32) is upsampled over the whole frame: square [8, 16) of 32 is rows 30-60, cols 50-100
    cold = np.ones((120, 200), bool)
    cold[20:70, 35:115] = False
    assert np.array_equal(picture[cold], image[cold]), "below the threshold the frame is unchanged"
    hot = picture[36:54, 60:90].reshape(-1, 3).astype(float)
    want = np.array([expected_blend(p, 1.0) for p in image[36:54, 60:90].reshape(-1, 3)])
    assert np.abs(hot - want).max() <= 1, "far above the threshold: the top colour at full opacity"
    assert png[120:].std() > 0, "the legend line is drawn"


def test_colour_scale_is_fixed_relative_to_the_threshold_across_frames(tmp_path: Path) -> None:
    """Two overlays can be compared by eye: a map value of 4x the threshold has the same colour in a
    frame whose map peaks at 5 as in one whose map peaks at 30, and the threshold itself is transparent;
    the model's reference (median calibration score) is the scale's zero, so maps far from 0 work."""
    image = np.full((64, 64, 3), 128, np.uint8)
    colours = []
    for peak in (5.0, 30.0):
        normalized = np.full((64, 64), 4.0, np.float32)
        normalized[:4, :4] = peak
        rgb = render_overlay(image, amap(normalized), THRESHOLD, REFERENCE, legend=False)
        colours.append(rgb[32, 32])
    assert np.array_equal(colours[0], colours[1])
    strength = np.log2(4.0) / np.log2(SCALE_TOP)
    assert np.abs(colours[0] - expected_blend(np.array([128, 128, 128]), strength)).max() <= 2
    at_threshold = render_overlay(
        image, amap(np.ones((64, 64), np.float32)), THRESHOLD, REFERENCE, legend=False
    )
    assert np.array_equal(at_threshold, image), "at the threshold: transparent"
    # without the reference the scale is map / threshold: this map (4x the threshold above the
    # reference, 1.08x the threshold itself) would barely show
    faint = render_overlay(image, amap(np.full((64, 64), 4.0)), THRESHOLD, legend=False)
    assert np.abs(faint.astype(int) - image).max() <= 2


def test_frames_are_scaled_to_a_bounded_size_that_keeps_their_aspect_ratio(tmp_path: Path) -> None:
    """A 2560 x 1440 camera frame gives a 1024 x 576 overlay (small files, quick to draw); a frame
    smaller than the model's map is shown at the map's resolution; non-finite map pixels do not break it."""
    overlays = store(tmp_path)
    big = np.zeros((1440, 2560, 3), np.uint8)
    name = overlays.save("r", "c", T0, 0, big, cold_map_with_hot_square(3.0, 64), THRESHOLD, REFERENCE)
    assert read_png(overlays.directory / name).shape == (576 + LEGEND_HEIGHT, MAX_SIDE, 3)
    small = frame(30, 40)
    nan_map = cold_map_with_hot_square(3.0, 64)
    nan_map[0, 0], nan_map[1, 1] = np.nan, np.inf
    name = overlays.save("r", "c", T0, 1, small, nan_map, THRESHOLD, REFERENCE)
    assert read_png(overlays.directory / name).shape == (48 + LEGEND_HEIGHT, 64, 3)


def test_bad_arrays_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Arrays of the wrong kind raise a ValueError naming them, and leave no file behind."""
    overlays = store(tmp_path)
    good_map = cold_map_with_hot_square(3.0)
    for image, m in (
        (frame().astype(np.float32), good_map),
        (frame()[..., 0], good_map),
        (frame(), good_map[None]),
    ):
        with pytest.raises(ValueError, match=r"image|anomaly_map"):
            overlays.save("r", "c", T0, 0, image, m, THRESHOLD)
    assert overlays.files == 0
    assert not list(overlays.directory.glob("*.png"))


# --- files ---------------------------------------------------------------------------------------------
def test_each_save_writes_the_frame_file_and_replaces_the_cameras_latest(tmp_path: Path) -> None:
    """Each overlay is a file named robot_camera_time_seq.png; latest/robot_camera.png is always the
    newest of that camera; no temporary file is left; the names returned are relative to the directory."""
    overlays = store(tmp_path)
    first = overlays.save("cell1-arm", "cam1", T0, 0, frame(seed=1), cold_map_with_hot_square(3.0), THRESHOLD)
    second = overlays.save(
        "cell1-arm", "cam1", T0 + 10**9, 1, frame(seed=2), cold_map_with_hot_square(9.0), THRESHOLD
    )
    other = overlays.save("cell1-arm", "cam2", T0, 0, frame(seed=3), cold_map_with_hot_square(3.0), THRESHOLD)
    latest = overlays.directory / "latest"
    assert sorted(p.name for p in latest.iterdir()) == ["cell1-arm_cam1.png", "cell1-arm_cam2.png"]
    assert (latest / "cell1-arm_cam1.png").read_bytes() == (overlays.directory / second).read_bytes()
    assert (latest / "cell1-arm_cam2.png").read_bytes() == (overlays.directory / other).read_bytes()
    assert sorted(p.name for p in overlays.directory.iterdir() if p.is_file()) == sorted(
        [first, second, other]
    )
    assert overlays.names() == [first, second, other]
    assert overlays.bytes == sum((overlays.directory / n).stat().st_size for n in (first, second, other))


@pytest.mark.parametrize(
    ("robot", "camera"),
    [
        ("../etc", "cam1"),
        ("cell1", "a/b"),
        ("", "cam1"),
        ("cell1", ""),
        ("a" * 65, "c"),
        ("cell 1", "c"),
        ("cell1", "cam\x00"),
        ("cell1", "cäm"),
    ],
)
def test_names_that_could_leave_the_directory_are_refused(tmp_path: Path, robot: str, camera: str) -> None:
    """A robot or camera name from a broker topic can never write outside the overlay directory: only
    [A-Za-z0-9_.-], 1 to 64 characters, are accepted; anything else raises OverlayNameError (a ValueError)
    and writes nothing."""
    overlays = store(tmp_path)
    with pytest.raises(OverlayNameError):
        overlays.save(robot, camera, T0, 0, frame(), cold_map_with_hot_square(3.0), THRESHOLD)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    assert overlays.saved == 0


def test_the_directory_stays_within_its_bounds_oldest_first(tmp_path: Path) -> None:
    """However many frames are over the threshold, the directory holds at most max_files files and
    max_bytes bytes: the oldest overlays go first, and the counters say how many were saved and deleted."""
    overlays = store(tmp_path, max_files=3)
    names = [
        overlays.save("r", "c", T0 + i, i, frame(seed=i), cold_map_with_hot_square(3.0), THRESHOLD)
        for i in range(6)
    ]
    assert overlays.names() == names[3:]
    assert sorted(p.name for p in overlays.directory.glob("*.png")) == sorted(names[3:])
    assert (overlays.saved, overlays.deleted, overlays.files) == (6, 3, 3)
    by_bytes = OverlayStore(tmp_path / "b", max_files=100, max_bytes=10**9)
    for i in range(5):
        by_bytes.save("r", "c", T0 + i, i, frame(seed=9), cold_map_with_hot_square(3.0), THRESHOLD)
        if i == 0:  # room for two and a half overlays of this frame
            by_bytes.max_bytes = int(by_bytes.bytes * 2.5)
    assert by_bytes.files == 2
    assert by_bytes.bytes <= by_bytes.max_bytes
    assert by_bytes.names() == [f"r_c_{T0 + 3}_3.png", f"r_c_{T0 + 4}_4.png"]
    samples = {name: value for name, _, _, value in by_bytes.metric_samples()}
    assert samples == {
        "cellwatch_overlays_saved_total": 5,
        "cellwatch_overlays_deleted_total": 3,
        "cellwatch_overlays_failed_total": 0,
        "cellwatch_overlay_files": 2,
        "cellwatch_overlay_bytes": by_bytes.bytes,
    }
    assert "# TYPE cellwatch_overlay_bytes gauge" in render(by_bytes.metric_samples())
    # an overlay that alone is over max_bytes is not kept: "" (none saved), latest/ still shows it
    tiny = OverlayStore(tmp_path / "t", max_files=10, max_bytes=100)
    assert tiny.save("r", "c", T0, 0, frame(), cold_map_with_hot_square(3.0), THRESHOLD) == ""
    assert tiny.files == 0
    assert (tiny.directory / "latest" / "r_c.png").exists()


def test_the_same_frame_saved_again_replaces_its_file_and_is_counted_once(tmp_path: Path) -> None:
    """A replayed frame (same robot, camera, time and sequence number) replaces its overlay: one file,
    counted once, now the newest."""
    overlays = store(tmp_path, max_files=2)
    a = overlays.save("r", "c", T0, 0, frame(seed=1), cold_map_with_hot_square(3.0), THRESHOLD)
    b = overlays.save("r", "c", T0 + 1, 1, frame(seed=2), cold_map_with_hot_square(3.0), THRESHOLD)
    assert overlays.save("r", "c", T0, 0, frame(seed=3), cold_map_with_hot_square(3.0), THRESHOLD) == a
    assert overlays.names() == [b, a]
    assert overlays.files == 2
    assert overlays.bytes == sum(p.stat().st_size for p in overlays.directory.glob("*.png"))
    overlays.save("r", "c", T0 + 2, 2, frame(seed=4), cold_map_with_hot_square(3.0), THRESHOLD)
    assert not (overlays.directory / b).exists(), "b is now the oldest"


def test_a_restart_counts_what_is_there_and_applies_the_bounds(tmp_path: Path) -> None:
    """After a restart the store knows the overlays already on disk (they count against the bounds, the
    oldest by modification time go first), removes temporary files a crash left, and never touches files
    that are not overlays."""
    first = store(tmp_path)
    names = [
        first.save("r", "c", T0 + i, i, frame(seed=i), cold_map_with_hot_square(3.0), THRESHOLD)
        for i in range(5)
    ]
    for age, name in enumerate(names):  # modification times against the names: names[0] the newest
        when = 1_700_000_000 - age * 60
        os.utime(first.directory / name, (when, when))
    foreign = first.directory / "notes.txt"
    foreign.write_text("mine")
    odd_png = first.directory / "holiday.png"
    odd_png.write_bytes(b"not an overlay name")
    crash = first.directory / f".{names[0]}.abcd1234.tmp"
    crash.write_bytes(b"half a png")
    latest_crash = first.directory / "latest" / ".r_c.png.0000beef.tmp"
    latest_crash.write_bytes(b"half")

    again = store(tmp_path, max_files=3)
    assert again.names() == [names[2], names[1], names[0]], "the three newest on disk, oldest first"
    assert sorted(p.name for p in again.directory.glob("r_c_*.png")) == sorted(names[:3])
    assert (again.files, again.deleted, again.saved) == (3, 2, 0)
    assert again.bytes == sum((again.directory / n).stat().st_size for n in names[:3])
    assert foreign.read_text() == "mine", "files that are not overlays stay"
    assert odd_png.exists(), "files that are not overlays stay"
    assert not crash.exists(), "a crash's temporary files are removed"
    assert not latest_crash.exists(), "a crash's temporary files are removed"
    new = again.save("r", "c", T0 + 9, 9, frame(), cold_map_with_hot_square(3.0), THRESHOLD)
    assert again.names() == [names[1], names[0], new]


def test_readers_never_see_a_partial_file_while_saves_run_on_other_threads(tmp_path: Path) -> None:
    """The dashboard may fetch latest/ (or any overlay) while the inference thread writes: it gets a
    complete PNG or, for a file the bounds just deleted, nothing; two writer threads keep the counts
    right."""
    overlays = store(tmp_path, max_files=4)
    latest = overlays.directory / "latest" / "r_c.png"
    stop = threading.Event()
    reads: dict[str, int] = {"complete": 0, "missing": 0}
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            for path in [latest, *overlays.directory.glob("r_c_*.png")]:
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    reads["missing"] += 1
                    continue
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                    reads["complete"] += 1
                except Exception as err:  # noqa: BLE001 - a torn file, reported below
                    errors.append(err)

    def writer(offset: int) -> None:
        try:
            for i in range(12):
                overlays.save(
                    "r",
                    "c",
                    T0 + offset + i,
                    offset + i,
                    frame(seed=i),
                    cold_map_with_hot_square(3.0 + i),
                    THRESHOLD,
                )
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [
        threading.Thread(target=reader),
        threading.Thread(target=writer, args=(0,)),
        threading.Thread(target=writer, args=(100,)),
    ]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors, errors
    assert reads["complete"] > 0
    on_disk = sorted(p.name for p in overlays.directory.glob("r_c_*.png"))
    assert sorted(overlays.names()) == on_disk
    assert len(on_disk) == 4
    assert (overlays.saved, overlays.deleted) == (24, 20)
    assert overlays.bytes == sum((overlays.directory / n).stat().st_size for n in on_disk)
    assert not list(overlays.directory.rglob("*.tmp"))


# --- served by the metrics endpoint --------------------------------------------------------------------
def serve(overlays: Path | None, body: Callable[[MetricsServer], Awaitable[Any]], collect: Any = list) -> Any:
    async def main() -> Any:
        server = MetricsServer("127.0.0.1:0", collect, overlays=overlays)
        await server.start()
        try:
            return await body(server)
        finally:
            await server.close()

    return asyncio.run(main())


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def raw_get(port: int, target: bytes, method: bytes = b"GET") -> bytes:
    """A request line sent byte for byte (no client normalizes the path); the status line back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    return response.split(b"\r\n", 1)[0]


def test_the_metrics_endpoint_serves_overlays_and_the_latest_per_camera(tmp_path: Path) -> None:
    """Grafana's data links and <img> tags fetch http://DAEMON:9108/overlays/NAME.png and
    /overlays/latest/ROBOT_CAMERA.png over plain HTTP from the daemon's metrics port: image/png, the
    exact file; a cache-busting query is ignored; /metrics (with the overlay counters) keeps working."""
    overlays = store(tmp_path)
    name = overlays.save("cell1-arm", "cam1", T0, 3, frame(), cold_map_with_hot_square(9.0), THRESHOLD)

    async def body(server: MetricsServer) -> None:
        base = f"http://127.0.0.1:{server.port}"
        status, headers, data = await asyncio.to_thread(http_get, f"{base}/overlays/{name}")
        assert (status, headers["Content-Type"]) == (200, "image/png")
        assert data == (overlays.directory / name).read_bytes()
        assert int(headers["Content-Length"]) == len(data)
        status, headers, data = await asyncio.to_thread(
            http_get, f"{base}/overlays/latest/cell1-arm_cam1.png?t=1767225600000"
        )
        assert (status, headers["Content-Type"]) == (200, "image/png")
        assert headers["Cache-Control"] == "no-cache", "the browser asks again for the newest"
        assert data == (overlays.directory / name).read_bytes()
        status, headers, data = await asyncio.to_thread(http_get, f"{base}/metrics")
        assert status == 200
        assert "cellwatch_overlay_files 1" in data.decode()
        status, _, _ = await asyncio.to_thread(http_get, f"{base}/overlays/latest/cell1-arm_cam9.png")
        assert status == 404, "a camera without an overlay"

    serve(overlays.directory, body, overlays.metric_samples)


def test_nothing_outside_the_overlay_directory_can_be_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No request reaches a file outside the overlay directory, whatever its path says (dot segments,
    escapes, absolute paths, symbolic links out of the directory), and only PNG files of a bounded size
    are sent: everything else is a plain 404."""
    overlays = store(tmp_path)
    name = overlays.save("r", "c", T0, 0, frame(), cold_map_with_hot_square(3.0), THRESHOLD)
    secret = tmp_path / "secret.png"
    secret.write_bytes((overlays.directory / name).read_bytes())  # a PNG, next to (not in) the directory
    (overlays.directory / "link.png").symlink_to(secret)
    (overlays.directory / "latest" / "up_c.png").symlink_to(secret)
    (overlays.directory / "text.png").write_text("<script>alert(1)</script>")
    (overlays.directory / "dir.png").mkdir()
    big = overlays.directory / "big.png"
    big.write_bytes((overlays.directory / name).read_bytes() + b"\0" * 4096)
    monkeypatch.setattr(metrics_module, "MAX_OVERLAY_BYTES", big.stat().st_size - 1)

    targets = [
        b"/overlays/../secret.png",
        b"/overlays/latest/../../secret.png",
        b"/overlays/..%2fsecret.png",
        b"/overlays/%2e%2e/secret.png",
        b"/overlays//" + str(secret).encode(),
        b"/overlays/" + str(secret).encode(),
        b"/overlays/link.png",
        b"/overlays/latest/up_c.png",
        b"/overlays/text.png",
        b"/overlays/dir.png",
        b"/overlays/big.png",
        b"/overlays/latest/",
        b"/overlays/",
        b"/overlays/" + name.encode()[:-4],
        b"/overlays/" + name.encode() + b"/",
        b"/overlays/" + name.encode().replace(b"_", b"\\"),
        b"/overlays/a/" + name.encode(),
        b"/overlays/sub/latest/r_c.png",
        b"/overlays/" + b"a" * 300 + b".png",
        b"/OVERLAYS/" + name.encode(),
        b"overlays/" + name.encode(),
        b"http://x/overlays/" + name.encode(),
    ]

    async def body(server: MetricsServer) -> dict[bytes, bytes]:
        out = {t: await raw_get(server.port, t) for t in targets}
        out[b"POST"] = await raw_get(server.port, b"/overlays/" + name.encode(), b"POST")
        out[b"ok"] = await raw_get(server.port, b"/overlays/" + name.encode())
        return out

    got = serve(overlays.directory, body)
    assert got.pop(b"ok") == b"HTTP/1.1 200 OK", "the overlay itself is served"
    assert {t: status for t, status in got.items() if status != b"HTTP/1.1 404 Not Found"} == {}


def test_without_an_overlay_directory_there_are_no_overlays_to_fetch(tmp_path: Path) -> None:
    """A daemon without camera sources (no overlay directory given) answers 404 under /overlays/ and
    serves /metrics as before (MetricsServer(listen, collect) keeps working unchanged)."""
    overlays = store(tmp_path)
    name = overlays.save("r", "c", T0, 0, frame(), cold_map_with_hot_square(3.0), THRESHOLD)

    async def body(server: MetricsServer) -> list[int]:
        base = f"http://127.0.0.1:{server.port}"
        return [
            (await asyncio.to_thread(http_get, f"{base}{p}"))[0] for p in (f"/overlays/{name}", "/metrics")
        ]

    assert serve(None, body) == [404, 200]

    async def positional() -> None:
        server = MetricsServer("127.0.0.1:0", list)
        await server.start()
        assert server.overlays is None
        await server.close()

    asyncio.run(positional())
