"""The InfluxDB sink against the real InfluxDB 1.6.7 (Debian), and its durable spool.

InfluxDB is started by the test session on private ports (tests/services.py); the outage test stops
and restarts that real server mid-stream.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from services import InfluxServer, free_port, wait_until

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
            InfluxTarget(url=influx.url, database="missing_db"), tmp_path / "spool", batch_points=10
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
