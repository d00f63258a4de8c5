"""Publishing scores and alerts back to the plant bus: the MQTT and Kafka publish sinks against real brokers
(Mosquitto 2.0 and Tansu, tests/brokers.py), including brokers that are down at start and mid-stream.

Points are made by the pipeline's own `to_point` and `alert_point`, so the JSON checked here is what the
daemon publishes. Every wait polls a condition with a deadline; nothing sleeps in place of one.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from brokers import MosquittoServer, TansuServer

from daemon.alerts import Alert
from daemon.pipeline import Scored, alert_point, to_point
from daemon.sinks.kafka import KafkaPublishSink
from daemon.sinks.lineprotocol import Point
from daemon.sinks.mqtt import MqttPublishSink
from daemon.windowing import Window

T0 = 1_714_543_200_000_000_000
MODEL = "mvtflow-test"
FAST: dict[str, Any] = {
    "reconnect_min_s": 0.05,
    "reconnect_max_s": 0.2,
}  # quick reconnects once a broker is back


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Unclosed clients warn when collected: collect here, so a leak fails the test that made it."""
    yield
    gc.collect()


# --- points -----------------------------------------------------------------------------------------------
def score(robot: str, cycle: int, value: float, *, anomaly: bool = False) -> Point:
    window = Window(robot, cycle, T0 + cycle * 1_000_000_000, np.zeros((4, 2), dtype=np.float32))
    return to_point(Scored(window, value, value / 2.0, anomaly), MODEL, "cycle", 2.0)


def alert(robot: str, cycle: int) -> Point:
    start = T0 + cycle * 1_000_000_000
    return alert_point(
        Alert(
            robot,
            start,
            peak_score=3.5,
            peak_time_ns=start + 500_000_000,
            peak_cycle=cycle,
            end_ns=start + 2_000_000_000,
            windows=2,
            cycles=[cycle, cycle + 1],
            event_time_ns=start + 400_000_000,
            top_signals=[("motor_current_3", 0.6), ("torque_3", 0.25)],
        ),
        MODEL,
    )


