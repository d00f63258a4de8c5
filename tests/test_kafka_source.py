"""The Kafka source on its own, against the real broker (Tansu): backpressure pauses the partitions
instead of blocking the consumer, and holds across a rebalance; offsets are committed only for
acknowledged messages (asked of the broker, as a restarted daemon would find them); a dead-letter
topic that refuses writes neither stops the source nor lets the bad message's offset be committed."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import Committed, TansuServer
from services import poll

from ingest.kafka import KafkaSource
from ingest.loadgen import plan
from ingest.messages import SignalBatch, encode_arrow
from ingest.stream import Delivery
from ingest.voraus import schema

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated recording (4 cycles at 100 Hz): messages to send, no model needed."""
    from ingest.sim.dataset import write_recording
    from ingest.sim.scenarios import plan_recording

    path = tmp_path_factory.mktemp("kafka_cell") / "cell.parquet"
    write_recording(path, plan_recording(cycles=4, seed=3), seed=3)
    return path


def messages(cell: Path, robots: list[str], cycles: int, rows: int = 100) -> list[SignalBatch]:
    return list(
        plan(cell, robots, start_ns=T0, rows_per_message=rows, test_split_only=False, max_cycles=cycles)
    )


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def produce(bootstrap: str, topic: str, items: list[tuple[int, bytes, bytes]]) -> None:
    """(partition, key, value) in order, each acknowledged before the next: offsets follow the list."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 2**20)
    await producer.start()
    try:
        for partition, key, value in items:
            await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


def sample(source: KafkaSource, name: str) -> float:
    """One of the source's metric samples (as the Prometheus endpoint shows it)."""
    values = [
        v for n, _, labels, v in source.metric_samples() if n == name and labels == {"source": source.name}
    ]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def _source(bootstrap: str, topic: str, group: str, **kw: Any) -> KafkaSource:
    options: dict[str, Any] = {"session_timeout_ms": 3000, "commit_interval_s": 0.05, **kw}
    return KafkaSource(
        bootstrap=[bootstrap], topic=topic, group=group, signals=schema.MACHINE_SIGNALS, **options
    )


async def _anext_within(deliveries: AsyncIterator[Delivery], seconds: float) -> Delivery:
    async with asyncio.timeout(seconds):
        return await anext(deliveries)


