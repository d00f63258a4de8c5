"""The InfluxDB sink against the real InfluxDB 1.6.7 (Debian), and its durable spool.

InfluxDB is started by the test session on private ports (tests/services.py); the outage test stops
and restarts that real server mid-stream.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from pathlib import Path

import pytest
from services import InfluxServer, free_port, poll, wait_until

from daemon.sinks.influx import InfluxSink, InfluxTarget, PermanentWriteError, TransientWriteError, post
from daemon.sinks.lineprotocol import LineProtocolError, Point, encode, encode_batch
from daemon.sinks.spool import Spool, SpoolFull, SpoolInUse

T0 = 1_700_000_000_000_000_000


def create_db(server: InfluxServer, name: str) -> None:
    server.create_database(name)


def points(start: int, n: int, robot: str = "r1") -> list[Point]:
    return [
        Point(
            "anomaly_score",
            {"score": float(i) * 0.5, "is_anomaly": i % 7 == 0, "cycle": i},
            T0 + i * 10_000_000,
            {"robot": robot, "model": "m 1", "mode": "cycle"},
        )
        for i in range(start, start + n)
    ]


# --- line protocol ------------------------------------------------------------------------------------
def test_line_protocol_types_and_escaping() -> None:
    p = Point("m,x y", {"f=1": 1.5, "n": 3, "ok": True, "s": 'a "b" \\c'}, 42, {"t x": "v,1=2", "empty": ""})
    assert encode(p) == r'm\,x\ y,t\ x=v\,1\=2 f\=1=1.5,n=3i,ok=true,s="a \"b\" \\c" 42'
    with pytest.raises(LineProtocolError, match="field 'score' is nan"):
        encode(Point("m", {"score": float("nan")}, 1))
    with pytest.raises(LineProtocolError, match="at least one field"):
        encode(Point("m", {}, 1))


def test_influxdb_parses_what_we_encode(influx: InfluxServer) -> None:
    create_db(influx, "lp")
    target = InfluxTarget(url=influx.url, database="lp")
    tricky = Point("score s", {"v": 2.25, "note": 'say "hi", ok=1'}, T0, {"robot": "cell 1,arm=a"})
    post(target, encode_batch([tricky]))
    rows = influx.series('SELECT "v", "note", "robot" FROM "score s"', "lp")
    assert rows == [[T0, 2.25, 'say "hi", ok=1', "cell 1,arm=a"]]


def test_write_errors_are_classified(influx: InfluxServer) -> None:
    with pytest.raises(PermanentWriteError, match="404"):
        post(InfluxTarget(url=influx.url, database="does_not_exist"), b"m v=1 1\n")
    create_db(influx, "bad")
    with pytest.raises(PermanentWriteError, match="400"):
        post(InfluxTarget(url=influx.url, database="bad"), b"m v=\n")
    with pytest.raises(TransientWriteError):
        post(InfluxTarget(url=f"http://127.0.0.1:{free_port()}", database="x", timeout_s=2), b"m v=1 1\n")


# --- spool ---------------------------------------------------------------------------------------------
def test_spool_is_fifo_and_survives_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=64)
    for i in range(10):
        spool.append(f"batch {i}".encode())
    first = spool.peek()
    assert first is not None
    assert first.payload == b"batch 0"
    spool.ack(first)
    spool.close()
    with Spool(tmp_path, segment_bytes=64) as reopened:  # a daemon restart
        seen = []
        while (record := reopened.peek()) is not None:
            seen.append(record.payload)
            reopened.ack(record)
        assert seen == [f"batch {i}".encode() for i in range(1, 10)]
        assert reopened.pending_bytes == 0
    assert len(list(tmp_path.glob("seg-*.log"))) == 1  # delivered segments are removed


def test_a_spool_directory_serves_one_process_at_a_time(tmp_path: Path) -> None:
    """Two daemons configured with one spool directory would overwrite each other's cursor: the second
    is refused with a message naming the directory, and gets it once the first has closed it."""
    import subprocess
    import sys

    first = Spool(tmp_path / "spool")
    first.append(b"kept")
    other_process = subprocess.run(
        [sys.executable, "-c", f"from daemon.sinks.spool import Spool; Spool({str(tmp_path / 'spool')!r})"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other_process.returncode != 0
    assert "SpoolInUse" in other_process.stderr
    assert f"spool directory {tmp_path / 'spool'} is in use by another process" in other_process.stderr
    with pytest.raises(SpoolInUse):
        Spool(tmp_path / "spool")  # in this process too
    first.close()
    with Spool(tmp_path / "spool") as again:
        record = again.peek()
        assert record is not None
        assert record.payload == b"kept"


def test_spool_cuts_a_torn_last_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(b"complete")
    spool.close()
    segment = next(tmp_path.glob("seg-*.log"))
    with segment.open("ab") as fh:  # a crash halfway through writing the next record
        fh.write(struct.pack("<2sII", b"CW", 100, 0) + b"only part")
    with Spool(tmp_path) as reopened:
        record = reopened.peek()
        assert record is not None
        assert record.payload == b"complete"
        reopened.ack(record)
        assert reopened.peek() is None
        reopened.append(b"after")  # and appending goes on cleanly after the cut
        assert (r := reopened.peek()) is not None
        assert r.payload == b"after"


def test_spool_is_bounded(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=100) as spool:
        spool.append(b"x" * 50)
        with pytest.raises(SpoolFull):
            spool.append(b"y" * 50)
        record = spool.peek()
        assert record is not None
        spool.ack(record)
        spool.append(b"y" * 50)  # room again once delivered


# --- the sink ------------------------------------------------------------------------------------------
def stored(influx: InfluxServer, db: str) -> list[list[object]]:
    return influx.series('SELECT "score", "is_anomaly", "cycle", "robot" FROM "anomaly_score"', db)


def expected(pts: list[Point]) -> list[list[object]]:
    return [
        [p.time_ns, p.fields["score"], p.fields["is_anomaly"], p.fields["cycle"], p.tags["robot"]]
        for p in pts
    ]


def test_sink_delivers_every_point(influx: InfluxServer, tmp_path: Path) -> None:
    create_db(influx, "clean")
    pts = points(0, 1200)

    async def run() -> bool:
        sink = InfluxSink(
            InfluxTarget(url=influx.url, database="clean"), tmp_path / "spool", batch_points=250
        )
        await sink.start()
        await sink.write(pts)
        return await sink.close(drain_timeout_s=30)

    assert asyncio.run(run()) is True
    assert stored(influx, "clean") == expected(pts)


def test_outage_and_daemon_restart_lose_nothing(influx: InfluxServer, tmp_path: Path) -> None:
    """InfluxDB stops mid-replay; the daemon (sink) is restarted during the outage; InfluxDB returns.
    The stored series equals a clean run's, point for point."""
    create_db(influx, "outage")
    target = InfluxTarget(url=influx.url, database="outage", timeout_s=2)
    spool = tmp_path / "spool"
    pts = points(0, 900)

    async def before_outage() -> None:
        sink = InfluxSink(target, spool, batch_points=100, backoff_initial_s=0.05, backoff_max_s=0.2)
        await sink.start()
        await sink.write(pts[:300])
        assert await sink.close(drain_timeout_s=30)

    async def during_outage() -> None:
        sink = InfluxSink(target, spool, batch_points=100, backoff_initial_s=0.05, backoff_max_s=0.2)
        await sink.start()
        await sink.write(pts[300:700])
        await sink.flush()
        assert not await sink.close(drain_timeout_s=0.3)  # cannot drain: stays spooled on disk
        assert sink.stats.retries > 0

    async def after_outage() -> None:
        sink = InfluxSink(target, spool, batch_points=100, backoff_initial_s=0.05, backoff_max_s=0.2)
        assert sink.pending_bytes > 0  # the restarted daemon found the spooled batches
        await sink.start()
        await sink.write(pts[700:])
        await sink.flush()
        await asyncio.to_thread(wait_until, lambda: sink.pending_bytes == 0, 30, "the spool to drain")
        assert await sink.close(drain_timeout_s=5)

    asyncio.run(before_outage())
    influx.stop()
    asyncio.run(during_outage())
    influx.start()
    asyncio.run(after_outage())
    assert stored(influx, "outage") == expected(pts)


