"""File sink: JSON lines, one object per point, the embedded default that needs no infrastructure.

- **Strict JSON.** Every line is ``json.dumps(..., allow_nan=False)``. A field that is not a finite
  number (NaN, ±inf) is never written as ``NaN``/``Infinity`` (which no strict JSON parser reads): it
  is written as ``null`` and the line gets ``"nonfinite_fields": ["score", ...]`` naming them, and
  each one is counted (``cellwatch_file_nonfinite_fields_total``). The point is kept, not dropped:
  its other fields (robot, cycle, time) are still worth having.
- **Durable before acks.** `write` hands the lines to the OS (a crash of the process cannot lose them);
  `flush` fsyncs, and the pipeline calls `flush` before it releases the acknowledgements of the
  messages behind the points (a power failure cannot lose what a broker was told is done).
- **Rotation by size.** When a write would take the file past `max_bytes`, the file is fsynced and
  renamed to ``<name>.1`` (``.1`` to ``.2`` and so on first; the oldest beyond `keep` is deleted), the
  directory is fsynced, and a new file is started. A line is never split across two files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.sinks.lineprotocol import Point

log = logging.getLogger("cellwatch.sink.file")

Sample = tuple[str, str, dict[str, str], float]


def point_line(point: Point) -> tuple[str, int]:
    """One point as a strict JSON line, and how many non-finite fields were replaced by null."""
    fields: dict[str, Any] = {}
    nonfinite: list[str] = []
    for name, value in point.fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            fields[name] = None
            nonfinite.append(name)
        else:
            fields[name] = value
    record: dict[str, Any] = {
        "measurement": point.measurement,
        "time_ns": point.time_ns,
        **point.tags,
        **fields,
    }
    if nonfinite:
        record["nonfinite_fields"] = nonfinite
    return json.dumps(record, allow_nan=False) + "\n", len(nonfinite)


class FileSink:
    """JSON lines (see the module docstring): `await write(points)`, `await flush()`, `await close()`."""

    def __init__(self, path: Path, *, max_bytes: int = 100 * 2**20, keep: int = 5) -> None:
        if max_bytes < 1 or keep < 1:
            raise ValueError("file sink max_bytes and keep must be positive")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.bytes_written = 0
        self.rotations = 0
        self.nonfinite_fields = 0
        self._lock = threading.Lock()  # writes and flushes run in worker threads
        self._fh = path.open("a", encoding="utf-8")
        self._size = self._fh.tell()

    async def write(self, points: Sequence[Point]) -> None:
        lines: list[str] = []
        for point in points:
            line, replaced = point_line(point)
            lines.append(line)
            if replaced:
                self.nonfinite_fields += replaced
                log.warning(
                    "a %s point of %s had %d non-finite field(s); written as null (nonfinite_fields)",
                    point.measurement,
                    point.tags.get("robot", "?"),
                    replaced,
                )
        if lines:
            await asyncio.to_thread(self._write, lines)

    def _write(self, lines: list[str]) -> None:
        with self._lock:
            chunk: list[str] = []
            size = 0
            for line in lines:
                n = len(line.encode())
                if self._size + size + n > self.max_bytes and self._size + size > 0:
                    self._append("".join(chunk), size)
                    chunk, size = [], 0
                    if self._size > 0:
                        self._rotate()
                chunk.append(line)
                size += n
            self._append("".join(chunk), size)

    def _append(self, text: str, size: int) -> None:
        if not text:
            return
        self._fh.write(text)
        self._fh.flush()  # in the OS: a crash of this process cannot lose it
        self._size += size
        self.bytes_written += size

    def _rotate(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        oldest = self._rotated(self.keep)
        oldest.unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            if self._rotated(i).exists():
                self._rotated(i).rename(self._rotated(i + 1))
        self.path.rename(self._rotated(1))
        self._fh = self.path.open("a", encoding="utf-8")
        self._size = 0
        self._sync_dir()
        self.rotations += 1
        log.info("rotated %s (%d rotations so far)", self.path, self.rotations)

    def _rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _sync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())

    async def flush(self) -> None:
        """Make every line written so far durable (fsync): the pipeline releases acks after this."""
        await asyncio.to_thread(self._fsync)

    def metric_samples(self) -> list[Sample]:
        labels = {"sink": "file"}
        return [
            ("cellwatch_file_sink_bytes_total", "counter", labels, self.bytes_written),
            ("cellwatch_file_sink_rotations_total", "counter", labels, self.rotations),
            ("cellwatch_file_nonfinite_fields_total", "counter", labels, self.nonfinite_fields),
        ]

    async def close(self, drain_timeout_s: float = 10.0) -> bool:
        await asyncio.to_thread(self._close)
        return True

    def _close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
