"""The image-folder camera source: real PNG/JPEG files on disk, read the way the daemon reads them.

Replay gives an MVTec-layout test split or a plain folder once, each file exactly once; watch picks up
files a camera drops into a folder (write, then rename) once they settle, and remembers what the
pipeline acknowledged so a restarted daemon scores only what was not written yet."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from services import poll

from ingest.camera.folder import ImageFolderSource
from ingest.errors import IngestError
from ingest.images import read_image
from ingest.sim.images import write_image_dataset
from ingest.source import FRAMES, Delivery, Frame, Source, no_ack


def watching(folder: Path, camera: str = "cam1") -> ImageFolderSource:
    """A watch-mode source that lists often and reads a file as soon as it is renamed in."""
    return ImageFolderSource(folder, robot="r1", camera=camera, poll_s=0.02, settle_s=0.0)


def noise(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def drop(folder: Path, name: str, image: np.ndarray, mtime_ns: int | None = None) -> Path:
    """Write as a camera should: under a temporary name, then rename into place."""
    tmp = folder / f"{name}.part"
    tmp.write_bytes(png_bytes(image))
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    final = folder / name
    os.replace(tmp, final)
    return final


def frame(delivery: Delivery) -> Frame:
    assert isinstance(delivery.item, Frame)
    return delivery.item


async def replay_all(source: ImageFolderSource) -> list[Delivery]:
    await source.start()
    try:
        async with asyncio.timeout(10):
            return [d async for d in source.deliveries()]
    finally:
        await source.aclose()


class Watcher:
    """A started watch-mode source with a consumer task collecting what it delivers."""

    def __init__(self, source: ImageFolderSource) -> None:
        self.source = source
        self.got: list[tuple[float, Delivery]] = []  # (loop time received, delivery)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        await self.source.start()
        self.task = asyncio.create_task(self._consume())
        return self

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        async for delivery in self.source.deliveries():
            self.got.append((loop.time(), delivery))

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.source.aclose()

    @property
    def refs(self) -> list[str]:
        return [frame(d).ref for _, d in self.got]

    def by_ref(self, ref: str) -> Delivery:
        return next(d for _, d in self.got if frame(d).ref == ref)

    async def until(self, condition: Callable[[], bool], seconds: float = 5) -> None:
        if self.task is not None and self.task.done():
            self.task.result()  # the source died: show why
        await poll(condition, seconds)


def test_replay_of_an_mvtec_folder_gives_each_test_image_once_with_its_label(tmp_path: Path) -> None:
    """A user replaying an MVTec-layout data set gets its test split (good first, then each defect type
    in sorted order), every image once with its folder as the label, stamped interval_s apart, and the
    source ends; training images are not scored."""
    root = tmp_path / "brick"
    write_image_dataset(
        root, seed=1, n_train=2, n_test_good=2, n_per_defect=2, size=32, defects=("stain", "hole")
    )
    source = ImageFolderSource(
        root, robot="r1", camera="top", mode="replay", interval_s=0.25, start_ns=10**18, cycle_pattern=None
    )
    as_source: Source = source  # mypy checks the protocol, isinstance its runtime shape
    assert isinstance(as_source, Source)
    assert source.kind == FRAMES
    assert source.name == "image_folder:r1/top"
    deliveries = asyncio.run(replay_all(source))
    frames = [frame(d) for d in deliveries]
    assert [f.ref for f in frames] == [
        "test/good/000.png",
        "test/good/001.png",
        "test/hole/000.png",
        "test/hole/001.png",
        "test/stain/000.png",
        "test/stain/001.png",
    ]
    assert [f.label for f in frames] == ["good", "good", "hole", "hole", "stain", "stain"]
    assert [f.seq for f in frames] == list(range(6))
    assert [f.time_ns for f in frames] == [10**18 + i * 250_000_000 for i in range(6)]
    assert {(f.robot, f.camera, f.cycle) for f in frames} == {("r1", "top", None)}
    for f in frames:
        assert f.image.dtype == np.uint8
        assert np.array_equal(f.image, read_image(root / f.ref))
    assert all(d.ack is no_ack for d in deliveries)
    assert dict(source.rejections) == {}
    assert (
        "cellwatch_camera_frames_total",
        "counter",
        {"source": source.name},
        6.0,
    ) in source.metric_samples()


def test_replay_of_a_plain_folder_gives_its_images_in_name_order(tmp_path: Path) -> None:
    """A plain folder replays its own PNG and JPEG files in name order, unlabelled; other files,
    dotfiles, temporary names and subfolders are left alone."""
    for i, name in enumerate(["b.jpg", "a.png", "c.JPEG"]):
        Image.fromarray(noise(i)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    Image.fromarray(noise(7)).save(tmp_path / ".hidden.png")
    Image.fromarray(noise(8)).save(tmp_path / "d.png.tmp", format="PNG")
    (tmp_path / "sub").mkdir()
    Image.fromarray(noise(9)).save(tmp_path / "sub" / "e.png")
    frames = [
        frame(d) for d in asyncio.run(replay_all(ImageFolderSource(tmp_path, robot="r1", mode="replay")))
    ]
    assert [f.ref for f in frames] == ["a.png", "b.jpg", "c.JPEG"]
    assert {f.label for f in frames} == {None}
    for f in frames:
        assert np.array_equal(f.image, read_image(tmp_path / f.ref))  # JPEG: as decoded, not as written


def test_bad_files_are_rejected_by_reason_and_the_rest_still_come(tmp_path: Path) -> None:
    """Empty, truncated, corrupt, oversized and too-many-pixel files are counted by reason and skipped;
    every good file around them is still scored."""
    good = {f"good{i}.png": noise(i) for i in range(3)}
    for name, image in good.items():
        (tmp_path / name).write_bytes(png_bytes(image))
    whole = png_bytes(noise(5))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "half.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "garbage.png").write_bytes(os.urandom(500))
    (tmp_path / "huge.png").write_bytes(png_bytes(noise(6, size=40)))  # ~4.8 kB of noise
    (tmp_path / "wide.png").write_bytes(png_bytes(np.zeros((8, 400, 3), np.uint8)))  # small, 3200 px
    source = ImageFolderSource(tmp_path, robot="r1", mode="replay", max_bytes=2500, max_pixels=1000)
    frames = [frame(d) for d in asyncio.run(replay_all(source))]
    assert [f.ref for f in frames] == sorted(good)
    for f in frames:
        assert np.array_equal(f.image, good[f.ref])
    assert dict(source.rejections) == {
        "empty": 1,
        "unreadable": 1,
        "not_an_image": 1,
        "file_too_large": 1,
        "too_many_pixels": 1,
    }
    assert [f.seq for f in frames] == [0, 1, 2]  # frame numbers count frames, not rejected files


def test_cycle_pattern_reads_the_cycle_from_the_file_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cycle_pattern joins a frame to its voraus cycle from the file name; a name that does not match
    gives a frame without a cycle (still scored) and one warning."""
    for i, name in enumerate(["cam1_cycle0012.png", "cam1_cycle7_x.png", "snapshot.png"]):
        Image.fromarray(noise(i)).save(tmp_path / name)
    source = ImageFolderSource(tmp_path, robot="r1", mode="replay", cycle_pattern=r"cycle(?P<cycle>\d+)")
    with caplog.at_level(logging.WARNING, "ingest.camera.folder"):
        frames = [frame(d) for d in asyncio.run(replay_all(source))]
    assert {f.ref: f.cycle for f in frames} == {
        "cam1_cycle0012.png": 12,
        "cam1_cycle7_x.png": 7,
        "snapshot.png": None,
    }
    assert "gives no cycle number from file name 'snapshot.png'" in caplog.text


