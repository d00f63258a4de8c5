"""A durable, bounded, in-order on-disk queue (write-ahead spool) for batches bound for a database.

Records are appended to segment files (``seg-<n>.log``) as ``b"CW" | length u32 | crc32 u32 | payload``
and fsynced; a cursor file, replaced atomically, says how far delivery has got. After a crash or a
restart the spool reopens where it was: a torn last record (a crash mid-append) is cut off, records
already acknowledged are skipped, everything else is delivered in order. When the spool is full,
``append`` raises :class:`SpoolFull` so the caller applies backpressure — nothing is dropped.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"CW"
HEADER = struct.Struct("<2sII")
MAX_RECORD = 64 * 2**20


class SpoolFull(Exception):
    """The spool holds `max_bytes`; the caller must wait for delivery (backpressure)."""


class SpoolInUse(OSError):
    """Another process has this spool directory open (two daemons must not share one)."""


class SpoolCorrupt(Exception):
    """A segment other than the last is damaged; it was moved aside (named in the message)."""


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
        self._writer = self._path(self._write_seg).open("ab")

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

    def _check_segment(self, n: int, *, truncate: bool) -> None:
        path = self._path(n)
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            record = _parse(data, pos)
            if record is None:
                break
            pos = record[1]
        if pos == len(data):
            return
        if truncate:  # a torn tail from a crash mid-append: the record was never acknowledged to anyone
            with path.open("r+b") as fh:
                fh.truncate(pos)
            return
        aside = path.with_suffix(".corrupt")
        path.rename(aside)
        self.corrupt.append(aside)

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

    def append_many(self, payloads: list[bytes]) -> None:
        """Append records in order, durable together (one fsync); all or none when the spool is full."""
        for payload in payloads:
            if len(payload) > MAX_RECORD:
                raise ValueError(f"spool record of {len(payload)} bytes exceeds the {MAX_RECORD} byte limit")
        size = sum(len(p) + HEADER.size for p in payloads)
        with self._lock:
            if self._pending_bytes() + size > self.max_bytes:
                raise SpoolFull(f"spool {self.dir} is full ({self.max_bytes} bytes)")
            for payload in payloads:
                if self._writer.tell() >= self.segment_bytes:
                    self._sync()
                    self._writer.close()
                    self._write_seg += 1
                    self._writer = self._path(self._write_seg).open("ab")
                self._writer.write(HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload)
            self._sync()

    def _sync(self) -> None:
        self._writer.flush()
        if self.fsync:
            os.fsync(self._writer.fileno())

    def peek(self) -> Record | None:
        """The oldest unacknowledged record, or None when everything is delivered."""
        with self._lock:
            while True:
                path = self._path(self._read_seg)
                if path.exists():
                    with path.open("rb") as fh:
                        fh.seek(self._read_off)
                        head = fh.read(HEADER.size)
                        if len(head) == HEADER.size:
                            magic, length, crc = HEADER.unpack(head)
                            payload = fh.read(length)
                            if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                                raise SpoolCorrupt(f"{path} is damaged at offset {self._read_off}")
                            end = self._read_off + HEADER.size + length
                            return Record(self._read_seg, self._read_off, end, payload)
                if self._read_seg >= self._write_seg:
                    return None
                # this segment is exhausted and a newer one exists: move on
                path.unlink(missing_ok=True)
                self._read_seg += 1
                self._read_off = 0
                self._write_cursor()

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
