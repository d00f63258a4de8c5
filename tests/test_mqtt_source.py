"""The MQTT source on its own, against the real Mosquitto, whose log (``log_type all``) is asked what
went over the wire:

- Receive Maximum bounds the QoS 1 messages in flight, and a flow stuck at that bound is reported;
- QoS 0 messages are delivered, counted and never acknowledged (a PUBACK for them is a protocol error
  that Mosquitto disconnects on);
- a flood of QoS 0 messages is bounded by the incoming queue, and never costs a QoS 1 message;
- the Maximum Packet Size announced in CONNECT makes Mosquitto drop a grossly oversized message for
  us instead of sending it, and good traffic goes on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoServer
from services import poll

from ingest.loadgen import Target, plan, publish
from ingest.messages import encode_arrow
from ingest.mqtt import MqttSource
from ingest.stream import Delivery
from ingest.voraus import schema

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    """Mosquitto logging every packet it sends and receives."""
    server = MosquittoServer(tmp_path_factory.mktemp("mosquitto-chatty"))
    server.config.write_text(server.config.read_text() + "log_type all\n")
    with server:
        yield server


def broker_log(server: MosquittoServer) -> str:
    return (server.root / "mosquitto.log").read_text(errors="replace")


def metric(source: MqttSource, name: str, **labels: str) -> float:
    [value] = [v for n, _, lab, v in source.metric_samples() if n == name and lab == {**lab, **labels}]
    return value


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def new_source(server: MosquittoServer, prefix: str, client_id: str, **kw: Any) -> MqttSource:
    return MqttSource(
        host="127.0.0.1",
        port=server.port,
        topic=f"{prefix}/+/signals",
        client_id=client_id,
        signals=schema.MACHINE_SIGNALS,
        **kw,
    )


async def send(server: MosquittoServer, messages: list[tuple[str, bytes, int]]) -> None:
    """Publish (topic, payload, qos) in order from one connection; QoS 1 publishes wait for the
    broker's PUBACK, so when this returns the broker has routed every QoS 1 message."""
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", server.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic, payload, qos in messages:
            await client.publish(topic, payload, qos=qos)


async def take(deliveries: AsyncIterator[Delivery], n: int, ack: bool = True) -> list[Delivery]:
    out = []
    for _ in range(n):
        delivery = await asyncio.wait_for(anext(deliveries), 20)
        if ack:
            delivery.ack()
        out.append(delivery)
    return out


def one_message(cell: Path) -> bytes:
    batch = next(iter(plan(cell, ["r1"], start_ns=T0, rows_per_message=10, max_cycles=1)))
    return encode_arrow(batch, schema.MACHINE_SIGNALS)