def expected(point: Point) -> dict[str, Any]:
    return {**point.tags, "time_ns": point.time_ns, **point.fields}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def until(condition: Callable[[], bool], within_s: float, what: str) -> None:
    """Poll `condition()` on the event loop until it is true; fail with `what` after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within_s:.1f} s waiting for {what}")
        await asyncio.sleep(0.02)


# --- MQTT helpers -----------------------------------------------------------------------------------------
def subscriber(port: int) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", port, identifier=unique("sub"), protocol=aiomqtt.ProtocolVersion.V5, timeout=5
    )


async def receive(client: aiomqtt.Client, count: int, within_s: float = 5.0) -> list[aiomqtt.Message]:
    got: list[aiomqtt.Message] = []

    async def run() -> None:
        async for message in client.messages:
            got.append(message)
            if len(got) == count:
                return

    await asyncio.wait_for(run(), within_s)
    return got


async def retained(port: int, topic_filter: str, sentinel: str) -> list[aiomqtt.Message]:
    """What a subscriber connecting now gets at once: the retained messages. The broker sends them when it
    takes the subscription, so they all come before a message published after the SUBACK (`sentinel`, a
    topic matching the filter)."""
    async with subscriber(port) as client:
        await client.subscribe(topic_filter, qos=1)
        await client.publish(sentinel, b"end", qos=1)
        got: list[aiomqtt.Message] = []

        async def run() -> None:
            async for message in client.messages:
                if str(message.topic) == sentinel:
                    return
                got.append(message)

        await asyncio.wait_for(run(), 5)
        return got


def decoded(message: aiomqtt.Message) -> dict[str, Any]:
    assert isinstance(message.payload, bytes)
    return dict(json.loads(message.payload))


# --- MQTT -------------------------------------------------------------------------------------------------
def test_mqtt_live_order_retained_state_and_alerts(mosquitto: MosquittoServer) -> None:
    root = unique("plant")
    scores = [score("r1", 1, 0.5), score("r2", 1, 0.7), score("r1", 2, 1.5), score("r2", 2, 0.2)]
    scores.append(score("r1", 3, 4.25, anomaly=True))
    burst = [score("r3", cycle, cycle / 100) for cycle in range(300)]  # more than max_inflight at once
    alerts = [alert("r1", 3)]
    total = len(scores) + len(burst) + len(alerts)

    async def run() -> tuple[list[aiomqtt.Message], list[aiomqtt.Message], list[aiomqtt.Message]]:
        async with subscriber(mosquitto.port) as early:
            await early.subscribe(f"{root}/#", qos=1)
            sink = MqttPublishSink(
                "127.0.0.1",
                mosquitto.port,
                client_id=unique("cellwatch"),
                score_topic=root + "/cell/{robot}/anomaly",
                alert_topic=root + "/cell/{robot}/alert",
                max_inflight=16,
            )
            await sink.start()
            for point in scores[:2]:
                await sink.write([point])
            await sink.write([*scores[2:4], *burst, scores[4], *alerts])
            started = time.monotonic()
            assert await sink.close(drain_timeout_s=5) is True
            assert time.monotonic() - started < 5
            assert (sink.stats.published, sink.stats.dropped, sink.stats.rejected) == (total, 0, 0)
            live = await receive(early, total)
        # subscribers that connect after the writes
        late_scores = await retained(mosquitto.port, f"{root}/cell/+/anomaly", f"{root}/cell/~end/anomaly")
        late_alerts = await retained(mosquitto.port, f"{root}/cell/+/alert", f"{root}/cell/~end/alert")
        return live, late_scores, late_alerts

    live, late_scores, late_alerts = asyncio.run(run())

    # live: every score, in order per robot, on the robot's topic; the alert on the alert topic
    for robot in ("r1", "r2", "r3"):
        topic = f"{root}/cell/{robot}/anomaly"
        got = [decoded(m) for m in live if str(m.topic) == topic]
        assert got == [expected(p) for p in [*scores, *burst] if p.tags["robot"] == robot]
    assert {m.qos for m in live} == {1}
    props = live[0].properties
    assert props is not None
    assert getattr(props, "ContentType", None) == "application/json"
    [alert_message] = [m for m in live if str(m.topic) == f"{root}/cell/r1/alert"]
    body = decoded(alert_message)
    assert body == expected(alerts[0])
    assert body["top_signals"] == "motor_current_3 60%, torque_3 25%"
    assert set(body) == {
        *("robot", "model", "time_ns", "end_ns", "duration_s", "peak_score", "peak_cycle"),
        *("event_time_ns", "windows", "cycles", "top_signals", "text"),
        *("alert_id", "kind", "state", "firing", "updated_ns", "cycle_count"),
    }
    assert (body["state"], body["firing"]) == ("resolved", 0)  # this one has ended

    # late: the latest score of each robot, retained, with every field
    latest = {str(m.topic): decoded(m) for m in late_scores}
    assert len(late_scores) == 3
    assert all(m.retain for m in late_scores)
    assert latest == {
        f"{root}/cell/r1/anomaly": expected(scores[4]),
        f"{root}/cell/r2/anomaly": expected(scores[3]),
        f"{root}/cell/r3/anomaly": expected(burst[-1]),
    }
    assert set(latest[f"{root}/cell/r1/anomaly"]) == {
        *("robot", "model", "mode", "time_ns"),
        *("score", "normalized_score", "threshold", "is_anomaly", "capped", "cycle"),
    }
    assert latest[f"{root}/cell/r1/anomaly"]["is_anomaly"] is True
    assert [decoded(m) for m in late_alerts] == [expected(alerts[0])]


def test_mqtt_broker_down_at_start_and_mid_stream(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Writes return at once while the broker is away; the bounded queue keeps the newest points, counts
    exactly the dropped ones, and delivers the rest once the broker is back (twice: at start, mid-stream)."""
    server = MosquittoServer(tmp_path / "mosquitto")  # port chosen, broker not running yet
    root = unique("plant")
    password = "s3cret-Pa55"  # must never be logged

    async def run() -> MqttPublishSink:
        sink = MqttPublishSink(
            "127.0.0.1",
            server.port,
            client_id=unique("cellwatch"),
            score_topic=root + "/{robot}/anomaly",
            username="cellwatch",
            password=password,
            queue_points=5,
            **FAST,
        )
        started = time.monotonic()
        await sink.start()  # broker down: no exception
        assert time.monotonic() - started < 1
        slowest = 0.0
        for i in range(20):  # 20 robots, one point each, into a queue of 5
            started = time.monotonic()
            await sink.write([score(f"a{i}", 1, float(i))])
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.25
        assert (sink.stats.dropped, sink.pending, sink.stats.published) == (15, 5, 0)
        assert len(queue_full()) == 1  # at the first drop; the others are summed up later

        await asyncio.to_thread(server.start)
        await until(lambda: sink.stats.published == 5, 10, "the queued points to go out")
        assert sink.stats.reconnects == 1
        assert len(queue_full()) == 2
        assert "14 dropped since the last report, 15 in all" in queue_full()[-1]
        first = await retained(server.port, f"{root}/+/anomaly", f"{root}/~end/anomaly")
        assert {str(m.topic): decoded(m)["score"] for m in first} == {
            f"{root}/a{i}/anomaly": float(i) for i in range(15, 20)
        }

        # mid-stream outage: the broker goes away while the sink is connected
        await asyncio.to_thread(server.stop)
        await until(lambda: not sink.connected, 5, "the sink to notice")
        for i in range(6):
            started = time.monotonic()
            await sink.write([score(f"b{i}", 1, float(i))])
            assert time.monotonic() - started < 0.25
        assert (sink.stats.dropped, sink.pending) == (16, 5)
        await asyncio.to_thread(server.start)
        await until(lambda: sink.stats.published == 10, 10, "the points written during the outage")
        assert sink.stats.reconnects == 2
        assert await sink.close(drain_timeout_s=2) is True
        second = await retained(server.port, f"{root}/+/anomaly", f"{root}/~end/anomaly")
        topics = {str(m.topic) for m in second}  # the broker kept its retained messages over the restart
        assert {f"{root}/b{i}/anomaly" for i in range(1, 6)} <= topics
        assert f"{root}/b0/anomaly" not in topics  # the oldest: dropped
        return sink

    def queue_full() -> list[str]:
        return [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]

    caplog.set_level(logging.DEBUG)
    try:
        sink = asyncio.run(run())
    finally:
        server.stop()
    assert len(queue_full()) == 3  # 16 dropped points, 3 warnings: rate-limited, summed up on recovery
    assert password not in caplog.text
    assert password not in repr(sink)


