"""Camera frames from PNG/JPEG files in a folder: watched for new files, or replayed once.

    source = ImageFolderSource("camera/incoming", robot="robot1", camera="cam1", mode="watch")
    await source.start()
    async for delivery in source.deliveries():   # Delivery(Frame); ack once its points are written
        ...

replay  An MVTec-layout folder (it has test/) gives its test split: test/good, then every defect folder
        in sorted order, each file in name order, `Frame.label` the folder's name and `Frame.ref` the
        path under the folder ("test/hole/003.png"). Any other folder gives its own PNG/JPEG files in
        name order (not recursive, label None). Each file once, then the iterator ends; frame i is
        stamped `start_ns + i * interval_s`. Nothing to acknowledge: the files can be read again.

watch   The folder is listed every `poll_s`; a PNG/JPEG file is read once its inode, size and mtime
        have stayed the same for `settle_s` (so a file still being written is not read half-way).
        Dotfiles and names ending in .tmp/.part are never read: write under such a name, then rename.
        A frame is stamped with its file's mtime. A file rewritten in place or replaced (new inode,
        size or mtime) is a new frame. The iterator ends only when the source is closed.

        At-least-once across restarts: what the pipeline acknowledged is remembered in a small progress
        file inside the folder (`.cellwatch-progress.<robot>.<camera>.json`, replaced atomically at
        most once per `poll_s`), so a restarted daemon does not score an acknowledged file again but
        does score one that was delivered and never acknowledged. It holds a high-water mark (the
        largest key (ctime_ns, name) with every file at or below it done) and the names of the done
        files above it, so it stays small however many files the folder keeps. Files are ordered by
        ctime, not mtime: a rename sets ctime, so a file moved in with an old mtime (mv, cp -p,
        rsync -t) still sorts after everything that was there before and is not mistaken for done.
        A rejected file counts as done. An unreadable or corrupt progress file is ignored with a
        warning (everything still in the folder is scored again: duplicates, never losses).

A file that is not an image we accept (too large, too many pixels, truncated, corrupt, not PNG/JPEG
inside) is rejected by reason in `rejections`, logged (rate-limited), and never yielded; the source
goes on. Decoding, listing and the progress file's writes run on the source's own worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from ingest.errors import IngestError
from ingest.images import ImageRejected, read_image
from ingest.source import FRAMES, MAX_FRAME_BYTES, MAX_FRAME_PIXELS, Delivery, Frame, Kind, Sample, no_ack
from ingest.stream import Rejections, once

log = logging.getLogger(__name__)

SUFFIXES: Final = (".png", ".jpg", ".jpeg")
TEMP_SUFFIXES: Final = (".tmp", ".part")
MODES: Final = ("watch", "replay")
PROGRESS_VERSION: Final = 1
MAX_DONE_REMEMBERED: Final = 10_000
"""Done files above the high-water mark kept in the progress file at most (the lowest are dropped:
after a restart those are scored again, never skipped)."""
MAX_PROGRESS_BYTES: Final = 16 * 2**20
_INT64_MAX: Final = 2**63 - 1
_ERROR_LOG_EVERY_S: Final = 60.0

_WAITING, _PENDING, _DONE = "waiting", "pending", "done"
Key = tuple[int, str]  # (ctime_ns, name): the order files arrived in


def is_image_name(name: str) -> bool:
    """Whether watch mode reads a file of this name: PNG/JPEG, not a dotfile, not a temp name."""
    lower = name.lower()
    return not name.startswith(".") and not lower.endswith(TEMP_SUFFIXES) and lower.endswith(SUFFIXES)


@dataclass
class _File:
    """A file of the watched folder as last listed."""

    sig: tuple[int, int, int]  # (inode, size, mtime_ns): a change is a new version of the file
    ctime_ns: int
    seen: float  # loop time `sig` was first listed
    state: str  # waiting (to settle / to be read), pending (delivered, not acked), done
    gen: int  # bumped on every new version: an ack of an older version is stale


@dataclass(frozen=True)
class _Progress:
    mark: Key | None
    done: dict[str, int]  # name -> ctime_ns of done files above the mark

    def covers(self, name: str, ctime_ns: int) -> bool:
        return (self.mark is not None and (ctime_ns, name) <= self.mark) or self.done.get(name) == ctime_ns

    def to_json(self) -> str:
        mark = None if self.mark is None else [self.mark[0], self.mark[1]]
        return json.dumps({"version": PROGRESS_VERSION, "mark": mark, "done": self.done}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> _Progress:
        """Parse a progress file; raises ValueError when it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != PROGRESS_VERSION:
            raise ValueError(f"not a version {PROGRESS_VERSION} progress file")
        raw_mark, raw_done = data.get("mark"), data.get("done")
        mark: Key | None = None
        if raw_mark is not None:
            if not (
                isinstance(raw_mark, list)
                and len(raw_mark) == 2
                and type(raw_mark[0]) is int
                and isinstance(raw_mark[1], str)
            ):
                raise ValueError(f"mark is not [ctime_ns, name]: {raw_mark!r:.80}")
            mark = (raw_mark[0], raw_mark[1])
        if not isinstance(raw_done, dict) or not all(type(v) is int for v in raw_done.values()):
            raise ValueError("done is not a map of name to ctime_ns")
        return cls(mark, dict(raw_done))


