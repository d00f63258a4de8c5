"""The EtherCAT source: a capture file replayed at its own pace (or faster), or the live bus on an
interface, as a robot's signal messages (the common source shape, kind "signals").

    records (pcap.CaptureReader | LiveCapture) -> frames.FrameDecoder -> mapping.SignalExtractor
        -> resample.Resampler (the model's grid, by capture time) -> resample.CycleCutter -> SignalBatch

All of the decoding runs on the source's worker thread; the event loop only awaits batches of messages.
Nothing needs acknowledging: a capture file can be read again, and the bus does not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import numpy as np

from ingest.errors import IngestError
from ingest.ethercat.frames import FrameDecoder
from ingest.ethercat.mapping import (
    MapError,
    ProcessMap,
    SignalExtractor,
    check_coverage,
    load_eni,
    load_yaml_map,
)
from ingest.ethercat.pcap import CaptureReader
from ingest.ethercat.resample import MAX_JUMP_NS, CycleCutter, Resampler
from ingest.ethercat.types import ETHERTYPE, LINKTYPE_ETHERNET, LOGICAL, DatagramKey, FrameBatch, RecordBatch
from ingest.messages import SignalBatch
from ingest.source import SIGNALS, Delivery, Kind, Sample, no_ack
from ingest.stream import SourceUnavailable

log = logging.getLogger(__name__)

CHECK_FRAMES: Final = 256  # frames of process data the map is checked against (or CHECK_SPAN_NS of them)
CHECK_SPAN_NS: Final = 1_000_000_000
RARE_SHARE: Final = 0.05  # a datagram in fewer than 5 % of the frames the most common one is in: damage
LIVE_BATCH_FRAMES: Final = 4096
LIVE_BATCH_S: Final = 0.05
MAX_FRAME: Final = 9216  # a jumbo frame; EtherCAT frames are at most 1514 bytes


def load_map(path: Path) -> ProcessMap:
    """An ENI (XML) or a YAML map, told apart by the file's first bytes."""
    with Path(path).open("rb") as fh:
        head = fh.read(512).lstrip()
    return load_eni(path) if head.startswith(b"<") else load_yaml_map(path)


class BusChain:
    """Records → signal messages of one robot: decoding, mapping, resampling and cycle cutting, with
    the counts of every stage. Synchronous (the source runs it on its worker thread)."""

    def __init__(
        self,
        pmap: ProcessMap,
        *,
        robot: str,
        signals: Sequence[str],
        period_ns: int,
        max_rows: int = 100,
    ) -> None:
        missing = [s for s in signals if s not in pmap.names]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise MapError(f"{pmap.source}: the model's signals {shown} are not in the map")
        self.pmap = pmap
        self.decoder = FrameDecoder(dict(pmap.expected_wkc.items()))
        self.extractor = SignalExtractor(pmap)
        names = list(pmap.names)
        cycle = names.index(pmap.cycle_signal) if pmap.cycle_signal else None
        self.resampler = Resampler(period_ns, cycle_column=cycle)
        self.cutter = CycleCutter(
            robot, period_ns, np.array([names.index(s) for s in signals]), max_rows=max_rows
        )
        self.checked = False
        self._pending: list[FrameBatch] = []  # decoded while the map is not checked yet (bounded below)
        self._key_frames: Counter[DatagramKey] = Counter()  # frames per datagram before the check
        self.last_ts: int | None = None
        self.period_ns = int(period_ns)
        self.slow_bus_warned = False

    def feed(self, records: RecordBatch) -> list[SignalBatch]:
        frames = self.decoder.decode(records)
        if self.checked:
            return self._signals(frames)
        # the map is checked against what the bus carries over its first CHECK_FRAMES frames of process
        # data (or CHECK_SPAN_NS of capture time): one batch is too little (one damaged frame in it is a
        # second datagram "holding" the signals; a slow task's datagram may not have come yet)
        self._pending.append(frames)
        for key, cols in frames.datagrams.items():
            self._key_frames[key] += len(cols.frame)
        logical = [n for k, n in self._key_frames.items() if k.command in LOGICAL]
        if not logical:
            self._pending = [f for f in self._pending if f.datagrams][-4:]  # start-up register traffic
            return []
        times = np.concatenate([f.ts_ns for f in self._pending]) if self._pending else np.empty(0, np.int64)
        steps = np.diff(times)
        span = int(
            steps[(steps >= 0) & (steps <= MAX_JUMP_NS)].sum()
        )  # a damaged far-ahead time ends nothing
        if max(logical) < CHECK_FRAMES and span < CHECK_SPAN_NS:
            return []
        return self._check_and_release()

    def _check_and_release(self) -> list[SignalBatch]:
        """Check the map against the datagrams the bus carries regularly (a key seen in fewer than
        RARE_SHARE of the most common one's frames is damage, not a datagram of the bus), bind the
        signals to them, then decode what was held meanwhile."""
        top = max((n for k, n in self._key_frames.items() if k.command in LOGICAL), default=0)
        # a datagram seen once is damage in a long capture, but may be all there is of a short (cut) one
        floor = 2 if top >= 2 / RARE_SHARE else 1
        regular = [k for k, n in self._key_frames.items() if n >= max(floor, RARE_SHARE * top)]
        check_coverage(self.pmap, regular)  # raises MapError naming what no datagram holds
        self.extractor.bind(regular)
        self.checked = True
        pending, self._pending = self._pending, []
        out: list[SignalBatch] = []
        for frames in pending:
            out += self._signals(frames)
        return out

    def _signals(self, frames: FrameBatch) -> list[SignalBatch]:
        rows = self.extractor.extract(frames)
        if len(rows):
            self.last_ts = int(rows.ts_ns[-1])
        out: list[SignalBatch] = []
        for start, means, cycles in self.resampler.push(rows.ts_ns, rows.values, rows.stale):
            out += self.cutter.push(start, means, cycles)
        self._check_rate()
        return out

    def _check_rate(self) -> None:
        """A bus slower than the model's grid leaves grid samples empty (gaps everywhere): said once, with
        the voraus reader's tolerance on rates."""
        from ingest.voraus.schema import RATE_TOLERANCE

        period = self.resampler.stats.period_ns
        if self.slow_bus_warned or period is None or period <= self.period_ns * (1 + RATE_TOLERANCE):
            return
        self.slow_bus_warned = True
        log.warning(
            "%s: the bus runs at %.4g Hz, slower than the model's %.4g Hz grid: most grid samples are gaps",
            self.pmap.source,
            1e9 / period,
            1e9 / self.period_ns,
        )

    def finish(self) -> list[SignalBatch]:
        out: list[SignalBatch] = []
        if not self.checked and any(k.command in LOGICAL for k in self._key_frames):
            out += self._check_and_release()  # a capture shorter than the check window
        for start, means, cycles in self.resampler.flush():
            out += self.cutter.push(start, means, cycles)
        return out + self.cutter.finish()

    @property
    def rejections(self) -> Counter[str]:
        return Counter(self.decoder.rejections)


