"""A durable, bounded, in-order on-disk queue (write-ahead spool) for batches bound for a database.

Records are appended to segment files (``seg-<n>.log``) as ``b"CW" | length u32 | crc32 u32 | payload``
and fsynced; a cursor file, replaced atomically, says how far delivery has got. After a crash or a
restart the spool reopens where it was: a torn last record (a crash mid-append) is cut off, records
already acknowledged are skipped, everything else is delivered in order. When the spool is full,
``append`` raises :class:`SpoolFull` so the caller applies backpressure — nothing is dropped (one
append into an empty spool is always accepted, so a batch larger than the bound cannot wedge it).

Durability: every record is fsynced before ``append`` returns, and the directory itself is fsynced
after a segment is created and after the cursor is renamed into place, so neither a new segment nor
the cursor's new name can be lost by a power failure after the caller was told "durable".

A damaged record (bit rot, a disk error: a bad magic, length or CRC) is never fatal: the segment
holding it is *quarantined* (moved to ``quarantine/`` with a ``.reason`` file beside it, an error
log, and :attr:`Spool.quarantined` counts it) and delivery goes on with the next segment. Every
intact record of that segment that was not yet delivered (before the damage, and after it: found again
by their magic and checksum) is re-queued at the end of the spool, so only the damaged record itself
is missing, and it stays in the quarantined file, kept as it was.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("cellwatch.spool")

MAGIC = b"CW"
HEADER = struct.Struct("<2sII")
MAX_RECORD = 64 * 2**20


class SpoolFull(Exception):
    """The spool holds `max_bytes`; the caller must wait for delivery (backpressure)."""


class SpoolInUse(OSError):
    """Another process has this spool directory open (two daemons must not share one)."""


class SpoolCorrupt(Exception):
    """A damaged segment (kept for compatibility: the spool now quarantines it and goes on)."""


@dataclass(frozen=True)
class Record:
    segment: int
    offset: int
    end: int
    payload: bytes


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 256 * 2**20,
        segment_bytes: int = 8 * 2**20,
        fsync: bool = True,
    ) -> None:
        if max_bytes < 1 or segment_bytes < 1:
            raise ValueError("spool max_bytes and segment_bytes must be positive")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # one process per spool: a second daemon appending and acknowledging here would corrupt both
        self._dir_lock = (self.dir / "lock").open("a")
        try:
            fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._dir_lock.close()
            raise SpoolInUse(
                f"spool directory {self.dir} is in use by another process (give each daemon its own)"
            ) from None
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._requeue: list[bytes] = []  # intact records of segments quarantined at open
        #: quarantined segments (moved to quarantine/ with a .reason file), oldest first
        self.corrupt: list[Path] = []
        cursor = self._read_cursor()
        self._read_seg, self._read_off = cursor
        segments = self._segments()
        # drop segments entirely before the cursor (acknowledged; a crash may have left them)
        for n in segments:
            if n < self._read_seg:
                self._path(n).unlink(missing_ok=True)
        segments = [n for n in segments if n >= self._read_seg]
        for n in segments[:-1]:
            self._check_segment(n, truncate=False)
        if segments:
            self._check_segment(segments[-1], truncate=True)
        segments = self._segments()
        self._write_seg = segments[-1] if segments else self._read_seg
        if self._write_seg < self._read_seg:
            self._write_seg = self._read_seg
        self._writer = self._open_segment(self._write_seg)
        if self._requeue:
            self._append_locked(self._requeue)
            self._requeue = []

    @property
    def quarantined(self) -> int:
        """Segments quarantined since this spool was opened (for `cellwatch_spool_quarantined_total`)."""
        return len(self.corrupt)

    @property
    def quarantine_dir(self) -> Path:
        return self.dir / "quarantine"

    # --- files -------------------------------------------------------------------------------------
    def _path(self, n: int) -> Path:
        return self.dir / f"seg-{n:012d}.log"

    def _segments(self) -> list[int]:
        return sorted(int(p.stem[4:]) for p in self.dir.glob("seg-*.log"))

    def _read_cursor(self) -> tuple[int, int]:
        path = self.dir / "cursor.json"
        if not path.exists():
            return 0, 0
        data = json.loads(path.read_text())
        return int(data["segment"]), int(data["offset"])

    def _write_cursor(self) -> None:
        tmp = self.dir / "cursor.json.tmp"
        with tmp.open("w") as fh:
            json.dump({"segment": self._read_seg, "offset": self._read_off}, fh)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        tmp.replace(self.dir / "cursor.json")
        self._sync_dir()  # the rename itself is durable only once the directory is

    def _sync_dir(self, directory: Path | None = None) -> None:
        if not self.fsync:
            return
        fd = os.open(directory or self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _open_segment(self, n: int) -> BinaryIO:
        path = self._path(n)
        created = not path.exists()
        writer = path.open("ab")
        if created:  # a new directory entry: durable only once the directory is fsynced
            self._sync_dir()
        return writer

    def _quarantine(self, n: int, reason: str, start: int) -> list[bytes]:
        """Move segment `n` aside with a reason file (an error log says where and why); returns the
        intact records from offset `start` on, to be re-queued."""
        path = self._path(n)
        salvaged = _salvage(path.read_bytes(), start)
        self.quarantine_dir.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.quarantine_dir / f"{path.stem}.{stamp}.log"
        path.rename(aside)
        note = aside.with_suffix(".reason")
        note.write_text(
            f"{reason}\nquarantined {datetime.now(UTC).isoformat()}; {len(salvaged)} intact undelivered "
            "record(s) of this segment were re-queued; the damaged one was not delivered (the segment is "
            "kept here as it was)\n"
        )
        self._sync_dir(self.quarantine_dir)
        self._sync_dir()
        self.corrupt.append(aside)
        log.error(
            "spool segment %s is damaged (%s): quarantined as %s, %d intact record(s) re-queued; "
            "delivery goes on",
            path,
            reason,
            aside,
            len(salvaged),
        )
        return salvaged

    def _check_segment(self, n: int, *, truncate: bool) -> None:
        path = self._path(n)
        data = path.read_bytes()
        pos = self._read_off if n == self._read_seg else 0  # acknowledged records are not looked at
        while pos < len(data):
            record = _parse(data, pos)
            if record is None:
                break
            pos = record[1]
        if pos >= len(data):
            return
        if truncate and not _salvage(data, pos):
            # a torn tail from a crash mid-append (nothing intact after it): never acknowledged to anyone
            with path.open("r+b") as fh:
                fh.truncate(pos)
                if self.fsync:
                    os.fsync(fh.fileno())
            return
        start = self._read_off if n == self._read_seg else 0
        reason = f"damaged record at offset {pos} (found when the spool was opened)"
        self._requeue += self._quarantine(n, reason, start)
        if n == self._read_seg:  # delivery goes on at the start of the next segment
            self._read_seg, self._read_off = n + 1, 0
            self._write_cursor()

    # --- queue -------------------------------------------------------------------------------------
    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return self._pending_bytes()

    def _pending_bytes(self) -> int:
        total = 0
        for n in self._segments():
            if n >= self._read_seg:
                total += self._path(n).stat().st_size
        return max(total - self._read_off, 0)

    def append(self, payload: bytes) -> None:
        self.append_many([payload])

    def append_many(self, payloads: list[bytes], *, overflow: bool = False) -> None:
        """Append records in order, durable together (one fsync); all or none when the spool is full.

        `overflow` accepts them over the bound (a daemon stopping: what is in flight must land)."""
        for payload in payloads:
            if len(payload) > MAX_RECORD:
                raise ValueError(f"spool record of {len(payload)} bytes exceeds the {MAX_RECORD} byte limit")
        size = sum(len(p) + HEADER.size for p in payloads)
        with self._lock:
            pending = self._pending_bytes()
            if pending and pending + size > self.max_bytes and not overflow:
                raise SpoolFull(f"spool {self.dir} is full ({self.max_bytes} bytes)")
            self._append_locked(payloads)

    def _append_locked(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            if self._writer.tell() >= self.segment_bytes:
                self._sync()
                self._writer.close()
                self._write_seg += 1
                self._writer = self._open_segment(self._write_seg)
            self._writer.write(HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload)
        self._sync()

    def _sync(self) -> None:
        self._writer.flush()
        if self.fsync:
            os.fsync(self._writer.fileno())

    def peek(self) -> Record | None:
        """The oldest unacknowledged record, or None when everything is delivered.

        A damaged record quarantines its segment (see the module docstring) and the next segment's
        first record is returned instead: damage never stops delivery."""
        with self._lock:
            while True:
                path = self._path(self._read_seg)
                if path.exists():
                    with path.open("rb") as fh:
                        fh.seek(self._read_off)
                        head = fh.read(HEADER.size)
                        damaged = ""
                        if len(head) == HEADER.size:
                            magic, length, crc = HEADER.unpack(head)
                            payload = fh.read(min(length, MAX_RECORD))
                            if magic != MAGIC or length > MAX_RECORD:
                                damaged = "bad record header"
                            elif len(payload) != length:
                                damaged = "record shorter than its header says"
                            elif zlib.crc32(payload) != crc:
                                damaged = "checksum mismatch"
                            else:
                                end = self._read_off + HEADER.size + length
                                return Record(self._read_seg, self._read_off, end, payload)
                        elif head and self._read_seg < self._write_seg:
                            damaged = "truncated record header"
                    if damaged:
                        self._skip_damaged(f"{damaged} at offset {self._read_off}")
                        continue
                if self._read_seg >= self._write_seg:
                    return None
                # this segment is exhausted and a newer one exists: move on
                path.unlink(missing_ok=True)
                self._read_seg += 1
                self._read_off = 0
                self._write_cursor()

    def _skip_damaged(self, reason: str) -> None:
        """Quarantine the read segment and move the cursor to the start of the next one."""
        if self._read_seg == self._write_seg:  # damage in the segment being appended to: start a new one
            self._writer.close()
            self._write_seg += 1
            self._writer = self._open_segment(self._write_seg)
        salvaged = self._quarantine(self._read_seg, reason, self._read_off)
        self._read_seg += 1
        self._read_off = 0
        self._write_cursor()
        if salvaged:  # at the end of the queue: out of order, but not lost
            self._append_locked(salvaged)

    def ack(self, record: Record) -> None:
        """Mark `record` delivered (it must be the one `peek` returned)."""
        with self._lock:
            if (record.segment, record.offset) != (self._read_seg, self._read_off):
                raise ValueError("ack out of order: only the record returned by peek() can be acknowledged")
            self._read_off = record.end
            self._write_cursor()

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        self._dir_lock.close()  # releases the lock

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(data: bytes, pos: int) -> tuple[bytes, int] | None:
    if pos + HEADER.size > len(data):
        return None
    magic, length, crc = HEADER.unpack_from(data, pos)
    start = pos + HEADER.size
    payload = data[start : start + length]
    if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return payload, start + length


def _salvage(data: bytes, start: int) -> list[bytes]:
    """The intact records of a damaged segment from `start` on: the chain up to the damage, then each
    record found again past it by its magic and checksum."""
    found: list[bytes] = []
    pos = start
    while pos + HEADER.size <= len(data):
        record = _parse(data, pos)
        if record is not None:
            found.append(record[0])
            pos = record[1]
            continue
        nxt = data.find(MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    return found