def test_a_slow_pipeline_pauses_the_partitions_and_loses_nothing(tansu: TansuServer, cell: Path) -> None:
    """Nobody consumes: the partitions are paused with the queue at its bound, the member stays in its
    group; once consumed it resumes, and the broker holds exactly the acknowledged prefix per partition."""
    topic, group = unique("bp"), unique("g")
    tansu.create_topic(topic, 2)
    batches = messages(cell, ["r0", "r1"], cycles=3, rows=20)
    items = [(int(b.robot[1]), b.robot.encode(), encode_arrow(b, schema.MACHINE_SIGNALS)) for b in batches]

    async def scenario() -> tuple[float, float, bool, dict[int, int | None], dict[int, int]]:
        await produce(tansu.bootstrap, topic, items)
        source = _source(tansu.bootstrap, topic, group, queue_messages=40)
        await source.start()
        try:
            await poll(lambda: source.paused, 60)
            held_while_paused = sample(source, "cellwatch_source_queued")
            assigned = sample(source, "cellwatch_kafka_assigned_partitions")
            received: list[Delivery] = []
            deliveries = source.deliveries()
            while len(received) < len(batches):
                received.append(await _anext_within(deliveries, 60))
            resumed = not source.paused
            # acknowledge the first half of each partition's messages (in offset order)
            per_partition: dict[int, list[Delivery]] = {0: [], 1: []}
            for delivery in received:
                per_partition[int(delivery.batch.robot[1])].append(delivery)
            acked = {p: len(ds) // 2 for p, ds in per_partition.items()}
            for p, ds in per_partition.items():
                for delivery in ds[: acked[p]]:
                    delivery.ack()
            async with Committed(tansu.bootstrap, group, topic) as committed:
                offsets = await committed.wait_for(dict(acked), 30)
        finally:
            await source.aclose()
        return held_while_paused, assigned, resumed, offsets, acked

    held, assigned, resumed, offsets, acked = asyncio.run(scenario())
    assert held <= 40  # the bound: queue_messages
    assert assigned == 2  # still a member of its group while paused
    assert resumed
    assert len(batches) > 40
    assert offsets == acked  # each partition's acknowledged prefix, not more


def test_two_members_a_stalled_pipeline_and_a_forced_rebalance(tansu: TansuServer, cell: Path) -> None:
    """Member A does not drain its deliveries, so it pauses; member B joins and forces a rebalance.
    After it, A's newly assigned partitions stay paused (what A fetched but did not hand out stays
    within the bound: queue_messages, here 20, while its partitions hold far more), what A had
    fetched from a revoked partition is never handed to its pipeline (B reads it from the committed
    offset instead), and every message is delivered exactly once across the two members."""
    topic, group = unique("rb"), unique("g")
    tansu.create_topic(topic, 4)
    robots = [f"r{p}" for p in range(4)]  # robot rP is sent to partition P
    batches = messages(cell, robots, cycles=3)
    per_partition = Counter(int(b.robot[1]) for b in batches)
    bound = 20
    assert min(per_partition.values()) * 2 > 2 * bound  # A's share after the rebalance dwarfs the bound
    items = [(int(b.robot[1]), b.robot.encode(), encode_arrow(b, schema.MACHINE_SIGNALS)) for b in batches]
    everything = Counter((b.robot, b.time_ns) for b in batches)

    async def scenario() -> dict[str, Any]:
        await produce(tansu.bootstrap, topic, items)
        a = _source(tansu.bootstrap, topic, group, queue_messages=bound, client_id="member-a")
        b = _source(tansu.bootstrap, topic, group, queue_messages=bound, client_id="member-b")
        yielded: dict[str, Counter[tuple[str, int]]] = {"a": Counter(), "b": Counter()}
        foreign: list[tuple[str, int, frozenset[int]]] = []  # yielded from a partition the member lacks

        async def drain(name: str, source: KafkaSource) -> None:
            async for delivery in source.deliveries():
                owned = source.assigned_partitions
                partition = int(delivery.batch.robot[1])
                if partition not in owned:
                    foreign.append((name, partition, owned))
                yielded[name][(delivery.batch.robot, delivery.batch.time_ns)] += 1
                delivery.ack()

        await a.start()
        drain_b: asyncio.Task[None] | None = None
        drain_a: asyncio.Task[None] | None = None
        try:
            await poll(lambda: a.assigned == 4 and a.paused, 60)  # A holds all four, stalled
            queued_before = sample(a, "cellwatch_source_queued")
            await b.start()
            drain_b = asyncio.create_task(drain("b", b))
            await poll(lambda: a.assigned == 2 and b.assigned == 2, 60)
            mine_a, mine_b = a.assigned_partitions, b.assigned_partitions
            share_b = sum(per_partition[p] for p in mine_b)
            # B reads all of its partitions (from the committed offsets: none, so from the start):
            # time enough for A to run past its bound if its new partitions were not paused
            await poll(lambda: sum(yielded["b"].values()) >= share_b, 60)
            await poll(lambda: a.paused, 30)
            queued_after = sample(a, "cellwatch_source_queued")
            dropped = sample(a, "cellwatch_kafka_revoked_dropped_total")
            # now A's pipeline catches up
            drain_a = asyncio.create_task(drain("a", a))
            await poll(lambda: sum(yielded["a"].values()) >= sum(per_partition[p] for p in mine_a), 60)
            async with Committed(tansu.bootstrap, group, topic) as committed:
                offsets = await committed.wait_for({p: per_partition[p] for p in range(4)}, 30)
            stable = a.assigned_partitions == mine_a and b.assigned_partitions == mine_b
        finally:
            for task in (drain_a, drain_b):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (drain_a, drain_b) if t is not None), return_exceptions=True)
            await a.aclose()
            await b.aclose()
        return {
            "queued_before": queued_before,
            "queued_after": queued_after,
            "dropped": dropped,
            "foreign": foreign,
            "yielded": yielded,
            "offsets": offsets,
            "mine": (mine_a, mine_b),
            "stable": stable,
        }

    r = asyncio.run(scenario())
    assert r["stable"], "a second rebalance happened: the counts below would not mean what they say"
    assert r["queued_before"] <= bound
    assert r["queued_after"] <= bound  # backpressure held across the rebalance
    assert r["foreign"] == []  # no member handed out a message of a partition it did not hold
    mine_a, mine_b = r["mine"]
    assert mine_a.isdisjoint(mine_b)
    assert mine_a | mine_b == {0, 1, 2, 3}
    total = r["yielded"]["a"] + r["yielded"]["b"]
    assert total == everything  # every message once across the two members: none scored twice
    assert r["offsets"] == {p: per_partition[p] for p in range(4)}
    assert r["dropped"] > 0  # A had fetched messages of the partitions it lost, and dropped them