def test_refused_batches_are_kept_not_dropped(influx: InfluxServer, tmp_path: Path) -> None:
    async def run() -> InfluxSink:
        sink = InfluxSink(
            InfluxTarget(url=influx.url, database="missing_db"),
            tmp_path / "spool",
            batch_points=10,
            create_database=False,
        )
        await sink.start()
        await sink.write(points(0, 10))
        await sink.flush()
        await asyncio.to_thread(wait_until, lambda: sink.stats.batches_rejected == 1, 10, "the refusal")
        await sink.close(drain_timeout_s=1)
        return sink

    sink = asyncio.run(run())
    kept = list((tmp_path / "spool" / "rejected").glob("*.lp"))
    assert len(kept) == 1
    assert kept[0].read_bytes() == encode_batch(points(0, 10))
    assert "404" in sink.stats.last_error
    assert "database not found" in kept[0].with_name(kept[0].name + ".reason").read_text()
    assert (
        "cellwatch_sink_rejected_batches_total",
        "counter",
        {"sink": "influxdb"},
        1,
    ) in sink.metric_samples()


# --- a missing database, refused batches re-sent ----------------------------------------------------
def test_a_missing_database_is_created_at_start(
    influx: InfluxServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a database nobody had created sent every batch to rejected/ with no metric."""
    pts = points(0, 20)

    async def run() -> InfluxSink:
        sink = InfluxSink(InfluxTarget(url=influx.url, database="made_at_start"), tmp_path / "spool")
        await sink.start()
        await sink.write(pts)
        assert await sink.close(drain_timeout_s=30)
        return sink

    with caplog.at_level(logging.INFO, "cellwatch.sink.influx"):
        sink = asyncio.run(run())
    assert stored(influx, "made_at_start") == expected(pts)
    assert sink.stats.batches_rejected == 0
    assert "created database 'made_at_start' (it did not exist)" in caplog.text
    with caplog.at_level(logging.INFO, "cellwatch.sink.influx"):
        caplog.clear()
        asyncio.run(run())  # the second start finds it
    assert "database 'made_at_start' exists" in caplog.text


def test_refused_batches_are_resent_once_the_database_exists(
    influx: InfluxServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon told not to create databases refuses batches into rejected/ (counted, logged with what
    to do); `cellwatch spool resend` sends them once the database exists and removes each one sent."""
    import yaml

    from daemon.cli import main

    spool = tmp_path / "spool"
    config = tmp_path / "cellwatch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {"type": "voraus_replay", "robot": "r1", "path": str(tmp_path / "unused.parquet")}
                ],
                "model": {"path": str(tmp_path / "unused-model")},
                "sinks": {
                    "influxdb": {
                        "url": influx.url,
                        "database": "made_later",
                        "spool_dir": str(spool),
                        "create_database": False,
                    }
                },
            }
        )
    )
    first, second = points(0, 10), points(10, 10)

    async def run() -> InfluxSink:
        sink = InfluxSink(
            InfluxTarget(url=influx.url, database="made_later"), spool, batch_points=10, create_database=False
        )
        await sink.start()
        for batch in (first, second):
            await sink.write(batch)
            await sink.flush()
        await asyncio.to_thread(wait_until, lambda: sink.stats.batches_rejected == 2, 10, "two refusals")
        await sink.close(drain_timeout_s=1)
        return sink

    with caplog.at_level(logging.INFO, "cellwatch.sink.influx"):
        sink = asyncio.run(run())
    assert "InfluxDB database 'made_later' does not exist" in caplog.text  # said at start
    assert "cellwatch spool resend" in caplog.text
    samples = {name: value for name, _, _, value in sink.metric_samples()}
    assert samples["cellwatch_sink_rejected_batches_total"] == 2
    assert len(list((spool / "rejected").glob("*.lp"))) == 2

    assert main(["spool", "resend", "--config", str(config)]) == 1  # not fixed yet: kept
    assert len(list((spool / "rejected").glob("*.lp"))) == 2
    influx.create_database("made_later")  # the cause fixed
    assert main(["spool", "resend", "--config", str(config)]) == 0
    assert list((spool / "rejected").iterdir()) == []
    assert stored(influx, "made_later") == expected(first + second)
    assert main(["spool", "resend", "--config", str(config)]) == 0  # nothing left to do