def test_receive_maximum_bounds_what_is_in_flight_and_a_stall_is_reported(
    broker: MosquittoServer, tiny_cell_and_model: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cell, _ = tiny_cell_and_model
    prefix, client_id = unique("rm"), unique("cw")

    async def scenario() -> tuple[int, int, int, bool, int]:
        source = new_source(broker, prefix, client_id, receive_maximum=4, stall_after_s=0.5)
        await source.start()
        try:
            batches = list(plan(cell, ["r1"], start_ns=T0, rows_per_message=100, max_cycles=1))
            url = f"mqtt://127.0.0.1:{broker.port}/{prefix}/+/signals"
            await publish(Target.parse(url), iter(batches), fmt="arrow", speed=1e9)
            deliveries = source.deliveries()
            held = await take(deliveries, 4, ack=False)
            await poll(lambda: source.stalled, 20)
            in_flight = source.outstanding
            # Every message is PUBACKed to the publisher, so the broker has decided for each whether
            # to send it to us; Mosquitto logs a send before that PUBACK. Four, not more, went out.
            sent_to_us = broker_log(broker).count(f"Sending PUBLISH to {client_id} ")
            for delivery in held:
                delivery.ack()
            rest = await take(deliveries, len(batches) - len(held))
            await poll(lambda: not source.stalled, 20)
            return len(batches), in_flight, sent_to_us, source.stalled, len(held) + len(rest)
        finally:
            await source.aclose()

    with caplog.at_level(logging.ERROR, logger="cellwatch.ingest.mqtt"):
        sent, in_flight, sent_to_us, stalled_at_end, received = asyncio.run(scenario())
    assert sent > 4
    assert in_flight == 4
    assert sent_to_us == 4
    assert not stalled_at_end
    assert received == sent
    assert any("MQTT flow stalled: 4 messages (receive_maximum)" in r.getMessage() for r in caplog.records)


def test_qos0_is_delivered_counted_and_never_acknowledged(
    broker: MosquittoServer, tiny_cell_and_model: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cell, _ = tiny_cell_and_model
    payload = one_message(cell)
    prefix, client_id = unique("q0"), unique("cw")
    topic = f"{prefix}/r1/signals"

    async def scenario() -> tuple[int, dict[str, float]]:
        source = new_source(broker, prefix, client_id)
        await source.start()
        try:
            deliveries = source.deliveries()
            await send(broker, [(topic, payload, 0)] * 3 + [(topic, payload, 1)] * 2)
            received = await take(deliveries, 5)
            # one more QoS 1 round trip: the broker handles our packets in order, so once it logs
            # this PUBACK it has handled everything we sent before it (a PUBACK for mid 0 included)
            await send(broker, [(topic, payload, 1)])
            received += await take(deliveries, 1)
            await poll(lambda: broker_log(broker).count(f"Received PUBACK from {client_id} ") >= 3, 20)
            names = (
                "cellwatch_mqtt_qos0_total",
                "cellwatch_source_unacked",
                "cellwatch_mqtt_reconnects_total",
            )
            return len(received), {name: metric(source, name) for name in names}
        finally:
            await source.aclose()

    with caplog.at_level(logging.WARNING, logger="cellwatch.ingest.mqtt"):
        received, metrics = asyncio.run(scenario())
    assert received == 6
    assert metrics == {
        "cellwatch_mqtt_qos0_total": 3,
        "cellwatch_source_unacked": 0,
        "cellwatch_mqtt_reconnects_total": 0,
    }
    text = broker_log(broker)
    acked = re.findall(rf"Received PUBACK from {client_id} \(Mid: (\d+)", text)
    assert len(acked) == 3  # the three QoS 1 messages
    assert "0" not in acked  # nothing for QoS 0
    assert f"Client {client_id} disconnected due to protocol error" not in text
    assert sum("arrive at QoS 0: at most once" in r.getMessage() for r in caplog.records) == 1


def test_a_qos0_flood_is_bounded_and_costs_no_qos1_message(
    broker: MosquittoServer, tiny_cell_and_model: tuple[Path, Path]
) -> None:
    """Nothing is consumed while 50 QoS 0 and then 8 QoS 1 messages arrive: the queue admits 10
    QoS 0 messages (the rest are dropped and counted); every QoS 1 message still arrives."""
    cell, _ = tiny_cell_and_model
    payload = one_message(cell)
    prefix = unique("flood")
    topic = f"{prefix}/r1/signals"

    async def scenario() -> tuple[int, dict[str, float]]:
        source = new_source(broker, prefix, unique("cw"), receive_maximum=4, max_queued_qos0=10)
        await source.start()
        try:
            await send(broker, [(topic, payload, 0)] * 50 + [(topic, payload, 1)] * 8)
            await poll(lambda: metric(source, "cellwatch_mqtt_dropped_total", qos="0") >= 40, 20)
            received = await take(source.deliveries(), 18)
            return len(received), {
                "qos0": metric(source, "cellwatch_mqtt_qos0_total"),
                "dropped0": metric(source, "cellwatch_mqtt_dropped_total", qos="0"),
                "dropped1": metric(source, "cellwatch_mqtt_dropped_total", qos="1"),
                "unacked": metric(source, "cellwatch_source_unacked"),
            }
        finally:
            await source.aclose()

    received, metrics = asyncio.run(scenario())
    assert received == 18  # 10 QoS 0 + 8 QoS 1
    assert metrics == {"qos0": 10, "dropped0": 40, "dropped1": 0, "unacked": 0}


def test_maximum_packet_size_keeps_an_oversized_message_at_the_broker(
    broker: MosquittoServer, tiny_cell_and_model: tuple[Path, Path]
) -> None:
    """A payload just over max_message_bytes still arrives and is rejected as too_large; one over the
    announced Maximum Packet Size is dropped by Mosquitto for us (and logged there), never read."""
    cell, _ = tiny_cell_and_model
    good = one_message(cell)
    prefix, client_id = unique("big"), unique("cw")
    topic = f"{prefix}/r1/signals"
    limit = len(good) + 100

    async def scenario() -> tuple[MqttSource, int]:
        source = new_source(broker, prefix, client_id, max_message_bytes=limit)
        await source.start()
        try:
            near_miss = b"x" * (limit + 1)
            oversized = b"x" * (source.max_packet_bytes + 1)
            messages = [good, near_miss, oversized, good, good]
            await send(broker, [(topic, m, 1) for m in messages])
            received = await take(source.deliveries(), 3)
            return source, len(received)
        finally:
            await source.aclose()

    source, received = asyncio.run(scenario())
    assert received == 3
    assert source.messages_in == 4  # three good ones and the near miss: the oversized one never came
    assert dict(source.rejections) == {"too_large": 1}
    # Mosquitto logs the drop before it sends the good messages behind it, which we received
    assert f"Dropping too large outgoing PUBLISH for {client_id} " in broker_log(broker)