def test_mqtt_close_with_broker_down_gives_up_in_time(tmp_path: Path) -> None:
    server = MosquittoServer(tmp_path / "never-started")

    async def run() -> None:
        sink = MqttPublishSink("127.0.0.1", server.port, client_id=unique("cellwatch"), **FAST)
        await sink.start()
        await sink.write([score("r1", 1, 1.0), alert("r1", 1)])
        started = time.monotonic()
        assert await sink.close(drain_timeout_s=0.3) is False
        assert 0.3 <= time.monotonic() - started < 1.5
        assert sink.pending == 2
        assert sink.stats.published == 0

    asyncio.run(run())


# --- Kafka ------------------------------------------------------------------------------------------------
def crash(server: TansuServer) -> None:
    """Kill the broker (SIGKILL). A SIGTERM'd Tansu takes ~5 s to exit while a client is connected."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait()
    server.stop()  # waits for the port to close


async def consume(bootstrap: str, topics: list[str], count: int, within_s: float = 10.0) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + within_s
        while len(records) < count:
            assert time.monotonic() < deadline, f"got {len(records)} of {count} records"
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def test_kafka_scores_and_alerts_arrive_keyed_by_robot(tansu: TansuServer) -> None:
    scores_topic, alerts_topic = unique("scores"), unique("alerts")
    scores = [score(robot, cycle, cycle + 0.25) for cycle in range(1, 5) for robot in ("r1", "r2", "r3")]
    alerts = [alert("r2", 3), alert("r3", 4)]

    async def run() -> list[Any]:
        sink = KafkaPublishSink(
            [tansu.bootstrap], score_topic=scores_topic, alert_topic=alerts_topic, client_id="cw-test"
        )
        await sink.start()
        await sink.write(scores[:5])
        await sink.write([*scores[5:], *alerts])
        started = time.monotonic()
        assert await sink.close(drain_timeout_s=10) is True
        assert time.monotonic() - started < 10
        assert (sink.stats.published, sink.stats.dropped, sink.stats.rejected) == (14, 0, 0)
        return await consume(tansu.bootstrap, [scores_topic, alerts_topic], 14)

    records = asyncio.run(run())
    assert len(records) == 14
    for topic, points in ((scores_topic, scores), (alerts_topic, alerts)):
        for robot in ("r1", "r2", "r3"):
            got = [r for r in records if r.topic == topic and r.key == robot.encode()]
            want = [p for p in points if p.tags["robot"] == robot]
            assert [json.loads(r.value) for r in got] == [expected(p) for p in want]  # in order per robot


def test_kafka_broker_down_at_start_then_up(tmp_path: Path) -> None:
    server = TansuServer(tmp_path / "tansu")  # not running yet
    topic = unique("scores")

    async def run() -> list[Any]:
        sink = KafkaPublishSink([server.bootstrap], score_topic=topic, queue_points=4, **FAST)
        started = time.monotonic()
        await sink.start()
        for cycle in range(6):
            await sink.write([score("r1", cycle, float(cycle))])
        assert time.monotonic() - started < 1
        assert (sink.stats.dropped, sink.pending) == (2, 4)
        await asyncio.to_thread(server.start)
        await until(lambda: sink.stats.published == 4, 10, "the queued points to go out")
        assert sink.stats.reconnects == 1
        assert await sink.close(drain_timeout_s=5) is True
        return await consume(server.bootstrap, [topic], 4)

    try:
        records = asyncio.run(run())
    finally:
        server.stop()
    assert [json.loads(r.value)["cycle"] for r in records] == [2, 3, 4, 5]  # the oldest two were dropped


def test_kafka_close_gives_up_in_time_when_the_broker_goes_away(tmp_path: Path) -> None:
    server = TansuServer(tmp_path / "tansu")
    topic = unique("scores")

    async def run() -> None:
        sink = KafkaPublishSink([server.bootstrap], score_topic=topic, request_timeout_ms=30_000, **FAST)
        await sink.start()
        await sink.write([score("r1", 1, 1.0)])
        await until(lambda: sink.stats.published == 1, 10, "the first point")
        await asyncio.to_thread(crash, server)
        await sink.write([score("r1", 2, 2.0), score("r1", 3, 3.0)])
        started = time.monotonic()
        assert await sink.close(drain_timeout_s=0.5) is False  # does not wait for request_timeout_ms
        assert time.monotonic() - started < 3

    server.start()
    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_feeds_carry_scores_and_alerts_but_not_localization_maps() -> None:
    """A localization map is hundreds of points per alert: it stays in InfluxDB, off the live feeds."""
    from daemon.pipeline import LOCALIZATION_MEASUREMENT

    async def queued() -> tuple[int, int]:
        sink = MqttPublishSink("127.0.0.1", 1, client_id="feed-filter")  # never started: nothing is sent
        kafka = KafkaPublishSink(["127.0.0.1:1"])
        loc = Point(LOCALIZATION_MEASUREMENT, {"contribution": 1.0}, T0, {"robot": "r1", "signal": "(all)"})
        for s in (sink, kafka):
            await s.write([loc, loc])
            await s.write([score("r1", 1, 3.0), alert("r1", 1)])
        return sink.pending, kafka.pending

    assert asyncio.run(queued()) == (2, 2)
