"""The spool's durability: directory fsyncs, and damaged segments quarantined without stopping delivery.

The quarantine test at the end runs the real InfluxSink against the real InfluxDB (stopped while the
batches are spooled, so they wait on disk where a byte of one of them is flipped).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

import pytest
from services import InfluxServer, wait_until
from test_influx_sink import expected, points, stored

from daemon.sinks.influx import InfluxSink, InfluxTarget
from daemon.sinks.lineprotocol import encode_batch
from daemon.sinks.spool import HEADER, Spool


def flip_byte(segment: Path, offset: int) -> None:
    data = bytearray(segment.read_bytes())
    data[offset] ^= 0xFF
    segment.write_bytes(bytes(data))


def drain(spool: Spool) -> list[bytes]:
    seen = []
    while (record := spool.peek()) is not None:
        seen.append(record.payload)
        spool.ack(record)
    return seen


def test_directory_is_fsynced_after_a_new_segment_and_a_cursor_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file's name and a rename live in the directory: without fsyncing it, a power failure can
    lose a segment that was reported durable, or bring back an old cursor (batches sent twice)."""
    events: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    spool = Spool(tmp_path, segment_bytes=16)
    assert events == ["dir"]  # the first segment was created
    events.clear()
    spool.append(b"a" * 20)
    assert events == ["file"]  # the record
    events.clear()
    spool.append(b"b" * 20)  # the first segment is past 16 bytes: a new one
    assert events == ["file", "dir", "file"]  # old segment synced, new name synced, record synced
    events.clear()
    record = spool.peek()
    assert record is not None
    spool.ack(record)
    assert events == ["file", "dir"]  # cursor.json.tmp synced, then renamed and the directory synced
    spool.close()


def test_a_full_spool_refuses_but_an_empty_one_takes_an_oversized_batch(tmp_path: Path) -> None:
    """Bounded, but a batch bigger than the bound would otherwise wait forever for room that never comes."""
    with Spool(tmp_path, max_bytes=100) as spool:
        spool.append(b"x" * 500)
        assert spool.pending_bytes == 500 + HEADER.size
        record = spool.peek()
        assert record is not None
        assert record.payload == b"x" * 500


