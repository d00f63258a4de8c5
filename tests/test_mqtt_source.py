"""The MQTT source on its own, against the real Mosquitto: the broker never has more than Receive
Maximum messages unacknowledged on their way to us (the bounded incoming queue), and a flow stuck at
that bound is reported instead of hanging silently."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest
from brokers import MosquittoServer
from services import poll

from ingest.loadgen import Target, plan, publish
from ingest.mqtt import MqttSource
from ingest.voraus import schema

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000


def test_receive_maximum_bounds_what_is_in_flight_and_a_stall_is_reported(
    mosquitto: MosquittoServer, tiny_cell_and_model: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cell, _ = tiny_cell_and_model
    prefix = f"rm_{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[int, int, bool, bool, int]:
        source = MqttSource(
            host="127.0.0.1",
            port=mosquitto.port,
            topic=f"{prefix}/+/signals",
            client_id=f"cw-{uuid.uuid4().hex[:8]}",
            signals=schema.MACHINE_SIGNALS,
            receive_maximum=4,
            stall_after_s=0.5,
        )
        await source.start()
        try:
            batches = list(plan(cell, ["r1"], start_ns=T0, rows_per_message=100, max_cycles=1))
            url = f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals"
            await publish(Target.parse(url), iter(batches), fmt="arrow", speed=1e9)
            deliveries = source.deliveries()
            held = [await anext(deliveries) for _ in range(4)]
            await poll(lambda: source.stalled, 20)
            in_flight = source.outstanding
            # nothing beyond the maximum arrives while the four are unacknowledged
            extra = asyncio.ensure_future(anext(deliveries))
            await asyncio.sleep(0.5)  # a negative check: give a fifth message the chance to arrive
            fifth_early = extra.done()
            for delivery in held:
                delivery.ack()
            rest = [await extra]
            while len(held) + len(rest) < len(batches):
                delivery = await anext(deliveries)
                delivery.ack()
                rest.append(delivery)
            rest[0].ack()
            await poll(lambda: not source.stalled, 20)
            return len(batches), in_flight, fifth_early, source.stalled, len(held) + len(rest)
        finally:
            await source.aclose()

    with caplog.at_level(logging.ERROR, logger="cellwatch.ingest.mqtt"):
        sent, in_flight, fifth_early, stalled_at_end, received = asyncio.run(scenario())
    assert sent > 4
    assert in_flight == 4
    assert not fifth_early
    assert not stalled_at_end
    assert received == sent
    assert any("MQTT flow stalled: 4 messages (receive_maximum)" in r.getMessage() for r in caplog.records)