class SchemaTansuServer(TansuServer):
    """Tansu with its embedded schema registry (`schema/<topic>.json` under its root, reread every
    second): a record produced to a topic with a schema that it does not conform to is refused by the
    broker (INVALID_RECORD). That is a genuine dead-letter outage: the broker is up, the source's
    consumer works, only writes to the dead-letter topic fail; a schema that accepts anything ends it.
    (Deleting the schema file does not: Tansu 0.6 accepts for a second, then refuses every write to
    the topic again.)"""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.schemas = root / "schema"
        self.schemas.mkdir(exist_ok=True)

    def command(self) -> list[str]:
        # the registry URL is resolved against the broker's working directory, its root
        return [
            *super().command(),
            "--schema-registry",
            "file://./schema",
            "--schema-registry-cache-expiry",
            "1s",
        ]

    def refuse(self, topic: str) -> Path:
        """Only JSON objects with a `never` field are accepted on `topic`: a dead letter is not one."""
        path = self.schemas / f"{topic}.json"
        path.write_text(
            '{"type": "object", "properties": {"value": {"type": "object", "required": ["never"]}},'
            ' "required": ["value"]}'
        )
        return path

    def accept(self, topic: str) -> None:
        """Any record is accepted on `topic` again (the broker rereads the schema within a second)."""
        (self.schemas / f"{topic}.json").write_text("{}")


@pytest.fixture(scope="module")
def schema_tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaTansuServer]:
    with SchemaTansuServer(tmp_path_factory.mktemp("tansu_schema")) as server:
        yield server


async def _read_topic(bootstrap: str, topic: str, count: int, seconds: float = 30) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(seconds):
            while len(records) < count:
                batches = await consumer.getmany(timeout_ms=500)
                records += [r for rs in batches.values() for r in rs]
    finally:
        await consumer.stop()
    return records


GARBAGE = b"\x00not a signal message"


