"""InfluxDB sink: line protocol over HTTP, batched, through a durable spool, with retry and backoff.

Every batch is first appended to the on-disk spool (write-ahead), then delivered in order by one
background task; a batch leaves the spool only when InfluxDB has acknowledged it. While InfluxDB is
unreachable the spool grows (bounded; when full, `write` waits: backpressure) and it survives a
restart of the daemon. Point timestamps come from the data, so a batch delivered twice (a crash
between InfluxDB's answer and the acknowledgement) overwrites the same points: retries are idempotent.

Endpoints: v1 ``POST /write?db=…&precision=ns`` (InfluxDB 1.x, and the v1 compatibility API of 2.x and
3.x) with optional basic auth; v2 ``POST /api/v2/write?org=…&bucket=…&precision=ns`` with a token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from daemon.sinks.lineprotocol import Point, encode_batch
from daemon.sinks.spool import Spool, SpoolFull

log = logging.getLogger("cellwatch.sink.influx")


class TransientWriteError(Exception):
    """InfluxDB is unreachable or overloaded: retry later."""


class PermanentWriteError(Exception):
    """InfluxDB refused the batch itself (e.g. 400 bad line, 401, 404 database not found)."""


@dataclass(frozen=True)
class InfluxTarget:
    url: str
    api: Literal["v1", "v2"] = "v1"
    database: str = "cellwatch"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    org: str | None = None
    bucket: str | None = None
    token: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0

    def write_request(self, body: bytes) -> urllib.request.Request:
        base = self.url.rstrip("/")
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.api == "v1":
            params = {"db": self.database, "precision": "ns"}
            if self.retention_policy:
                params["rp"] = self.retention_policy
            url = f"{base}/write?{urllib.parse.urlencode(params)}"
            if self.username:
                creds = f"{self.username}:{self.password or ''}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()
        else:
            params = {"org": self.org or "", "bucket": self.bucket or "", "precision": "ns"}
            url = f"{base}/api/v2/write?{urllib.parse.urlencode(params)}"
            if self.token:
                headers["Authorization"] = f"Token {self.token}"
        return urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310


def post(target: InfluxTarget, body: bytes) -> None:
    """One blocking write; classifies failures as transient (retry) or permanent."""
    try:
        with urllib.request.urlopen(target.write_request(body), timeout=target.timeout_s) as response:  # noqa: S310
            if response.status // 100 == 2:
                return
            raise TransientWriteError(f"HTTP {response.status}")
    except urllib.error.HTTPError as err:
        detail = err.read(500).decode(errors="replace").strip()
        if err.code in (408, 429) or err.code >= 500:
            raise TransientWriteError(f"HTTP {err.code}: {detail}") from err
        raise PermanentWriteError(f"HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise TransientWriteError(str(getattr(err, "reason", err))) from err


@dataclass
class SinkStats:
    points_accepted: int = 0
    batches_delivered: int = 0
    batches_rejected: int = 0
    retries: int = 0
    last_error: str = ""


class InfluxSink:
    """Async sink: `await write(points)`, `await flush()`, `await close()`."""

    def __init__(
        self,
        target: InfluxTarget,
        spool_dir: Path,
        *,
        batch_points: int = 5000,
        flush_interval_s: float = 1.0,
        spool_max_bytes: int = 256 * 2**20,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.target = target
        self.spool = Spool(spool_dir, max_bytes=spool_max_bytes)
        self.rejected_dir = Path(spool_dir) / "rejected"
        self.batch_points = batch_points
        self.flush_interval_s = flush_interval_s
        self._flush_lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stats = SinkStats()
        self._buffer: list[Point] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        for path in self.spool.corrupt:
            log.error("spool segment %s was damaged and moved aside; its batches need manual replay", path)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._deliver(), name="influx-deliver")

    async def write(self, points: Iterable[Point]) -> None:
        """Accept points. They are durable once flushed to the spool: when `batch_points` have
        gathered, `flush_interval_s` after the first of them, or on an explicit `flush()`."""
        before = len(self._buffer)
        self._buffer.extend(points)
        self.stats.points_accepted += len(self._buffer) - before
        if len(self._buffer) >= self.batch_points:
            await self.flush()
        if self._buffer and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.flush_interval_s, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush(), name="influx-flush")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def flush(self) -> None:
        """Move the buffered points to the durable spool (waits while the spool is full)."""
        async with self._flush_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._buffer:
                return
            batch, self._buffer = self._buffer, []
            n = self.batch_points
            # records of at most batch_points points (one request each), made durable together
            bodies = [encode_batch(batch[i : i + n]) for i in range(0, len(batch), n)]
            delay = self.backoff_initial_s
            while True:
                try:
                    await asyncio.to_thread(self.spool.append_many, bodies)
                    break
                except SpoolFull:  # backpressure: wait for delivery to make room, keep the batch
                    log.warning("spool full (%d bytes); waiting for InfluxDB", self.spool.max_bytes)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff_max_s)
            self._wake.set()

    @property
    def pending_bytes(self) -> int:
        return self.spool.pending_bytes

    async def close(self, drain_timeout_s: float = 10.0) -> bool:
        """Flush, wait up to `drain_timeout_s` for delivery, stop. Returns True if fully drained.

        Whatever is not delivered stays in the spool and goes out after the next start.
        """
        await self.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        while self.pending_bytes and loop.time() < deadline and self._task and not self._task.done():
            self._wake.set()
            await asyncio.sleep(0.02)
        drained = self.pending_bytes == 0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.spool.close()
        return drained

    async def _deliver(self) -> None:
        delay = self.backoff_initial_s
        while True:
            record = await asyncio.to_thread(self.spool.peek)
            if record is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await asyncio.to_thread(post, self.target, record.payload)
            except TransientWriteError as err:
                self.stats.retries += 1
                self.stats.last_error = str(err)
                log.warning(
                    "InfluxDB write failed (%s); retrying in %.1f s, %d bytes spooled",
                    err,
                    delay,
                    self.pending_bytes,
                )
                await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))  # noqa: S311 (jitter)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            except PermanentWriteError as err:
                self.stats.batches_rejected += 1
                self.stats.last_error = str(err)
                self.rejected_dir.mkdir(exist_ok=True)
                path = self.rejected_dir / f"batch-{record.segment:012d}-{record.offset:012d}.lp"
                await asyncio.to_thread(path.write_bytes, record.payload)
                log.error("InfluxDB refused a batch (%s); kept in %s", err, path)
            else:
                self.stats.batches_delivered += 1
            delay = self.backoff_initial_s
            await asyncio.to_thread(self.spool.ack, record)