def test_a_damaged_record_quarantines_its_segment_and_delivery_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, segment_bytes=1)  # one record per segment
    for i in range(4):
        spool.append(f"batch {i:02d} ....".encode())
    first = spool.peek()
    assert first is not None
    spool.ack(first)
    segments = sorted(tmp_path.glob("seg-*.log"))
    flip_byte(segments[1], HEADER.size + 3)  # batch 01's payload: its CRC no longer matches
    with caplog.at_level(logging.ERROR, "cellwatch.spool"):
        rest = drain(spool)
    assert rest == [b"batch 02 ....", b"batch 03 ...."]  # not stopped at the damage
    assert spool.quarantined == 1
    [aside] = list((tmp_path / "quarantine").glob("*.log"))
    assert aside.read_bytes()[HEADER.size :] != b"batch 01 ...."  # kept as it was, damage and all
    reason = aside.with_suffix(".reason").read_text()
    assert "checksum mismatch at offset 0" in reason
    assert any("quarantined" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    spool.append(b"after")  # appending goes on
    assert drain(spool) == [b"after"]
    spool.close()


def test_intact_records_of_a_damaged_segment_are_requeued(tmp_path: Path) -> None:
    """Only the damaged record is missing: the intact ones around it in its segment (here the one it
    is being appended to) are found again by their magic and checksum and delivered after the rest."""
    spool = Spool(tmp_path)  # one big segment
    for payload in (b"first batch", b"second batch", b"third batch"):
        spool.append(payload)
    [segment] = list(tmp_path.glob("seg-*.log"))
    flip_byte(segment, HEADER.size + len(b"first batch") + HEADER.size + 2)  # inside "second batch"
    assert drain(spool) == [b"first batch", b"third batch"]
    assert spool.quarantined == 1
    [aside] = list((tmp_path / "quarantine").glob("*.log"))
    assert (
        "1 intact undelivered record(s) of this segment were re-queued"
        in aside.with_suffix(".reason").read_text()
    )
    spool.append(b"fourth batch")  # appending goes on, in a fresh segment
    assert drain(spool) == [b"fourth batch"]
    spool.close()
    with Spool(tmp_path) as reopened:  # and the cursor moved on durably
        assert reopened.peek() is None


def test_a_damaged_segment_found_at_open_is_quarantined(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=1) as spool:
        for i in range(3):
            spool.append(f"batch {i:02d} ....".encode())
    segments = sorted(tmp_path.glob("seg-*.log"))
    flip_byte(segments[0], HEADER.size + 1)
    with Spool(tmp_path, segment_bytes=1) as reopened:
        assert reopened.quarantined == 1
        assert drain(reopened) == [b"batch 01 ....", b"batch 02 ...."]
    with Spool(tmp_path) as spool:  # several records in one segment: the intact ones are re-queued
        for i in range(3):
            spool.append(f"more {i}".encode())
    [segment] = list(tmp_path.glob("seg-*.log"))  # the last one: damage inside it is no torn tail
    flip_byte(segment, segment.read_bytes().index(b"more 0"))
    with Spool(tmp_path) as reopened:
        reopened.append(b"after the restart")
        assert drain(reopened) == [b"more 1", b"more 2", b"after the restart"]
    assert len(list((tmp_path / "quarantine").glob("*.reason"))) == 2  # one per damaged segment


@pytest.mark.slow
def test_a_flipped_byte_mid_run_leaves_later_batches_delivered(influx: InfluxServer, tmp_path: Path) -> None:
    """Before: `SpoolCorrupt` from peek() ended the delivery task silently and nothing was delivered
    again until a restart. Now the damaged segment is quarantined (counted in a metric) and every later
    batch reaches InfluxDB."""
    influx.create_database("quarantine")
    target = InfluxTarget(url=influx.url, database="quarantine", timeout_s=2)
    batches = [points(i * 10, 10) for i in range(5)]

    async def run() -> InfluxSink:
        sink = InfluxSink(
            target,
            tmp_path / "spool",
            batch_points=10,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
            spool_segment_bytes=1,  # one batch per segment
        )
        await sink.start()
        await sink.write(batches[0])
        await sink.flush()
        await asyncio.to_thread(wait_until, lambda: sink.pending_bytes == 0, 30, "batch 0 delivered")
        influx.stop()
        try:
            for batch in batches[1:]:
                await sink.write(batch)
                await sink.flush()
            waiting = {p.read_bytes()[HEADER.size :]: p for p in (tmp_path / "spool").glob("seg-*.log")}
            assert encode_batch(batches[1]) in waiting  # batches 1..4 wait on disk, one segment each
            flip_byte(waiting[encode_batch(batches[2])], HEADER.size + 40)
        finally:
            influx.start()
        await asyncio.to_thread(wait_until, lambda: sink.pending_bytes == 0, 60, "the spool to drain")
        assert sink.status().state == "ok"  # the delivery task is alive and well
        await sink.write(points(100, 10))  # and still delivers what comes after
        await sink.flush()
        await asyncio.to_thread(wait_until, lambda: sink.pending_bytes == 0, 30, "the last batch")
        await sink.close(drain_timeout_s=5)
        return sink

    try:
        sink = asyncio.run(run())
    finally:
        if not influx.ping():
            influx.start()
    metrics = {name: value for name, _, _, value in sink.metric_samples()}
    assert metrics["cellwatch_spool_quarantined_total"] == 1
    survivors = batches[0] + batches[1] + batches[3] + batches[4] + points(100, 10)
    assert stored(influx, "quarantine") == expected(survivors)
    assert len(list((tmp_path / "spool" / "quarantine").glob("*.reason"))) == 1