def test_a_dead_letter_topic_that_refuses_writes_holds_the_offset_not_the_source(
    schema_tansu: SchemaTansuServer, cell: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One partition: good messages, one bad one, more good ones. The dead-letter topic refuses the copy
    (see SchemaTansuServer). The source keeps running and hands out every good message after the bad
    one; the broker's committed offset stops at the bad message (its record would be lost otherwise)
    while the write is retried with backoff, counted and logged (rate-limited). Once the topic accepts
    it, the copy is written and the offset moves past everything."""
    caplog.set_level(logging.INFO, logger="cellwatch.ingest.kafka")
    server = schema_tansu
    topic, dead, group = unique("dl"), unique("dead"), unique("g")
    server.create_topic(topic, 1)
    server.create_topic(dead, 1)
    server.refuse(dead)
    batches = messages(cell, ["r0"], cycles=2)
    first, rest = batches[: len(batches) // 2], batches[len(batches) // 2 :]
    encoded = [(0, b"r0", encode_arrow(b, schema.MACHINE_SIGNALS)) for b in batches]
    bad_offset = len(first)
    items = [*encoded[:bad_offset], (0, b"r0", GARBAGE), *encoded[bad_offset:]]

    async def scenario() -> dict[str, Any]:
        await produce(server.bootstrap, topic, items)
        source = _source(
            server.bootstrap, topic, group, dead_letter_topic=dead, dead_letter_retry_s=(0.2, 1.0)
        )
        await source.start()
        got: list[SignalBatch] = []

        async def drain() -> None:
            async for delivery in source.deliveries():
                got.append(delivery.batch)
                delivery.ack()

        consumer = asyncio.create_task(drain())
        try:
            async with Committed(server.bootstrap, group, topic) as committed:
                # every good message, the ones after the bad one included, reaches the pipeline
                await poll(lambda: len(got) == len(batches), 60)
                # the copy keeps failing (retried), and the broker's offset stops at the bad message
                await poll(lambda: sample(source, "cellwatch_dead_letter_failures_total") >= 3, 30)
                during = await committed.wait_for({0: bad_offset}, 30)
                failures_then = sample(source, "cellwatch_dead_letter_failures_total")
                written_then = sample(source, "cellwatch_dead_letters_total")
                pending_then = sample(source, "cellwatch_dead_letters_pending")
                running = not consumer.done()
                server.accept(dead)  # the dead-letter topic accepts writes again
                after = await committed.wait_for({0: len(items)}, 60)
            written_after = sample(source, "cellwatch_dead_letters_total")
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await source.aclose()
        letters = await _read_topic(server.bootstrap, dead, 1)
        return {
            "got": got,
            "during": during,
            "after": after,
            "failures": failures_then,
            "written": (written_then, written_after),
            "pending": pending_then,
            "running": running,
            "letters": letters,
        }

    r = asyncio.run(scenario())
    assert r["running"]
    assert [(b.robot, b.time_ns) for b in r["got"]] == [(b.robot, b.time_ns) for b in first + rest]
    assert r["during"] == {0: bad_offset}  # not past the bad message while its copy is not written
    assert r["failures"] >= 3
    assert r["written"] == (0, 1)
    assert r["pending"] == 1
    assert r["after"] == {0: len(items)}  # everything once the copy is written
    [letter] = r["letters"]
    headers = dict(letter.headers)
    assert letter.value == GARBAGE
    assert letter.key == b"r0"
    assert headers["source"] == f"{topic}[0]@{bad_offset}".encode()
    errors = [
        rec for rec in caplog.records if rec.name == "cellwatch.ingest.kafka" and rec.levelno == logging.ERROR
    ]
    assert errors
    assert "dead letter" in errors[0].getMessage()
    assert len(errors) < r["failures"]  # rate-limited: not one line per attempt
    assert any("written again" in rec.getMessage() for rec in caplog.records)


def test_dead_letters_backing_up_pause_the_partitions_until_written(
    schema_tansu: SchemaTansuServer, cell: Path
) -> None:
    """A flood of bad messages while the dead-letter topic refuses writes: the unwritten copies stop at
    their bound (the partitions are paused, the member stays in its group) instead of piling up; when
    the topic accepts writes again, every copy is written and every offset committed."""
    server = schema_tansu
    topic, dead, group = unique("flood"), unique("dead"), unique("g")
    server.create_topic(topic, 1)
    server.create_topic(dead, 1)
    server.refuse(dead)
    bad = 60
    bound = 4

    async def scenario() -> dict[str, Any]:
        await produce(server.bootstrap, topic, [(0, b"r0", GARBAGE + str(i).encode()) for i in range(bad)])
        source = _source(
            server.bootstrap,
            topic,
            group,
            dead_letter_topic=dead,
            dead_letter_queue=bound,
            queue_messages=20,  # one fetch: 5 records
            dead_letter_retry_s=(0.2, 0.5),
        )
        await source.start()
        try:
            await poll(
                lambda: source.paused and sample(source, "cellwatch_dead_letter_failures_total") >= 2, 30
            )
            await poll(lambda: sample(source, "cellwatch_dead_letter_failures_total") >= 4, 30)
            pending = sample(source, "cellwatch_dead_letters_pending")
            fetched = source.messages_in
            assigned = sample(source, "cellwatch_kafka_assigned_partitions")
            server.accept(dead)
            async with Committed(server.bootstrap, group, topic) as committed:
                after = await committed.wait_for({0: bad}, 60)
            written = sample(source, "cellwatch_dead_letters_total")
        finally:
            await source.aclose()
        letters = await _read_topic(server.bootstrap, dead, bad)
        return {
            "pending": pending,
            "fetched": fetched,
            "assigned": assigned,
            "after": after,
            "written": written,
            "letters": letters,
        }

    r = asyncio.run(scenario())
    assert r["pending"] <= bound + 5  # the bound, plus at most one fetch
    assert r["fetched"] < bad  # it stopped fetching
    assert r["assigned"] == 1  # still in its group while paused
    assert r["after"] == {0: bad}
    assert r["written"] == bad
    sources = [dict(rec.headers)["source"] for rec in r["letters"]]
    assert sources == [f"{topic}[0]@{i}".encode() for i in range(bad)]  # in order, each once