EMPTY_PROGRESS: Final = _Progress(None, {})


class ImageFolderSource:
    """A `Source` of camera `Frame`s from image files (see the module docstring for both modes)."""

    kind: Kind = FRAMES

    def __init__(
        self,
        path: Path | str,
        *,
        robot: str,
        camera: str = "cam1",
        mode: str = "watch",
        poll_s: float = 0.5,
        settle_s: float = 0.5,
        interval_s: float = 1.0,
        start_ns: int | None = None,
        cycle_pattern: str | None = None,
        max_bytes: int = MAX_FRAME_BYTES,
        max_pixels: int = MAX_FRAME_PIXELS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        if not settle_s >= 0:
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.cycle_re = re.compile(cycle_pattern) if cycle_pattern is not None else None
        if self.cycle_re is not None and "cycle" not in self.cycle_re.groupindex:
            raise ValueError("cycle_pattern needs a group named 'cycle', e.g. (?P<cycle>\\d+)")
        self.path = Path(path)
        if not self.path.exists():
            raise IngestError(f"{self.path}: image folder does not exist")
        if not self.path.is_dir():
            raise IngestError(f"{self.path}: not a folder")
        self.robot, self.camera, self.mode = robot, camera, mode
        self.name = f"image_folder:{robot}/{camera}"
        self.poll_s, self.settle_s, self.interval_s = poll_s, settle_s, interval_s
        self.start_ns = time.time_ns() if start_ns is None else int(start_ns)
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{robot}.{camera}")
        self.progress_path = self.path / f".cellwatch-progress.{safe}.json"
        self.rejections = Rejections()
        self.frames = 0
        self.errors: dict[str, int] = {}  # "list" / "progress" -> failures of the folder itself
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"camera-{robot}-{camera}")
        self._lock = threading.Lock()  # acks may come from any thread
        self._files: dict[str, _File] = {}
        self._progress = EMPTY_PROGRESS  # as loaded at start, consulted for the first listing only
        self._mark: Key | None = None
        self._listed = False
        self._dirty = False
        self._unacked = 0
        self._gen = 0
        self._started = False
        self._closed = False
        self._saver: asyncio.Task[None] | None = None
        self._error_logged: dict[str, float] = {}
        self._cycle_miss_logged = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Watch: load the progress file and start saving acknowledgements. Replay: nothing to open."""
        if self._started:
            return
        self._started = True
        if self.mode == "watch":
            loop = asyncio.get_running_loop()
            self._progress = await loop.run_in_executor(self._thread, self._load_progress)
            self._mark = self._progress.mark
            self._saver = asyncio.create_task(self._save_loop(), name=f"{self.name} progress")

    def deliveries(self) -> AsyncIterator[Delivery]:
        return self._watch() if self.mode == "watch" else self._replay()

    async def aclose(self) -> None:
        """Stop saving, write the last acknowledgements, release the worker thread."""
        if self._closed:
            return
        self._closed = True
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
            await self._save()
        await asyncio.to_thread(self._thread.shutdown, wait=True)

    def close(self) -> None:
        """Release an unstarted source (nothing is open before start but the worker thread)."""
        self._closed = True
        self._thread.shutdown(wait=True)

    # -- metrics ---------------------------------------------------------------------------------

    @property
    def pending_files(self) -> int:
        """Watch: files listed and not yet delivered (settling, or waiting to be read)."""
        with self._lock:
            return sum(1 for f in self._files.values() if f.state == _WAITING)

    @property
    def unacked(self) -> int:
        """Watch: frames delivered and not acknowledged yet."""
        return self._unacked

    def metric_samples(self) -> list[Sample]:
        """Frames delivered; in watch mode files waiting, frames unacknowledged and failures to list the
        folder or write the progress file (rejected files are in ``cellwatch_rejects_total``)."""
        labels = {"source": self.name}
        out: list[Sample] = [("cellwatch_camera_frames_total", "counter", labels, float(self.frames))]
        if self.mode == "watch":
            out.append(("cellwatch_camera_pending_files", "gauge", labels, float(self.pending_files)))
            out.append(("cellwatch_source_unacked", "gauge", labels, float(self._unacked)))
            out.extend(
                ("cellwatch_camera_folder_errors_total", "counter", {**labels, "op": op}, float(n))
                for op, n in sorted(self.errors.items())
            )
        return out

    # -- frames ----------------------------------------------------------------------------------

    def _cycle(self, name: str) -> int | None:
        if self.cycle_re is None:
            return None
        match = self.cycle_re.search(name)
        value = match.group("cycle") if match is not None else None
        try:
            cycle = int(value) if value is not None else None
        except ValueError:  # a group that matched something else than digits
            cycle = None
        if cycle is not None and -_INT64_MAX <= cycle <= _INT64_MAX:
            return cycle
        if not self._cycle_miss_logged:
            self._cycle_miss_logged = True
            log.warning(
                "%s: %r gives no cycle number from file name %r", self.name, self.cycle_re.pattern, name
            )
        return None

    def _frame(self, image: np.ndarray, time_ns: int, ref: str, name: str, label: str | None) -> Frame:
        frame = Frame(
            robot=self.robot,
            camera=self.camera,
            time_ns=time_ns,
            image=image,
            ref=ref,
            seq=self.frames,
            cycle=self._cycle(name),
            label=label,
        )
        self.frames += 1
        return frame

    def _read(self, path: Path) -> np.ndarray:
        return read_image(path, max_bytes=self.max_bytes, max_pixels=self.max_pixels)

    def _reject(self, err: ImageRejected) -> None:
        self.rejections.add(err.reason, f"{self.name}: {err}", log)

    # -- replay ----------------------------------------------------------------------------------

    def _replay_files(self) -> list[tuple[Path, str | None]]:
        """(path, label) of every file to replay, in order."""

        def images(folder: Path) -> list[Path]:
            return sorted(p for p in folder.iterdir() if is_image_name(p.name) and p.is_file())

        test = self.path / "test"
        if not test.is_dir():
            return [(p, None) for p in images(self.path)]
        folders = sorted((p for p in test.iterdir() if p.is_dir()), key=lambda p: (p.name != "good", p.name))
        return [(p, folder.name) for folder in folders for p in images(folder)]

    async def _replay(self) -> AsyncIterator[Delivery]:
        await self.start()
        loop = asyncio.get_running_loop()
        files = await loop.run_in_executor(self._thread, self._replay_files)
        if not files:
            log.warning("%s: no PNG/JPEG files in %s", self.name, self.path)
        for path, label in files:
            try:
                image = await loop.run_in_executor(self._thread, self._read, path)
            except ImageRejected as err:
                self._reject(err)
                continue
            time_ns = self.start_ns + round(self.frames * self.interval_s * 1e9)
            ref = path.relative_to(self.path).as_posix()
            yield Delivery(self._frame(image, time_ns, ref, path.name, label), no_ack)

    # -- watch -----------------------------------------------------------------------------------

    async def _watch(self) -> AsyncIterator[Delivery]:
        await self.start()
        loop = asyncio.get_running_loop()
        first = True
        while True:
            if not first:
                await asyncio.sleep(self.poll_s)
            first = False
            for name, gen, sig in await self._poll(loop):
                delivery = await self._watch_read(loop, name, gen, sig)
                if delivery is not None:
                    yield delivery

    def _list(self) -> list[tuple[str, int, int, int, int]]:
        """(name, inode, size, mtime_ns, ctime_ns) of the image files in the folder (worker thread)."""
        out = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not is_image_name(entry.name):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except OSError:  # gone since the listing
                    continue
                out.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return out

    async def _poll(self, loop: asyncio.AbstractEventLoop) -> list[tuple[str, int, tuple[int, int, int]]]:
        """List the folder, update what is known of each file; returns the files now settled, in
        arrival order (name, version, signature)."""
        try:
            listing = await loop.run_in_executor(self._thread, self._list)
        except OSError as err:
            self._error("list", f"cannot list {self.path}: {err}")
            return []
        now = loop.time()
        ready: list[tuple[Key, str, int, tuple[int, int, int]]] = []
        with self._lock:
            present = {row[0] for row in listing}
            for name in [n for n in self._files if n not in present]:
                del self._files[name]  # deleted or renamed away: a late ack of it has nothing to mark
                self._dirty = True
            for name, ino, size, mtime_ns, ctime_ns in listing:
                sig = (ino, size, mtime_ns)
                known = self._files.get(name)
                if known is None:
                    done = not self._listed and self._progress.covers(name, ctime_ns)
                    self._gen += 1
                    known = _File(sig, ctime_ns, now, _DONE if done else _WAITING, self._gen)
                    self._files[name] = known
                elif known.sig != sig:  # rewritten or replaced: a new frame (once it settles)
                    self._gen += 1
                    known.sig, known.ctime_ns, known.seen = sig, ctime_ns, now
                    known.state, known.gen = _WAITING, self._gen
                    self._dirty = True
                elif known.ctime_ns != ctime_ns:  # chmod, chown, a new hard link: the same content
                    known.ctime_ns = ctime_ns
                    self._dirty = True
                if known.state == _WAITING and now - known.seen >= self.settle_s:
                    ready.append(((known.ctime_ns, name), name, known.gen, sig))
            if not self._listed:
                self._listed = True
                self._progress = EMPTY_PROGRESS  # every file present is now classified
        ready.sort()
        return [(name, gen, sig) for _key, name, gen, sig in ready]

    def _read_settled(self, name: str, sig: tuple[int, int, int]) -> tuple[np.ndarray | None, int]:
        """Read a settled file unless it changed or went away since it was listed (worker thread)."""
        path = self.path / name
        try:
            st = path.stat()
        except FileNotFoundError:
            return None, 0
        except OSError as err:  # permission denied and the like: rejected, not the end of the source
            raise ImageRejected("unreadable", f"{path}: {err.strerror or err}") from err
        if (st.st_ino, st.st_size, st.st_mtime_ns) != sig:
            return None, 0  # changed: the next listing sees the new version
        try:
            return self._read(path), st.st_mtime_ns
        except ImageRejected as err:
            if isinstance(err.__cause__, FileNotFoundError):
                return None, 0
            raise

    async def _watch_read(
        self, loop: asyncio.AbstractEventLoop, name: str, gen: int, sig: tuple[int, int, int]
    ) -> Delivery | None:
        with self._lock:
            known = self._files.get(name)
            if known is None or known.gen != gen or known.state != _WAITING:
                return None
        try:
            image, mtime_ns = await loop.run_in_executor(self._thread, self._read_settled, name, sig)
        except ImageRejected as err:
            self._reject(err)
            self._set_state(name, gen, _DONE)  # a rejected file is done: never retried
            return None
        if image is None:
            return None  # changed or gone: the next listing decides
        self._set_state(name, gen, _PENDING)
        ack = once(lambda: self._acked(name, gen))
        return Delivery(self._frame(image, mtime_ns, name, name, None), ack)

    def _set_state(self, name: str, gen: int, state: str) -> None:
        with self._lock:
            if state == _PENDING:
                self._unacked += 1
            known = self._files.get(name)
            if known is not None and known.gen == gen:
                known.state = state
                self._dirty = True

    def _acked(self, name: str, gen: int) -> None:
        with self._lock:
            self._unacked -= 1
            known = self._files.get(name)
            if known is not None and known.gen == gen and known.state == _PENDING:
                known.state = _DONE
                self._dirty = True

    # -- progress file ---------------------------------------------------------------------------

    def _snapshot(self) -> _Progress:
        """What is done now (under the lock): the largest key with nothing open at or below it, and
        the done files above it. Open files (settling, unacked) keep the mark below them."""
        open_keys = [(f.ctime_ns, n) for n, f in self._files.items() if f.state != _DONE]
        low = min(open_keys) if open_keys else None
        done_keys = [(f.ctime_ns, n) for n, f in self._files.items() if f.state == _DONE]
        below = [k for k in done_keys if low is None or k < low]
        if self._mark is not None and (low is None or self._mark < low):
            below.append(self._mark)  # the old mark holds still: everything under it stayed done
        self._mark = max(below) if below else None
        mark = self._mark
        above = sorted(k for k in done_keys if mark is None or k > mark)
        if len(above) > MAX_DONE_REMEMBERED:  # scored again after a restart, not lost
            above = above[-MAX_DONE_REMEMBERED:]
        return _Progress(mark, {n: c for c, n in above})

    async def _save(self) -> None:
        with self._lock:
            if not self._dirty or not self._listed:
                return
            self._dirty = False
            text = self._snapshot().to_json()
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write_progress, text)
        except OSError as err:
            with self._lock:
                self._dirty = True
            self._error("progress", f"cannot write {self.progress_path}: {err}")

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._save()

    def _write_progress(self, text: str) -> None:
        tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.progress_path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _load_progress(self) -> _Progress:
        try:
            if self.progress_path.stat().st_size > MAX_PROGRESS_BYTES:
                raise ValueError(f"larger than {MAX_PROGRESS_BYTES} bytes")
            return _Progress.from_json(self.progress_path.read_text())
        except FileNotFoundError:
            return EMPTY_PROGRESS
        except (OSError, ValueError, UnicodeDecodeError) as err:
            log.warning(
                "%s: ignoring progress file %s (%s): files in the folder are scored again",
                self.name,
                self.progress_path,
                err,
            )
            return EMPTY_PROGRESS

    def _error(self, op: str, text: str) -> None:
        self.errors[op] = self.errors.get(op, 0) + 1
        now = time.monotonic()
        if now - self._error_logged.get(op, -_ERROR_LOG_EVERY_S) >= _ERROR_LOG_EVERY_S:
            self._error_logged[op] = now
            log.error("%s: %s (%d so far)", self.name, text, self.errors[op])
