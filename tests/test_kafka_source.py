"""The Kafka source on its own, against the real broker (Tansu): backpressure pauses the partitions
instead of blocking the consumer, and offsets are committed only for acknowledged messages."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from brokers import TansuServer
from services import poll

from ingest.kafka import KafkaSource
from ingest.loadgen import Target, plan, publish
from ingest.voraus import schema

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000


def test_a_slow_pipeline_pauses_the_partitions_and_loses_nothing(
    tansu: TansuServer, tiny_cell_and_model: tuple[Path, Path]
) -> None:
    cell, _ = tiny_cell_and_model
    topic, group = f"bp_{uuid.uuid4().hex[:8]}", f"g_{uuid.uuid4().hex[:8]}"
    tansu.create_topic(topic, 2)

    async def scenario() -> tuple[int, int, bool, int, list[int]]:
        batches = list(plan(cell, ["r1", "r2"], start_ns=T0, rows_per_message=20, max_cycles=3))
        await publish(
            Target.parse(f"kafka://{tansu.bootstrap}/{topic}"), iter(batches), fmt="arrow", speed=1e9
        )
        source = KafkaSource(
            bootstrap=[tansu.bootstrap],
            topic=topic,
            group=group,
            signals=schema.MACHINE_SIGNALS,
            queue_messages=40,
            session_timeout_ms=6000,
            commit_interval_s=0.05,
        )
        await source.start()
        try:
            # nobody consumes: the fetch loop must pause the partitions, not block or grow the queue
            await poll(lambda: source.paused, 60)
            held_while_paused = source._queue.qsize()
            assigned = source.assigned
            received = []
            deliveries = source.deliveries()
            async with asyncio.timeout(60):
                while len(received) < len(batches):
                    delivery = await anext(deliveries)
                    received.append(delivery)
            resumed = not source.paused
            for delivery in received[: len(received) // 2]:
                delivery.ack()
            # the committed offsets cover exactly the acknowledged prefix of each partition
            await poll(lambda: sum(source._committed.values()) >= len(received) // 2, 30)
            committed = sorted(source._committed.values())
        finally:
            await source.aclose()
        return len(received), held_while_paused, resumed, assigned, committed

    received, held, resumed, assigned, committed = asyncio.run(scenario())
    assert held <= 40  # the bound: queue_messages
    assert assigned == 2  # still a member of its group while paused
    assert resumed
    assert received > 40
    assert sum(committed) == received // 2