# --- outages: health, backpressure, recovery logs ---------------------------------------------------
def test_status_says_retrying_then_backpressure_and_close_says_what_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens on the port: the sink reports it is waiting (alive, retrying), then that the
    spool is full and the pipeline is held (backpressure), and on close how much is left spooled."""
    target = InfluxTarget(url=f"http://127.0.0.1:{free_port()}", database="x", timeout_s=1)

    async def run() -> tuple[list[str], list[bool], int]:
        sink = InfluxSink(
            target,
            tmp_path / "spool",
            batch_points=10,
            spool_max_bytes=3000,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
        )
        await sink.start()
        await sink.write(points(0, 10))
        await sink.flush()
        await poll(lambda: sink.stats.retries >= 2, 10)
        first = sink.status()
        states, waiting = [first.state], [first.waiting]
        texts = [first.text]
        filler = asyncio.create_task(sink.write(points(10, 200)))  # more than the spool can hold
        await poll(lambda: sink.status().state == "backpressure", 10)
        assert not filler.done()  # the writer is held: backpressure, nothing dropped
        held = sink.status()
        states.append(held.state)
        waiting.append(held.waiting)
        texts.append(held.text)
        sink.request_stop()  # the daemon stops: what is in flight goes over the bound and is durable
        await filler
        await sink.close(drain_timeout_s=0.2)
        return texts, waiting, sink.stats.retries

    with caplog.at_level(logging.INFO, "cellwatch.sink.influx"):
        texts, waiting, retries = asyncio.run(run())
    assert retries >= 2
    assert texts[0].startswith("InfluxDB unreachable (")
    assert "retrying" in texts[0]
    assert texts[1].startswith("backpressure: InfluxDB unreachable (")
    assert texts[1].endswith("spool full 2.9 KiB")
    assert waiting == [True, True]  # the watchdog may be fed: alive and retrying
    with Spool(tmp_path / "spool") as spool:
        left = spool.pending_bytes
    assert left > 3000  # every point is on disk, over the bound by what was in flight at the stop
    assert f"exiting with {left} bytes still spooled (delivered after the next start)" in caplog.text
    assert "spool full (2.9 KiB); the pipeline waits for InfluxDB (backpressure)" in caplog.text


@pytest.mark.slow
def test_recovery_is_logged(influx: InfluxServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    create_db(influx, "recovery")
    target = InfluxTarget(url=influx.url, database="recovery", timeout_s=2)
    pts = points(0, 50)

    async def run() -> None:
        sink = InfluxSink(
            target, tmp_path / "spool", batch_points=10, backoff_initial_s=0.05, backoff_max_s=0.2
        )
        await sink.start()
        influx.stop()
        try:
            await sink.write(pts)
            await sink.flush()
            await poll(lambda: sink.stats.retries >= 2, 20)
        finally:
            influx.start()
        await poll(lambda: sink.pending_bytes == 0 and sink.status().state == "ok", 60)
        assert await sink.close(drain_timeout_s=5)

    try:
        with caplog.at_level(logging.INFO, "cellwatch.sink.influx"):
            asyncio.run(run())
    finally:
        if not influx.ping():
            influx.start()
    messages = [r.getMessage() for r in caplog.records]
    back = [m for m in messages if m.startswith("InfluxDB reachable again after ")]
    assert len(back) == 1
    assert re.fullmatch(r"InfluxDB reachable again after \d+ s, \d+ bytes spooled", back[0])
    assert messages.index(back[0]) < messages.index("spool drained")
    assert not any("still spooled" in m for m in messages)
    assert stored(influx, "recovery") == expected(pts)


# --- credentials --------------------------------------------------------------------------------------
class AuthInfluxServer(InfluxServer):
    """The same InfluxDB 1.6.7 with `[http] auth-enabled = true` and an admin user."""

    name = "influxd-auth"
    admin = ("admin", "admin-secret-1")

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        text = self.config.read_text().replace("[http]\n", "[http]\n  auth-enabled = true\n")
        self.config.write_text(text)

    def start(self) -> None:
        super().start()
        user, password = self.admin
        # with no user yet, InfluxDB lets exactly this statement through unauthenticated
        self.influxql(f"CREATE USER {user} WITH PASSWORD '{password}' WITH ALL PRIVILEGES", auth=False)

    def influxql(self, q: str, auth: bool = True) -> dict[str, object]:
        import base64
        import json
        import urllib.parse
        import urllib.request

        headers = {}
        if auth:
            creds = base64.b64encode(":".join(self.admin).encode()).decode()
            headers["Authorization"] = f"Basic {creds}"
        body = urllib.parse.urlencode({"q": q}).encode()
        request = urllib.request.Request(f"{self.url}/query", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))


@pytest.mark.slow
def test_refused_credentials_keep_the_spool_and_are_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a rotated token (401/403) moved the whole spool into rejected/. Now: a clear error, a
    metric, retries with backoff, and everything is delivered once the credentials are right again.
    Real InfluxDB with authentication: first the user does not exist (401), then it exists but may not
    write (403), then it is granted WRITE."""
    with AuthInfluxServer(tmp_path / "influx-auth") as server:
        server.influxql('CREATE DATABASE "secured"')
        target = InfluxTarget(
            url=server.url, database="secured", username="writer", password="rotated-pw-2", timeout_s=2
        )
        pts = points(0, 30)

        async def run() -> InfluxSink:
            sink = InfluxSink(
                target, tmp_path / "spool", batch_points=10, backoff_initial_s=0.05, backoff_max_s=0.2
            )
            await sink.start()
            await sink.write(pts)
            await sink.flush()
            await poll(lambda: sink.stats.auth_failures >= 2, 20)
            assert "401" in sink.stats.last_error
            assert sink.status().waiting
            await asyncio.to_thread(server.influxql, "CREATE USER writer WITH PASSWORD 'rotated-pw-2'")
            await poll(lambda: "403" in sink.stats.last_error, 20)
            await asyncio.to_thread(server.influxql, 'GRANT WRITE ON "secured" TO writer')
            await poll(lambda: sink.pending_bytes == 0, 30)
            assert await sink.close(drain_timeout_s=5)
            return sink

        with caplog.at_level(logging.INFO, "cellwatch.sink.influx"):
            sink = asyncio.run(run())
        rows = server.influxql(
            'SELECT "score", "is_anomaly", "cycle", "robot" FROM "secured"."autogen"."anomaly_score"'
        )
    assert not (tmp_path / "spool" / "rejected").exists()  # nothing was refused for good
    assert sink.stats.batches_rejected == 0
    samples = {name: value for name, _, _, value in sink.metric_samples()}
    assert samples["cellwatch_sink_auth_failures_total"] >= 3
    assert "InfluxDB refused our credentials (HTTP 401): check the token/password; retrying" in caplog.text
    assert "InfluxDB refused our credentials (HTTP 403)" in caplog.text
    assert "rotated-pw-2" not in caplog.text
    [series] = rows["results"][0]["series"]  # type: ignore[index]
    assert [v[1:] for v in series["values"]] == [row[1:] for row in expected(pts)]
