"""Start-up of the MQTT source while the broker is down, against the real Mosquitto: the source retries
with its reconnect backoff for up to `connect_retry_s` and connects once the broker is up; past that
it gives up with `SourceUnavailable` (not a refusal), and with `connect_retry_s=0` at the first try."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoServer
from services import free_port, poll

from ingest.loadgen import plan
from ingest.messages import encode_arrow
from ingest.mqtt import BrokerRefused, MqttSource
from ingest.stream import SourceUnavailable
from ingest.voraus import schema

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000
RETRY = "unavailable at start"


def new_source(port: int, prefix: str, **kw: Any) -> MqttSource:
    return MqttSource(
        host="127.0.0.1",
        port=port,
        topic=f"{prefix}/+/signals",
        client_id=f"cw-{uuid.uuid4().hex[:8]}",
        signals=schema.MACHINE_SIGNALS,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
        **kw,
    )


def retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum(RETRY in r.getMessage() for r in caplog.records)


def test_a_broker_that_comes_up_during_start_is_connected_to(
    tmp_path: Path, tiny_cell_and_model: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cell, _ = tiny_cell_and_model
    batch = next(iter(plan(cell, ["r7"], start_ns=T0, rows_per_message=10, max_cycles=1)))
    server = MosquittoServer(tmp_path / "mosquitto")  # not started yet
    prefix = f"up_{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[str, int]:
        import aiomqtt

        source = new_source(server.port, prefix, connect_retry_s=120)
        starting = asyncio.create_task(source.start())
        try:
            await poll(lambda: retries(caplog) >= 2, 30)  # it is retrying, not gone
            assert not starting.done()
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(starting, 30)
            async with aiomqtt.Client("127.0.0.1", server.port) as client:
                await client.publish(
                    f"{prefix}/r7/signals", encode_arrow(batch, schema.MACHINE_SIGNALS), qos=1
                )
            delivery = await asyncio.wait_for(anext(source.deliveries()), 20)
            delivery.ack()
            return delivery.batch.robot, int(delivery.batch.signals.shape[0])
        finally:
            starting.cancel()
            await source.aclose()

    try:
        with caplog.at_level(logging.INFO, logger="cellwatch.ingest.mqtt"):
            robot, rows = asyncio.run(scenario())
    finally:
        server.stop()
    assert (robot, rows) == ("r7", 10)
    assert any(f"MQTT connected to 127.0.0.1:{server.port}" in r.getMessage() for r in caplog.records)


def test_a_broker_still_down_after_connect_retry_s_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there

    async def scenario() -> None:
        await new_source(port, "down", connect_retry_s=1.0).start()

    with (
        caplog.at_level(logging.WARNING, logger="cellwatch.ingest.mqtt"),
        pytest.raises(SourceUnavailable, match=rf"MQTT broker 127.0.0.1:{port}: .* attempts in 1 s") as err,
    ):
        asyncio.run(scenario())
    assert not isinstance(err.value, BrokerRefused)
    assert retries(caplog) >= 2


def test_connect_retry_0_fails_at_the_first_attempt(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()

    async def scenario() -> None:
        await new_source(port, "down", connect_retry_s=0).start()

    with (
        caplog.at_level(logging.WARNING, logger="cellwatch.ingest.mqtt"),
        pytest.raises(SourceUnavailable, match=rf"MQTT broker 127.0.0.1:{port}: ") as err,
    ):
        asyncio.run(scenario())
    assert "attempts" not in str(err.value)
    assert retries(caplog) == 0