def test_configuration_errors_name_the_problem(tmp_path: Path) -> None:
    """A missing folder is a start-up error naming the path; a pattern without a cycle group and an
    unknown mode are refused."""
    with pytest.raises(IngestError, match=str(tmp_path / "nope")):
        ImageFolderSource(tmp_path / "nope", robot="r1")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(IngestError, match="not a folder"):
        ImageFolderSource(tmp_path / "file.png", robot="r1")
    with pytest.raises(ValueError, match="group named 'cycle'"):
        ImageFolderSource(tmp_path, robot="r1", cycle_pattern=r"\d+")
    with pytest.raises(ValueError, match="mode"):
        ImageFolderSource(tmp_path, robot="r1", mode="tail")
    ImageFolderSource(tmp_path, robot="r1").close()  # an unstarted source releases its thread


def test_watch_picks_up_files_dropped_after_start(tmp_path: Path) -> None:
    """A file renamed into the watched folder is scored once, stamped with its mtime; temporary names
    are never read; a file replaced under the same name is a new frame; the ack is counted."""

    async def scenario() -> None:
        (tmp_path / "later.png.tmp").write_bytes(png_bytes(noise(99)))  # still being written
        async with Watcher(watching(tmp_path, camera="cam2")) as w:
            first = drop(tmp_path, "f001.png", noise(1))
            await w.until(lambda: len(w.got) == 1)
            f = frame(w.by_ref("f001.png"))
            assert (f.robot, f.camera, f.seq, f.label) == ("r1", "cam2", 0, None)
            assert f.time_ns == first.stat().st_mtime_ns
            assert np.array_equal(f.image, noise(1))
            assert w.source.unacked == 1
            w.by_ref("f001.png").ack()
            w.by_ref("f001.png").ack()  # twice: counted once
            assert w.source.unacked == 0
            drop(tmp_path, "f002.png", noise(2))
            drop(tmp_path, "f001.png", noise(3))  # the camera overwrote it: a new picture
            await w.until(lambda: len(w.got) == 3)
            assert sorted(w.refs[1:]) == ["f001.png", "f002.png"]
            again = next(frame(d) for _, d in w.got[1:] if frame(d).ref == "f001.png")
            assert np.array_equal(again.image, noise(3))
            assert again.seq in (1, 2)
            assert "later.png.tmp" not in w.refs
            samples = {
                (m, tuple(sorted(labels.items()))): v for m, _t, labels, v in w.source.metric_samples()
            }
            key = (("source", "image_folder:r1/cam2"),)
            assert samples[("cellwatch_camera_frames_total", key)] == 3
            assert samples[("cellwatch_camera_pending_files", key)] == 0
            assert samples[("cellwatch_source_unacked", key)] == 2

    asyncio.run(scenario())