class LiveCapture:
    """EtherCAT frames from a network interface: an AF_PACKET socket with a BPF filter on EtherType
    0x88A4 (needs CAP_NET_RAW, which the unit's capture drop-in grants), kernel timestamps (SO_TIMESTAMPNS).
    `batches()` yields a RecordBatch of the frames that came in within LIVE_BATCH_S of a batch's first one
    (at most LIVE_BATCH_FRAMES) until `stop()`.

    The socket is bound to `interface` before it takes any frame (it is opened for no protocol, filtered,
    then bound for 0x88A4), so a frame of another interface is never seen, not even while it opens. Its
    receive buffer is RCVBUF (as far as `net.core.rmem_max` allows without CAP_NET_ADMIN): a 4 kHz bus
    of 1500-byte frames fills the default 208 KiB in about 25 ms. Frames the kernel still had to drop (a
    full buffer) are counted in `counts["kernel_drops"]` and logged."""

    RCVBUF: Final = 4 * 2**20  # receive buffer: a few hundred ms of a 4 kHz bus of full-size frames
    _SOL_PACKET: Final = getattr(socket, "SOL_PACKET", 263)
    _PACKET_STATISTICS: Final = 6

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._stop = threading.Event()
        self._reading = False
        self.counts: Counter[str] = Counter()
        try:
            # protocol 0: the socket takes no frames until bind() names the interface and the EtherType
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as err:
            raise IngestError(f"live capture on {interface}: {err.strerror} (needs CAP_NET_RAW)") from err
        try:
            self._attach_filter()
            self._grow_buffer()
            self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_TIMESTAMPNS", 35), 1)
            self.sock.bind((interface, ETHERTYPE))
            self.sock.settimeout(0.2)
        except OSError as err:
            self.sock.close()
            raise IngestError(f"live capture on {interface}: {err.strerror or err}") from err

    def _attach_filter(self) -> None:
        # ldh [12]; jeq #0x88a4, accept, drop; accept: ret #65535; drop: ret #0
        program = [(0x28, 0, 0, 12), (0x15, 0, 1, ETHERTYPE), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
        code = b"".join(struct.pack("HBBI", *ins) for ins in program)
        buf = ctypes.create_string_buffer(code)
        fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
        self._filter = buf  # kept alive while attached
        self.sock.setsockopt(socket.SOL_SOCKET, 26, fprog)  # SO_ATTACH_FILTER

    def _grow_buffer(self) -> None:
        try:  # beyond net.core.rmem_max: needs CAP_NET_ADMIN
            self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), self.RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)

    def _kernel_drops(self) -> None:
        """PACKET_STATISTICS (read and reset by the kernel): frames dropped for a full receive buffer."""
        try:
            _packets, drops = struct.unpack(
                "II", self.sock.getsockopt(self._SOL_PACKET, self._PACKET_STATISTICS, 8)
            )
        except OSError:
            return
        if drops:
            self.counts["kernel_drops"] += drops
            log.warning(
                "live capture on %s: the kernel dropped %d frames (receive buffer full: the decoding falls "
                "behind the bus)",
                self.interface,
                drops,
            )

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop; a capture whose `batches()` never ran releases its socket here (`batches()` closes it
        when it ends)."""
        self._stop.set()
        if not self._reading:
            self.sock.close()

    def batches(self) -> Iterator[RecordBatch]:
        ancillary = socket.CMSG_SPACE(16)
        self._reading = True
        try:
            while not self._stop.is_set():
                frames: list[bytes] = []
                stamps: list[int] = []
                deadline = math.inf  # from the batch's first frame: after a quiet spell, not a batch of one
                while len(frames) < LIVE_BATCH_FRAMES and time.monotonic() < deadline:
                    try:
                        data, anc, _flags, _addr = self.sock.recvmsg(MAX_FRAME, ancillary)
                    except TimeoutError:
                        break
                    except OSError as err:
                        if self._stop.is_set():
                            return
                        self.counts["recv_errors"] += 1
                        log.warning("live capture on %s: %s", self.interface, err)
                        break
                    stamp = time.time_ns()
                    for level, kind, value in anc:
                        if level == socket.SOL_SOCKET and kind == getattr(socket, "SO_TIMESTAMPNS", 35):
                            sec, nsec = struct.unpack("qq", value[:16])
                            stamp = sec * 1_000_000_000 + nsec
                    if not frames:
                        deadline = time.monotonic() + LIVE_BATCH_S
                    frames.append(data)
                    stamps.append(stamp)
                self._kernel_drops()
                if frames:
                    self.counts["frames"] += len(frames)
                    yield _records(stamps, frames)
        finally:
            self.sock.close()


def _records(stamps: list[int], frames: list[bytes]) -> RecordBatch:
    lengths = np.array([len(f) for f in frames], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.int64)
    return RecordBatch(
        ts_ns=np.array(stamps, dtype=np.int64),
        linktype=np.full(len(frames), LINKTYPE_ETHERNET, dtype=np.int32),
        offsets=offsets,
        lengths=lengths,
        wire_lengths=lengths.copy(),
        buf=np.frombuffer(b"".join(frames), dtype=np.uint8),
    )


class EthercatSource:
    """Robot signals off the EtherCAT bus (a capture file, or live on `interface`), mapped by an ENI or a
    YAML map, resampled onto the signal model's grid (`rate_hz`), cut into cycles by the map's
    `cycle_signal`. A file is replayed at `speed` x its own pace (capture time; inf: as fast as it
    decodes) and ends; a live capture runs until closed."""

    kind: Kind = SIGNALS

    def __init__(
        self,
        *,
        robot: str | None,
        map_path: Path,
        signals: Sequence[str],
        rate_hz: float,
        capture: Path | None = None,
        interface: str | None = None,
        speed: float = 1.0,
        max_rows: int = 100,
        chunk_records: int = 16384,
    ) -> None:
        if (capture is None) == (interface is None):
            raise ValueError("give a capture file or an interface, not both")
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.map_path = Path(map_path)
        self.pmap = load_map(self.map_path)  # raises MapError naming the entry
        self.robot = robot or self.pmap.robot or "robot1"
        self.name = f"ethercat:{self.robot}"
        self.capture = Path(capture) if capture is not None else None
        self.interface = interface
        self.speed = speed
        self.chunk_records = chunk_records
        self.chain = BusChain(
            self.pmap, robot=self.robot, signals=signals, period_ns=round(1e9 / rate_hz), max_rows=max_rows
        )
        self._reader: CaptureReader | None = None
        self._live: LiveCapture | None = None
        if self.capture is not None:
            self._reader = CaptureReader(self.capture, chunk_records=chunk_records)  # CaptureError at once
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ethercat-{self.robot}")
        self.messages = 0
        self._iter: Iterator[RecordBatch] | None = None
        self._early: list[SignalBatch] = []  # messages made while start() checked the map

    async def start(self) -> None:
        """Live: open the socket (SourceUnavailable when it cannot be). A capture: read up to its first
        process data, so that a map that does not fit the capture fails here, at start-up (MapError)."""
        if self.interface is not None:
            try:
                self._live = await asyncio.to_thread(LiveCapture, self.interface)
            except IngestError as err:
                raise SourceUnavailable(str(err)) from err
            return
        loop = asyncio.get_running_loop()
        self._early = await loop.run_in_executor(self._thread, self._prime)

    def _prime(self, batches: int = 64) -> list[SignalBatch]:
        records = self._iterator()
        out: list[SignalBatch] = []
        for _ in range(batches):
            batch = next(records, None)
            if batch is None:
                break
            out += self.chain.feed(batch)
            if self.chain.checked:
                break
        return out

    def _iterator(self) -> Iterator[RecordBatch]:
        if self._iter is None:
            if self._reader is not None:
                self._iter = self._reader.batches()
            else:
                assert self._live is not None, "start() the live source first"
                self._iter = self._live.batches()
        return self._iter

    async def deliveries(self) -> AsyncIterator[Delivery]:
        loop = asyncio.get_running_loop()
        records = self._iterator()
        sentinel = object()
        early, self._early = self._early, []

        def step() -> list[SignalBatch] | object:
            batch = next(records, sentinel)
            if batch is sentinel:
                return sentinel
            assert isinstance(batch, RecordBatch)
            return self.chain.feed(batch)

        paced_from: tuple[float, int] | None = None  # (loop time, capture time) of the first message
        try:
            while True:
                try:
                    got = early if early else await loop.run_in_executor(self._thread, step)
                except RuntimeError:  # closed meanwhile (aclose shut the worker down): the source ends
                    return
                early = []
                messages = self.chain.finish() if got is sentinel else got
                assert isinstance(messages, list)
                for message in messages:
                    if self._reader is not None and math.isfinite(self.speed):
                        end_ns = message.time_ns + len(message.signals) * message.period_ns
                        if paced_from is None:
                            paced_from = (loop.time(), message.time_ns)
                        delay = paced_from[0] + (end_ns - paced_from[1]) / 1e9 / self.speed - loop.time()
                        if delay > 0:  # the capture's own pace: a message is complete at its end
                            await asyncio.sleep(delay)
                    self.messages += 1
                    yield Delivery(message, no_ack)
                if got is sentinel:
                    return
        finally:
            if self._live is not None:
                self._live.stop()
            with contextlib.suppress(Exception):
                records.close()  # type: ignore[attr-defined]

    @property
    def rejections(self) -> dict[str, int]:
        counts = Counter(self.chain.rejections)
        if self._reader is not None:
            counts.update(self._reader.rejections)
        return dict(counts)

    def metric_samples(self) -> list[Sample]:
        labels = {"source": self.name}
        stats = self.chain.resampler.stats
        counts = self.chain.decoder.counts
        out: list[Sample] = [
            ("cellwatch_ethercat_frames_total", "counter", labels, float(counts.get("frames", 0))),
            ("cellwatch_ethercat_bus_cycles_total", "counter", labels, float(stats.bus_cycles)),
            ("cellwatch_ethercat_stale_total", "counter", labels, float(stats.stale)),
            ("cellwatch_ethercat_lost_total", "counter", labels, float(stats.lost)),
            ("cellwatch_ethercat_gaps_total", "counter", labels, float(stats.gaps)),
        ]
        for name, count in counts.items():
            if name.startswith("datagrams_"):
                command = {**labels, "command": name.removeprefix("datagrams_")}
                out.append(("cellwatch_ethercat_datagrams_total", "counter", command, float(count)))
        for name in ("mailbox", "outgoing_copy", "not_ethercat"):
            out.append(
                (
                    "cellwatch_ethercat_skipped_total",
                    "counter",
                    {**labels, "what": name},
                    float(counts.get(name, 0)),
                )
            )
        if self._live is not None:
            live = self._live.counts
            out.append(
                (
                    "cellwatch_ethercat_kernel_drops_total",
                    "counter",
                    labels,
                    float(live.get("kernel_drops", 0)),
                )
            )
            out.append(
                ("cellwatch_ethercat_recv_errors_total", "counter", labels, float(live.get("recv_errors", 0)))
            )
        if stats.period_ns is not None:
            out.append(("cellwatch_ethercat_bus_period_seconds", "gauge", labels, stats.period_ns / 1e9))
        if stats.jitter_ns is not None:
            out.append(("cellwatch_ethercat_bus_jitter_seconds", "gauge", labels, stats.jitter_ns / 1e9))
        return out

    async def aclose(self) -> None:
        if self._live is not None:
            self._live.stop()
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
        if self._live is not None:
            self._live.close()
