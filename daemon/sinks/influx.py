"""InfluxDB sink: line protocol over HTTP, batched, through a durable spool, with retry and backoff.

Every batch is first appended to the on-disk spool (write-ahead), then delivered in order by one
background task; a batch leaves the spool only when InfluxDB has acknowledged it. While InfluxDB is
unreachable the spool grows (bounded; when full, `write` waits: backpressure) and it survives a
restart of the daemon. Point timestamps come from the data, so a batch delivered twice (a crash
between InfluxDB's answer and the acknowledgement) overwrites the same points: retries are idempotent.

What is retried and what is refused:

- unreachable, timeouts, 408, 429, 5xx: retried with backoff (jittered, up to `backoff_max_s`);
- 401/403 (a rotated token, a changed password, a revoked grant): retried with backoff too, with an
  error log saying to check the credentials; the spool is kept, nothing is refused;
- anything else (400 bad line, 404 database not found, 413): the batch is *refused*: written to
  ``<spool>/rejected/`` (with a ``.reason`` file beside it) and counted; ``cellwatch spool resend``
  re-sends those files once the cause is fixed.

At start (and again once InfluxDB is first reachable) the v1 database is checked with
``SHOW DATABASES`` and, when it is missing and `create_database` is set, created (``CREATE
DATABASE`` needs admin rights; without them the check only logs what is wrong).

`status()` says how delivery is doing (the watchdog reads it: a sink that is retrying is
*waiting*, not stalled); `metric_samples()` gives the Prometheus samples.

Endpoints: v1 ``POST /write?db=…&precision=ns`` (InfluxDB 1.x, and the v1 compatibility API of 2.x and
3.x) with optional basic auth; v2 ``POST /api/v2/write?org=…&bucket=…&precision=ns`` with a token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from daemon.sinks.lineprotocol import Point, encode_batch
from daemon.sinks.spool import Spool, SpoolFull

log = logging.getLogger("cellwatch.sink.influx")

Sample = tuple[str, str, dict[str, str], float]


class TransientWriteError(Exception):
    """InfluxDB is unreachable or overloaded: retry later."""


class AuthWriteError(TransientWriteError):
    """InfluxDB refused our credentials (401) or their rights (403): retried, the batch stays spooled."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"HTTP {code}: {detail}")
        self.code = code


class PermanentWriteError(Exception):
    """InfluxDB refused the batch itself (e.g. 400 bad line, 404 database not found)."""


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

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.api == "v1" and self.username:
            creds = f"{self.username}:{self.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()
        elif self.api == "v2" and self.token:
            headers["Authorization"] = f"Token {self.token}"
        return headers

    def write_request(self, body: bytes) -> urllib.request.Request:
        base = self.url.rstrip("/")
        headers = {"Content-Type": "text/plain; charset=utf-8", **self._headers()}
        if self.api == "v1":
            params = {"db": self.database, "precision": "ns"}
            if self.retention_policy:
                params["rp"] = self.retention_policy
            url = f"{base}/write?{urllib.parse.urlencode(params)}"
        else:
            params = {"org": self.org or "", "bucket": self.bucket or "", "precision": "ns"}
            url = f"{base}/api/v2/write?{urllib.parse.urlencode(params)}"
        return urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310

    def query_request(self, q: str) -> urllib.request.Request:
        """An InfluxQL statement on the v1 ``/query`` endpoint (POST, so it may change things)."""
        headers = {"Content-Type": "application/x-www-form-urlencoded", **self._headers()}
        body = urllib.parse.urlencode({"q": q}).encode()
        return urllib.request.Request(  # noqa: S310
            f"{self.url.rstrip('/')}/query", data=body, headers=headers, method="POST"
        )


