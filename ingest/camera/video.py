"""Camera frames from a video file or a network stream (rtsp://, rtsps://, http(s)://), decoded by PyAV.

    source = VideoSource("rtsp://10.0.0.7/stream1", robot="robot1", camera="cam1", max_fps=5,
                         rtsp_transport="tcp", open_timeout_s=10, reconnect_min_s=0.5,
                         reconnect_max_s=30, start_ns=None, max_pixels=MAX_FRAME_PIXELS)
    await source.start()
    async for delivery in source.deliveries():   # Delivery(Frame), nothing to acknowledge
        ...
    await source.aclose()

Every frame is decoded to uint8 RGB (H, W, 3). `Frame.seq` is its number in the source (0, 1, ... in
the order the decoder gives them, which is display order, counting every decoded frame, so skipped
or rejected ones leave gaps); `Frame.ref` is
"<file name>#<seq>" for a file and "<camera>#<seq>" for a stream; label and cycle are None.

file    (a path: the url has no "://") Read once, as fast as the pipeline takes the frames, every
        frame exactly once and in order: the reader waits while the queue is full (backpressure).
        Frame time = `start_ns` + its presentation time after the first frame's (`start_ns` None:
        the file's modification time). A file that cannot be opened, or holds no video, is an
        `IngestError` naming it, raised by `start()`; the iterator ends at the file's end.
stream  (rtsp://, rtsps://, http://, https://, ...) Frame time = the wall clock when the frame was
        decoded. A stream that cannot be opened, stalls for `open_timeout_s`, ends or breaks is
        reopened after an exponential backoff (`reconnect_min_s` doubling up to `reconnect_max_s`,
        reset by the next frame), counted and logged (rate-limited); the source never ends on its
        own. Frame numbers go on across reconnections. When the pipeline falls behind a live stream
        the oldest queued frame is dropped (counted: cellwatch_camera_frames_dropped_total): a
        camera cannot be paused, and a reader that stopped reading would only make the frames it
        hands on older (TCP) or lose packets and corrupt frames (UDP).

`max_fps` caps the rate of frames handed on: a frame less than 1/max_fps after the last one kept (on a
grid, so a 25 fps camera at max_fps 10 gives 10 fps, not 8.3) is skipped, counted
(cellwatch_camera_frames_skipped_total), not rejected. The rate is measured on the frames' presentation
timestamps (the camera's clock: network jitter and a burst after a stall do not change it; a frame
without one uses the time it was decoded). A frame with more than `max_pixels` pixels is rejected
"too_many_pixels" (before its RGB conversion); a packet the decoder refuses is rejected "decode_error";
the source goes on in both cases (rejections are logged, rate-limited, and exported as
cellwatch_rejects_total). Damage the decoder does not refuse cannot be told from a picture: the H.264
frames that reference a rejected one up to the next key frame decode with FFmpeg's concealment and are
handed on like any other.

Threading: opening, demuxing, decoding and the RGB conversion all run in the source's own thread (one
decoder thread: the scorer needs the other cores); the event loop only waits on the queue. Only that
thread touches the FFmpeg container: `aclose()` sets a stop flag that the thread sees before each packet
(live streams deliver packets many times a second) and that interrupts a backoff wait at once; a read
blocked on a stalled stream ends within `open_timeout_s` (PyAV's interrupt callback and FFmpeg's socket
timeout) and the thread then closes its container itself. `aclose()` waits for the thread up to
`CLOSE_WAIT_S`; a thread still blocked after that is a daemon thread that exits on its timeout.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import av
import av.error

from ingest.errors import IngestError
from ingest.mqtt import Backoff
from ingest.source import FRAMES, MAX_FRAME_PIXELS, Delivery, Frame, Kind, Sample, no_ack
from ingest.stream import Rejections

log = logging.getLogger(__name__)

QUEUE_FRAMES: Final = 4
"""Decoded frames waiting for the pipeline at most (a file's reader waits; a stream drops the oldest)."""
CLOSE_WAIT_S: Final = 2.0
"""How long `aclose()` waits for the reader thread (it is a daemon thread: a read blocked on a stalled
stream ends within open_timeout_s and the thread exits on its own)."""
ANALYZE_DURATION_US: Final = 500_000
"""How much of a stream FFmpeg reads to find its parameters at open (its default, 5 s, delays the first
frame by that long on a live stream; RTSP's SDP and MPEG-TS headers tell enough within 0.5 s)."""
LOG_EVERY_S: Final = 60.0
"""At most one line per this many seconds about a stream that stays down, or frames dropped."""
MAX_BAD_READS: Final = 100
"""A file whose container reads fail this many times in a row is given up (its end is taken as reached)."""

_END: Final = object()


class VideoSource:
    """A `Source` of camera frames from a video file or stream (kind "frames"); see the module doc."""

    kind: Kind = FRAMES

    def __init__(
        self,
        url: str,
        *,
        robot: str,
        camera: str = "cam1",
        max_fps: float | None = None,
        rtsp_transport: str = "tcp",
        open_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        start_ns: int | None = None,
        max_pixels: int = MAX_FRAME_PIXELS,
    ) -> None:
        if max_fps is not None and not max_fps > 0:
            raise ValueError(f"max_fps must be > 0, got {max_fps}")
        if rtsp_transport not in ("tcp", "udp"):
            raise ValueError(f"rtsp_transport must be tcp or udp, got {rtsp_transport!r}")
        if not open_timeout_s > 0:
            raise ValueError(f"open_timeout_s must be > 0, got {open_timeout_s}")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError(
                f"need 0 < reconnect_min_s <= reconnect_max_s, got {reconnect_min_s} and {reconnect_max_s}"
            )
        self.url = url
        self.is_file = "://" not in url  # as the config and the builder tell files from streams
        if not self.is_file and start_ns is not None:
            raise ValueError("start_ns is for files; a stream's frames are stamped with the wall clock")
        self.robot, self.camera = robot, camera
        self.name = f"video:{robot}/{camera}"
        self.max_fps = max_fps
        self.rtsp_transport = rtsp_transport
        self.open_timeout_s = open_timeout_s
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.start_ns = start_ns
        self.max_pixels = max_pixels
        self._ref_prefix = Path(url).name if self.is_file else camera

        # counters: written by the reader thread only (frames: by the consumer), read at any time
        self.frames = 0  # handed to the pipeline
        self.decoded = 0  # frames out of the decoder (the next Frame.seq)
        self.skipped = 0  # above max_fps
        self.dropped = 0  # a stream's oldest queued frame, the pipeline being behind
        self.reconnects = 0  # attempts to reopen a stream after it failed to open or was lost
        self.connected = False
        self.last_error: str | None = None  # why the stream last failed to open or was lost
        self._rejections = Rejections()
        self._rejections_lock = threading.Lock()

        self._items: collections.deque[Any] = collections.deque()  # Frame | _END | IngestError
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._logged_at: dict[str, float] = {}  # what -> when last logged (rate limit)
        self._failures = 0  # a stream's failures to open or keep it since its last frame

    # -- the Source protocol --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the reader thread. A file is opened before this returns (an `IngestError` names it
        when it cannot be); a stream is opened, and reopened, in the background."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"video-{self.robot}-{self.camera}", daemon=True
        )
        self._thread.start()
        if self.is_file:
            await asyncio.wrap_future(self._opened)

    async def deliveries(self) -> AsyncIterator[Delivery]:
        """Frames as they are decoded; ends at a file's end or when the source is closed."""
        if self._thread is None:
            await self.start()
        while True:
            item = await self._next()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            self.frames += 1
            yield Delivery(item, no_ack)  # a file can be read again; a stream cannot be asked again

    @property
    def rejections(self) -> dict[str, int]:
        """Frames rejected by reason: too_many_pixels, decode_error."""
        with self._rejections_lock:
            return dict(self._rejections)

    def metric_samples(self) -> list[Sample]:
        """Frames handed on, skipped (max_fps), dropped (the pipeline behind a stream), stream reopen
        attempts and whether the stream is open now (rejections are in ``cellwatch_rejects_total``)."""
        labels = {"source": self.name}
        out: list[Sample] = [
            ("cellwatch_camera_frames_total", "counter", labels, float(self.frames)),
            ("cellwatch_camera_frames_skipped_total", "counter", labels, float(self.skipped)),
        ]
        if not self.is_file:
            out += [
                ("cellwatch_camera_frames_dropped_total", "counter", labels, float(self.dropped)),
                ("cellwatch_camera_reconnects_total", "counter", labels, float(self.reconnects)),
                ("cellwatch_camera_connected", "gauge", labels, float(self.connected)),
            ]
        return out

    async def aclose(self) -> None:
        """Stop the reader thread (it closes its container) and wait for it up to CLOSE_WAIT_S."""
        self._signal_stop()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, CLOSE_WAIT_S)
            if thread.is_alive():
                log.warning(
                    "%s: the reader is blocked in a read; it ends within open_timeout_s (%g s)",
                    self.name,
                    self.open_timeout_s,
                )

    def close(self) -> None:
        """Release an unstarted source (nothing is open before start); stops a started one too."""
        self._signal_stop()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(CLOSE_WAIT_S)

    # -- the consumer side (event loop) ---------------------------------------------------------

    async def _next(self) -> Any:
        assert self._wakeup is not None
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify_all()  # a file's reader waiting for room
                    return item
                if self._stop.is_set():
                    return _END
                # cleared under the lock: an item put after this check sets the event again
                self._wakeup.clear()
            await self._wakeup.wait()

    def _signal_stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        loop, event = self._loop, self._wakeup
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(event.set)

    # -- the reader thread ----------------------------------------------------------------------

    def _put(self, item: Any) -> bool:
        """Queue an item for the consumer: a file's reader waits for room, a stream drops the oldest
        frame. False once the source is stopping."""
        with self._cond:
            while len(self._items) >= QUEUE_FRAMES and not self._stop.is_set():
                if not self.is_file:
                    self._items.popleft()
                    self.dropped += 1
                    self._log_rarely(
                        "dropped",
                        "%s: the pipeline is behind the stream: oldest frames dropped (%d so far)",
                        self.name,
                        self.dropped,
                    )
                    break
                self._cond.wait()
            if self._stop.is_set():
                return False
            self._items.append(item)
        self._wake()
        return True

    def _run(self) -> None:
        try:
            if self.is_file:
                self._read_file()
            else:
                self._read_stream()
        except BaseException as err:  # a bug: end the iterator with it rather than hang it
            log.exception("%s: reader failed", self.name)
            if not self._opened.done():
                self._opened.set_exception(err)
            self._put(IngestError(f"{self.name}: reader failed: {err!r}"))
        finally:
            self.connected = False
            if not self._opened.done():
                self._opened.set_result(None)

    def _open(self) -> Any:
        options: dict[str, str] = {}
        if not self.is_file:
            scheme = self.url.split("://", 1)[0].lower()
            if scheme in ("rtsp", "rtsps"):
                options["rtsp_transport"] = self.rtsp_transport
            # FFmpeg's socket I/O timeout (µs) of rtsp, http and tcp; PyAV's interrupt callback
            # bounds the open and every read by the same time
            options["timeout"] = str(round(self.open_timeout_s * 1e6))
            options["analyzeduration"] = str(ANALYZE_DURATION_US)
        container = av.open(self.url, options=options, timeout=(self.open_timeout_s, self.open_timeout_s))
        if not container.streams.video:
            container.close()
            raise IngestError("it holds no video stream")
        container.streams.video[0].codec_context.thread_count = 1  # the scorer needs the other cores
        return container

    def _read_file(self) -> None:
        path = Path(self.url)
        try:
            container = self._open()
        except (av.error.FFmpegError, OSError, IngestError) as err:
            self._cannot_read(path, err)
            return
        try:
            start_ns = self.start_ns if self.start_ns is not None else path.stat().st_mtime_ns
        except OSError as err:
            container.close()
            self._cannot_read(path, err)
            return
        self._opened.set_result(None)
        with container:
            self._decode(container, start_ns=start_ns)
        self._put(_END)

    def _cannot_read(self, path: Path, err: BaseException) -> None:
        """A file that cannot be opened: start() raises, and so would the iterator."""
        error = IngestError(f"video file {path}: cannot be read: {_reason(err)}")
        self._opened.set_exception(error)
        self._put(error)

    def _read_stream(self) -> None:
        backoff = Backoff(self.reconnect_min_s, self.reconnect_max_s)
        first = True
        while not self._stop.is_set():
            if not first:
                self.reconnects += 1
            first = False
            try:
                container = self._open()
            except (av.error.FFmpegError, OSError, IngestError) as err:
                self._failed(f"cannot be opened: {self._why(err)}", backoff)
                continue
            except Exception as err:  # whatever it is, a camera is retried, never given up
                log.exception("%s: opening %s failed unexpectedly", self.name, self.url)
                self._failed(f"cannot be opened: {err!r}", backoff)
                continue
            self.connected = True
            if self._failures:
                log.info("%s: stream %s is open again", self.name, self.url)
            try:
                with container:
                    got = self._decode(container, start_ns=None, on_frame=lambda: self._recovered(backoff))
                why = "ended" if got else "ended before a frame"
            except (av.error.FFmpegError, OSError) as err:
                why = f"lost: {self._why(err)}"
            except Exception as err:  # as above
                log.exception("%s: reading %s failed unexpectedly", self.name, self.url)
                why = f"failed: {err!r}"
            self.connected = False
            if not self._stop.is_set():
                self._failed(why, backoff)

    def _recovered(self, backoff: Backoff) -> None:
        """A frame came: the next failure waits reconnect_min_s again."""
        if self._failures:
            self._failures = 0
            backoff.reset()

    def _failed(self, why: str, backoff: Backoff) -> None:
        """A stream failed to open or was lost: log (rate-limited) and wait out the backoff."""
        wait = backoff.step()
        self.last_error = why
        self._failures += 1
        self._log_rarely(
            "failed",
            "%s: stream %s %s; reopening in %.1f s (%d failures in a row)",
            self.name,
            self.url,
            why,
            wait,
            self._failures,
        )
        self._stop.wait(wait)

    def _log_rarely(self, what: str, msg: str, *args: object) -> bool:
        now = time.monotonic()
        if now - self._logged_at.get(what, -LOG_EVERY_S) < LOG_EVERY_S:
            return False
        self._logged_at[what] = now
        log.warning(msg, *args)
        return True

    def _decode(self, container: Any, *, start_ns: int | None, on_frame: Any = None) -> int:
        """Decode the container's first video stream until its end or a stop; the frames handed on.
        Errors of a stream's reads propagate (the stream is reopened); a file's are rejections."""
        stream = container.streams.video[0]
        limiter = _RateLimit(self.max_fps)
        first_time: float | None = None
        last_time = 0.0
        got = 0
        bad_reads = 0
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        while not self._stop.is_set():
            try:
                for packet in container.demux(stream):
                    if self._stop.is_set():
                        return got
                    try:
                        frames = packet.decode()
                    except av.error.InvalidDataError as err:
                        self._reject("decode_error", f"{self._where()}: {_reason(err)}")
                        continue
                    for frame in frames:
                        seq = self.decoded
                        self.decoded += 1
                        if on_frame is not None:
                            on_frame()
                        if frame.width * frame.height > self.max_pixels:
                            self._reject(
                                "too_many_pixels",
                                f"{self._where()}: frame {seq} is {frame.width}x{frame.height}, more "
                                f"than {self.max_pixels} pixels",
                            )
                            continue
                        pts = frame.time  # seconds on the stream's clock, None when unknown
                        if start_ns is None:  # a stream: the wall clock when the frame was decoded
                            time_ns = time.time_ns()
                            keep = limiter.keep(pts if pts is not None else time.monotonic())
                        else:  # a file: its presentation time after the first frame's
                            if pts is None:  # no timestamp: one frame period after the last
                                pts = last_time + (1 / rate if rate else 0.0)
                            last_time = pts
                            if first_time is None:
                                first_time = pts
                            time_ns = start_ns + round((pts - first_time) * 1e9)
                            keep = limiter.keep(pts)
                        if not keep:
                            self.skipped += 1
                            continue
                        image = frame.to_ndarray(format="rgb24")
                        item = Frame(
                            robot=self.robot,
                            camera=self.camera,
                            time_ns=time_ns,
                            image=image,
                            ref=f"{self._ref_prefix}#{seq}",
                            seq=seq,
                        )
                        if not self._put(item):
                            return got
                        got += 1
                        bad_reads = 0
                return got  # the container's end
            except av.error.InvalidDataError as err:
                if not self.is_file:
                    raise
                # damaged container data in a file: counted, and reading goes on after it
                self._reject("decode_error", f"{self._where()}: {_reason(err)}")
                bad_reads += 1
                if bad_reads >= MAX_BAD_READS:
                    log.error("%s: %d damaged reads in a row: the rest is not read", self._where(), bad_reads)
                    return got
            except (av.error.FFmpegError, OSError) as err:
                if not self.is_file:
                    raise
                log.error("%s: read failed, the rest is not read: %s", self._where(), _reason(err))
                return got
        return got

    def _why(self, err: BaseException) -> str:
        if isinstance(err, av.error.ExitError):  # PyAV's interrupt callback: the timeout passed
            return f"no data for open_timeout_s ({self.open_timeout_s:g} s)"
        return _reason(err)

    def _reject(self, reason: str, text: str) -> None:
        with self._rejections_lock:
            self._rejections.add(reason, text, log)

    def _where(self) -> str:
        return f"video file {self.url}" if self.is_file else f"{self.name} ({self.url})"


class _RateLimit:
    """Keeps frames at most `max_fps` per second of their clock, on a grid: a frame is kept when it is
    no earlier than a tenth of a period before the next slot (timestamp jitter), and a kept frame moves
    the slot on by one period, so over any stretch the kept rate does not exceed max_fps however the
    times wobble. A gap (or a clock going back: a new stream session) restarts the grid there."""

    def __init__(self, max_fps: float | None) -> None:
        self.period = 1.0 / max_fps if max_fps else 0.0
        self.due: float | None = None
        self.last: float | None = None

    def keep(self, t: float) -> bool:
        if not self.period:
            return True
        last, self.last = self.last, t
        if self.due is None or (last is not None and t < last) or t >= self.due + self.period:
            self.due = t + self.period
            return True
        if t >= self.due - self.period / 10:
            self.due += self.period
            return True
        return False


def _reason(err: BaseException) -> str:
    """FFmpeg's message without PyAV's errno and file name decoration."""
    if isinstance(err, av.error.FFmpegError):
        return str(err.strerror or err)
    return str(err)