def test_watch_reads_a_file_only_once_it_has_settled(tmp_path: Path) -> None:
    """A file written in place (no rename) is not read while it still changes: it is read settle_s
    after its last change, whole, and never rejected as truncated."""
    settle_s = 0.8  # long against a stall of this process between the two writes on a busy machine

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        data = png_bytes(noise(4, size=32))
        source = ImageFolderSource(tmp_path, robot="r1", poll_s=0.02, settle_s=settle_s)
        async with Watcher(source) as w:
            with (tmp_path / "slow.png").open("wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                await w.until(lambda: source.pending_files == 1)  # listed, half written
                out.write(data[len(data) // 2 :])
            finished = loop.time()
            await w.until(lambda: len(w.got) == 1)
            received, delivery = w.got[0]
            assert received - finished >= settle_s
            assert np.array_equal(frame(delivery).image, noise(4, size=32))
            assert dict(source.rejections) == {}
            assert source.pending_files == 0

    asyncio.run(scenario())


def test_a_restart_scores_only_what_was_not_acknowledged(tmp_path: Path) -> None:
    """After a restart the daemon does not score acknowledged (or rejected) files again but does score
    the ones delivered and never acknowledged, and files dropped while it was down, even with an old
    mtime (moved in from elsewhere); the progress file stays small."""
    progress = tmp_path / ".cellwatch-progress.r1.cam1.json"

    async def first_run() -> None:
        for i in range(5):
            drop(tmp_path, f"f{i}.png", noise(i))
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        async with Watcher(watching(tmp_path)) as w:
            await w.until(lambda: len(w.got) == 5 and sum(w.source.rejections.values()) == 1)
            for ref in ("f0.png", "f1.png", "f3.png"):
                w.by_ref(ref).ack()

            def saved() -> bool:  # written by the source on its own, not only at close
                if not progress.exists():
                    return False
                state = json.loads(progress.read_text())
                return (
                    state["mark"] is not None and state["mark"][1] == "f1.png" and "f3.png" in state["done"]
                )

            await w.until(saved)

    async def second_run() -> None:
        drop(tmp_path, "moved_in.png", noise(10), mtime_ns=10**15)  # mtime 1970: older than everything
        async with Watcher(watching(tmp_path)) as w:
            await w.until(lambda: len(w.got) == 3)
            drop(tmp_path, "zz_sentinel.png", noise(11))  # arrives after anything left from the folder
            await w.until(lambda: "zz_sentinel.png" in w.refs)
            assert sorted(w.refs) == ["f2.png", "f4.png", "moved_in.png", "zz_sentinel.png"]
            assert np.array_equal(frame(w.by_ref("f2.png")).image, noise(2))
            assert frame(w.by_ref("moved_in.png")).time_ns == 10**15
            assert dict(w.source.rejections) == {}  # broken.png counted as done
            for _, delivery in w.got:
                delivery.ack()
        state = json.loads(progress.read_text())
        assert state["mark"][1] == "zz_sentinel.png"
        assert state["done"] == {}  # everything under the mark: nothing kept per file

    asyncio.run(first_run())
    asyncio.run(second_run())


def test_an_unreadable_progress_file_means_scoring_again_not_losing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged progress file is ignored with a warning: every file is scored again (duplicates,
    never a silently skipped frame)."""
    for i in range(2):
        drop(tmp_path, f"f{i}.png", noise(i))
    (tmp_path / ".cellwatch-progress.r1.cam1.json").write_text('{"version": 1, "mark": ')

    async def scenario() -> None:
        async with Watcher(watching(tmp_path)) as w:
            await w.until(lambda: len(w.got) == 2)
            assert sorted(w.refs) == ["f0.png", "f1.png"]

    with caplog.at_level(logging.WARNING, "ingest.camera.folder"):
        asyncio.run(scenario())
    assert "ignoring progress file" in caplog.text