def _send(target: InfluxTarget, request: urllib.request.Request) -> bytes:
    """One blocking request; classifies failures as transient (retry), auth (retry) or permanent."""
    try:
        with urllib.request.urlopen(request, timeout=target.timeout_s) as response:  # noqa: S310
            if response.status // 100 == 2:
                return bytes(response.read(1 << 20))
            raise TransientWriteError(f"HTTP {response.status}")
    except urllib.error.HTTPError as err:
        detail = err.read(500).decode(errors="replace").strip()
        if err.code in (401, 403):
            raise AuthWriteError(err.code, detail) from err
        if err.code in (408, 429) or err.code >= 500:
            raise TransientWriteError(f"HTTP {err.code}: {detail}") from err
        raise PermanentWriteError(f"HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise TransientWriteError(str(getattr(err, "reason", err))) from err


def post(target: InfluxTarget, body: bytes) -> None:
    """One blocking write; classifies failures as transient (retry), auth (retry) or permanent."""
    _send(target, target.write_request(body))


def query(target: InfluxTarget, q: str) -> dict[str, Any]:
    """One InfluxQL statement; an error InfluxDB reports in the result raises PermanentWriteError."""
    data = json.loads(_send(target, target.query_request(q)) or b"{}")
    results = data.get("results") or [{}]
    if "error" in results[0]:
        raise PermanentWriteError(str(results[0]["error"]))
    return dict(results[0])


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ensure_database(target: InfluxTarget, *, create: bool) -> str:
    """Check that the v1 database exists and create it if asked; returns what was done, for the log.

    Raises TransientWriteError (incl. AuthWriteError) when InfluxDB cannot be asked yet."""
    if target.api != "v1":
        return f"bucket {target.bucket!r} not checked (api v2): it must exist"
    try:
        shown = query(target, "SHOW DATABASES")
    except AuthWriteError as err:
        if err.code == 403:  # may write but not list: the writes themselves will tell
            return f"database {target.database!r} not checked (SHOW DATABASES is not allowed for this user)"
        raise
    names = {row[0] for series in shown.get("series", []) for row in series.get("values") or []}
    if target.database in names:
        return f"database {target.database!r} exists"
    if not create:
        raise MissingDatabase(
            f"InfluxDB database {target.database!r} does not exist on {target.url}: create it "
            f"(CREATE DATABASE {_quote(target.database)}) or set sinks.influxdb.create_database: true; "
            "until then every batch is refused into the spool's rejected/ directory "
            "(re-send them with `cellwatch spool resend --config FILE`)"
        )
    try:
        query(target, f"CREATE DATABASE {_quote(target.database)}")
    except AuthWriteError as err:
        raise MissingDatabase(
            f"InfluxDB database {target.database!r} is not visible to this user on {target.url} and the "
            f"user may not create it ({err}): create it as an admin, or grant this user WRITE on it; "
            "a missing database refuses every batch into the spool's rejected/ directory (re-send them "
            "with `cellwatch spool resend --config FILE`)"
        ) from err
    return f"created database {target.database!r} (it did not exist)"


class MissingDatabase(Exception):
    """The database is not there and cannot be created from here (the message says what to do)."""


def target_from_config(influx: Any) -> InfluxTarget:
    """The target of a `sinks.influxdb` config block, its secrets resolved (and redacted in logs).

    Raises daemon.config.ConfigError when a secret cannot be read."""
    from daemon.config import resolve_secrets
    from daemon.logs import register_secret

    password, token = resolve_secrets(influx)
    register_secret(password)
    register_secret(token)
    return InfluxTarget(
        url=influx.url,
        api=influx.api,
        database=influx.database,
        retention_policy=influx.retention_policy,
        username=influx.username,
        password=password.get_secret_value() if password else None,
        org=influx.org,
        bucket=influx.bucket,
        token=token.get_secret_value() if token else None,
        timeout_s=influx.timeout_s,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class SinkStats:
    points_accepted: int = 0
    batches_delivered: int = 0
    batches_rejected: int = 0
    retries: int = 0
    auth_failures: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class SinkHealth:
    """How delivery is doing. `ok`: nothing failing; `retrying`: InfluxDB fails and the delivery loop
    is alive and retrying; `backpressure`: the same with the spool full, so the pipeline waits;
    `stalled`: the delivery loop died or has not come back from an attempt in time."""

    state: Literal["ok", "retrying", "backpressure", "stalled"]
    text: str

    @property
    def waiting(self) -> bool:
        """The sink holds the pipeline up on purpose (an outage), and is alive: not a hang."""
        return self.state in ("retrying", "backpressure")


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
        create_database: bool = True,
        spool_segment_bytes: int = 8 * 2**20,
    ) -> None:
        self.target = target
        self.spool = Spool(spool_dir, max_bytes=spool_max_bytes, segment_bytes=spool_segment_bytes)
        self.rejected_dir = Path(spool_dir) / "rejected"
        self.batch_points = batch_points
        self.flush_interval_s = flush_interval_s
        self.create_database = create_database
        self._flush_lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stats = SinkStats()
        self._buffer: list[Point] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set whenever a delivered batch frees spool space
        self._task: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._db_checked = False
        self._failing_since: float | None = None  # loop time of the first failure of this outage
        self._auth_failing = False
        self._deadline: float | None = None  # the loop must be back from its sleep/attempt by then
        self._spool_full = False
        self._stopping = False
        self._backlog = self.spool.pending_bytes > 0  # "spool drained" is logged when it empties
        if self._backlog:
            log.info(
                "spool %s holds %d bytes from before this start; delivering them first",
                spool_dir,
                self.spool.pending_bytes,
            )

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
                self._room.clear()
                try:
                    await asyncio.to_thread(self.spool.append_many, bodies, overflow=self._stopping)
                    break
                except SpoolFull:  # backpressure: wait for delivery to make room, keep the batch
                    if not self._spool_full:
                        self._spool_full = True
                        log.warning(
                            "spool full (%s); the pipeline waits for InfluxDB (backpressure)",
                            human_bytes(self.spool.max_bytes),
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), timeout=delay)
                    delay = min(delay * 2, self.backoff_max_s)
            if self._spool_full:
                self._spool_full = False
                log.info("spool has room again; the pipeline goes on")
            self._wake.set()

    def request_stop(self) -> None:
        """The daemon is stopping: a flush waiting for room in a full spool may now go over the bound
        (by what is in flight: the pipeline's queue is bounded) so the pipeline can finish; the batch
        is durable and delivered after the next start."""
        self._stopping = True
        self._room.set()

    @property
    def pending_bytes(self) -> int:
        return self.spool.pending_bytes

    def status(self) -> SinkHealth:
        """For the watchdog and STATUS=: is delivery fine, retrying (alive), or stalled?"""
        task = self._task
        if task is not None and task.done():
            error = None if task.cancelled() else task.exception()
            return SinkHealth("stalled", f"InfluxDB delivery stopped: {error or 'cancelled'}")
        now = asyncio.get_running_loop().time()
        if self._deadline is not None and now > self._deadline:
            late = now - self._deadline
            return SinkHealth(
                "stalled", f"InfluxDB delivery has not come back from an attempt ({late:.0f} s late)"
            )
        if self._failing_since is None:
            if self._spool_full:
                return SinkHealth(
                    "ok", f"InfluxDB delivering; spool full {human_bytes(self.spool.max_bytes)}"
                )
            return SinkHealth("ok", "InfluxDB delivering")
        if self._auth_failing:
            reason = (
                f"InfluxDB refused our credentials ({self.stats.last_error[:80]}); check the token/password"
            )
        else:
            reason = f"InfluxDB unreachable ({self.stats.last_error[:80]})"
        if self._spool_full:
            return SinkHealth(
                "backpressure", f"backpressure: {reason}, spool full {human_bytes(self.spool.max_bytes)}"
            )
        return SinkHealth("retrying", f"{reason}; retrying, {human_bytes(self.pending_bytes)} spooled")

    def metric_samples(self) -> list[Sample]:
        labels = {"sink": "influxdb"}
        health = self.status()
        return [
            ("cellwatch_spool_bytes", "gauge", labels, self.pending_bytes),
            ("cellwatch_spool_full", "gauge", labels, int(self._spool_full)),
            ("cellwatch_spool_quarantined_total", "counter", labels, self.spool.quarantined),
            ("cellwatch_sink_retries_total", "counter", labels, self.stats.retries),
            ("cellwatch_sink_auth_failures_total", "counter", labels, self.stats.auth_failures),
            ("cellwatch_sink_rejected_batches_total", "counter", labels, self.stats.batches_rejected),
            ("cellwatch_sink_delivered_batches_total", "counter", labels, self.stats.batches_delivered),
            ("cellwatch_sink_up", "gauge", labels, int(health.state == "ok")),
        ]

    async def close(self, drain_timeout_s: float = 10.0) -> bool:
        """Flush, wait up to `drain_timeout_s` for delivery, stop. Returns True if fully drained.

        Whatever is not delivered stays in the spool and goes out after the next start.
        """
        self.request_stop()  # a flush still waiting for room must not hold the close up
        await self.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        while self.pending_bytes and loop.time() < deadline and self._task and not self._task.done():
            self._wake.set()
            await asyncio.sleep(0.02)
        left = self.pending_bytes
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.spool.close()
        if left:
            log.warning("exiting with %d bytes still spooled (delivered after the next start)", left)
        return left == 0

    async def _check_database(self) -> None:
        try:
            done = await asyncio.to_thread(ensure_database, self.target, create=self.create_database)
        except MissingDatabase as err:
            log.error("%s", err)
        except PermanentWriteError as err:
            log.error("InfluxDB database check failed (%s); writing anyway", err)
        else:
            log.info("InfluxDB at %s: %s", self.target.url, done)
        self._db_checked = True

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff_initial_s
        while True:
            # an attempt (a few requests, each bounded by the timeout) must end by then: else "stalled"
            self._deadline = loop.time() + 3 * self.target.timeout_s + 5
            try:
                if not self._db_checked:
                    await self._check_database()
                record = await asyncio.to_thread(self.spool.peek)
                if record is None:
                    self._recovered(loop)
                    if self._backlog:
                        self._backlog = False
                        log.info("spool drained")
                    self._deadline = None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await asyncio.to_thread(post, self.target, record.payload)
            except AuthWriteError as err:
                self.stats.auth_failures += 1
                self._failed(loop, err, auth=True)
                log.error(
                    "InfluxDB refused our credentials (HTTP %d): check the token/password; retrying in "
                    "%.1f s, %d bytes spooled (%s)",
                    err.code,
                    delay,
                    self.pending_bytes,
                    err,
                )
            except TransientWriteError as err:
                self._failed(loop, err, auth=False)
                log.warning(
                    "InfluxDB write failed (%s); retrying in %.1f s, %d bytes spooled",
                    err,
                    delay,
                    self.pending_bytes,
                )
            except OSError as err:  # the spool's disk: never a silent end of delivery
                self._failed(loop, err, auth=False)
                log.error("spool I/O failed (%s); retrying in %.1f s", err, delay)
            except PermanentWriteError as err:  # InfluxDB answered: reachable, but it refuses this batch
                self._recovered(loop)
                await self._reject(record, err)
                await self._ack(record)
                delay = self.backoff_initial_s
                continue
            else:
                self.stats.batches_delivered += 1
                self._recovered(loop)
                await self._ack(record)
                delay = self.backoff_initial_s
                continue
            sleep = delay * (0.8 + 0.4 * random.random())  # noqa: S311 (jitter)
            self._deadline = loop.time() + sleep + 3 * self.target.timeout_s + 5
            await asyncio.sleep(sleep)
            delay = min(delay * 2, self.backoff_max_s)

    async def _ack(self, record: Any) -> None:
        await asyncio.to_thread(self.spool.ack, record)
        self._room.set()
        if self._backlog and await asyncio.to_thread(lambda: self.spool.pending_bytes == 0):
            self._backlog = False  # said as it happens: a close right after must not swallow it
            log.info("spool drained")

    def _failed(self, loop: asyncio.AbstractEventLoop, err: Exception, *, auth: bool) -> None:
        self.stats.retries += 1
        self.stats.last_error = str(err)
        self._auth_failing = auth
        if self._failing_since is None:
            self._failing_since = loop.time()
        self._backlog = True

    def _recovered(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._failing_since is None:
            return
        log.info(
            "InfluxDB reachable again after %.0f s, %d bytes spooled",
            loop.time() - self._failing_since,
            self.pending_bytes,
        )
        self._failing_since = None
        self._auth_failing = False

    async def _reject(self, record: Any, err: PermanentWriteError) -> None:
        self.stats.batches_rejected += 1
        self.stats.last_error = str(err)
        path = await asyncio.to_thread(write_rejected, self.rejected_dir, record, str(err))
        hint = ""
        if "database not found" in str(err):
            hint = " (the database does not exist: create it, then `cellwatch spool resend --config FILE`)"
        log.error("InfluxDB refused a batch (%s); kept in %s%s", err, path, hint)


def write_rejected(directory: Path, record: Any, reason: str) -> Path:
    """Keep a refused batch as ``batch-<time>-<segment>-<offset>.lp`` (+ ``.reason``), written
    atomically (a temporary name, fsync, rename) so `cellwatch spool resend` never reads half a file."""
    directory.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = directory / f"batch-{stamp}-{record.segment:012d}-{record.offset:012d}.lp"
    for i in range(1, 1000):
        if not path.exists():
            break
        path = directory / f"batch-{stamp}-{record.segment:012d}-{record.offset:012d}-{i}.lp"
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(record.payload)
        fh.flush()
        os.fsync(fh.fileno())
    path.with_name(path.name + ".reason").write_text(reason + "\n")
    tmp.replace(path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
