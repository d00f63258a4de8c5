"""Camera frames over the real Mosquitto and Tansu brokers (ingest/camera/brokers.py): PNG and JPEG
payloads come out as the pixels decode_image gives, with robot, camera, time, cycle and frame number
from the topic or key and the user properties or headers; messages that are not frames are rejected by
reason and the frames after them still come; frames the pipeline did not acknowledge are delivered again
after a restart with the same client id or group, acknowledged ones are not."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from brokers import Committed, MosquittoServer, TansuServer
from PIL import Image

from ingest.camera.brokers import (
    KafkaFrameSource,
    MqttFrameSource,
    frame_headers,
    frame_key,
    template_levels,
)
from ingest.images import decode_image
from ingest.messages import MessageError
from ingest.source import Delivery, Frame, Source

pytestmark = pytest.mark.slow
T0 = 1_714_543_200_000_000_000
MAX_BYTES = 30_000
MAX_PIXELS = 50_000


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def encoded(fmt: str, seed: int, size: tuple[int, int] = (24, 32), noise: bool = True) -> bytes:
    """A `fmt` ("PNG" or "JPEG") image of `size` (height, width): noise (incompressible) or flat."""
    rng = np.random.default_rng(seed)
    shape = (*size, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8) if noise else np.full(shape, 90, np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def pixels(payload: bytes) -> np.ndarray:
    return decode_image(payload)


def frame(delivery: Delivery) -> Frame:
    assert isinstance(delivery.item, Frame), delivery.item
    return delivery.item


async def take(deliveries: AsyncIterator[Delivery], n: int, ack: bool = True) -> list[Delivery]:
    out = []
    for _ in range(n):
        async with asyncio.timeout(30):
            delivery = await anext(deliveries)
        if ack:
            delivery.ack()
        out.append(delivery)
    return out


def decoder_threads(source: Source) -> int:
    """Threads of the source's own decoder pool (created on its first decode)."""
    return sum(t.name.startswith(f"{source.name}-decode") for t in threading.enumerate())


def unacked(source: Source) -> float:
    [value] = [v for n, _, labels, v in source.metric_samples() if n == "cellwatch_source_unacked"]
    return value


# ---------------------------------------------------------------------------------------------- MQTT


def mqtt_source(server: MosquittoServer, prefix: str, client_id: str) -> MqttFrameSource:
    return MqttFrameSource(
        host="127.0.0.1",
        port=server.port,
        topic=f"{prefix}/{{robot}}/camera/{{camera}}",
        client_id=client_id,
        receive_maximum=16,
        connect_retry_s=5,
        max_bytes=MAX_BYTES,
        max_pixels=MAX_PIXELS,
    )


async def mqtt_publish(server: MosquittoServer, messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
    """(topic, payload, user properties) at QoS 1, in order, each PUBACKed by the broker."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    async with aiomqtt.Client("127.0.0.1", server.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic, payload, user in messages:
            properties = Properties(PacketTypes.PUBLISH)
            if user:
                properties.UserProperty = list(user.items())
            await client.publish(topic, payload, qos=1, properties=properties)


def test_mqtt_frames_arrive_decoded_and_what_is_not_a_frame_is_rejected(
    mosquitto: MosquittoServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera publishing PNG or JPEG frames on <prefix>/<robot>/camera/<camera> gets each frame scored
    once, with the pixels of its payload and the robot, camera, time, cycle and frame number it sent
    (a frame without user properties takes the time it arrived). Corrupt, oversized, too-many-pixel,
    bad-property and bad-topic messages are counted by reason and acknowledged; frames after them come."""
    prefix = unique("cam")
    first = encoded("PNG", 1)
    second = encoded("JPEG", 2)
    last = encoded("PNG", 3, (20, 30))
    big = encoded("PNG", 4, (120, 120))
    assert len(big) > MAX_BYTES > max(len(first), len(second), len(last))
    wide = encoded("PNG", 5, (300, 300), noise=False)  # 90,000 pixels in a few hundred bytes
    assert len(wide) < MAX_BYTES
    props = {"time_ns": str(T0), "cycle": "17", "frame": "41"}
    messages = [
        (f"{prefix}/r1/camera/top", first, props),
        (f"{prefix}/r2/camera/side", second, {"time_ns": str(T0 + 5), "frame": "7", "other": "x"}),
        (f"{prefix}/r1/camera/top", b"this is not an image", {}),
        (f"{prefix}/r1/camera/top", first[: len(first) // 2], {}),  # truncated
        (f"{prefix}/r1/camera/top", big, {}),
        (f"{prefix}/r1/camera/top", wide, {}),
        (f"{prefix}/r1/camera/top", first, {**props, "time_ns": "12.5"}),
        (f"{prefix}/r1/camera/top", first, {**props, "cycle": "-3"}),
        (f"{prefix}/r%1/camera/top", first, props),
        (f"{prefix}/r1/camera/top", last, {}),  # the 10th message: seq 10
    ]

    async def scenario() -> tuple[list[Frame], int, int, dict[str, int], float, int, MqttFrameSource]:
        source = mqtt_source(mosquitto, prefix, unique("cw"))
        await source.start()
        try:
            before = time.time_ns()
            await mqtt_publish(mosquitto, messages)
            got = [frame(d) for d in await take(source.deliveries(), 3)]
            after = time.time_ns()
            return (
                got,
                before,
                after,
                dict(source.rejections),
                unacked(source),
                decoder_threads(source),
                source,
            )
        finally:
            await source.aclose()

    with caplog.at_level(logging.WARNING, logger="cellwatch.ingest.mqtt"):
        got, before, after, rejections, left, threads, source = asyncio.run(scenario())
    assert source.kind == "frames"
    assert source.name == f"mqtt_frames:{prefix}/{{robot}}/camera/{{camera}}"
    a, b, c = got
    assert (a.robot, a.camera, a.time_ns, a.cycle, a.seq, a.label) == ("r1", "top", T0, 17, 41, None)
    assert a.ref == f"{prefix}/r1/camera/top#41"
    assert (b.robot, b.camera, b.time_ns, b.cycle, b.seq) == ("r2", "side", T0 + 5, None, 7)
    assert (c.robot, c.camera, c.cycle, c.seq, c.ref) == ("r1", "top", None, 10, f"{prefix}/r1/camera/top#10")
    assert before <= c.time_ns <= after  # no time_ns: the time it arrived
    for f, payload in zip(got, (first, second, last), strict=True):
        assert f.image.dtype == np.uint8
        assert np.array_equal(f.image, pixels(payload))
    assert rejections == {
        "not_an_image": 1,
        "unreadable": 1,
        "too_large": 1,
        "too_many_pixels": 1,
        "bad_header": 2,
        "bad_topic": 1,
    }
    assert left == 0  # the rejected messages were acknowledged by the source
    logged = [r.getMessage() for r in caplog.records]
    assert f"rejected (bad_header): {prefix}/r1/camera/top: time_ns must be a non-negative integer" in (
        "\n".join(logged)
    )
    assert any("'12.5'" in line for line in logged)  # the value the sender got wrong
    assert any(f"rejected (bad_topic): {prefix}/r%1/camera/top: robot 'r%1'" in line for line in logged)
    assert threads == 1  # decoded in the source's own thread, not on the event loop


def test_mqtt_frames_not_acknowledged_come_again_after_a_restart(mosquitto: MosquittoServer) -> None:
    """The daemon stops with two of four frames written: restarted with the same client id it gets the
    two that were not acknowledged again, and not the two that were."""
    prefix, client_id = unique("redo"), unique("cw")
    topic = f"{prefix}/r1/camera/top"
    payloads = {n: encoded("PNG" if n % 2 else "JPEG", 10 + n) for n in range(1, 6)}

    def message(n: int) -> tuple[str, bytes, dict[str, str]]:
        return topic, payloads[n], {"frame": str(n), "time_ns": str(T0 + n)}

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        source = mqtt_source(mosquitto, prefix, client_id)
        await source.start()
        try:
            await mqtt_publish(mosquitto, [message(n) for n in range(1, 5)])
            first = await take(source.deliveries(), 4, ack=False)
            for delivery in first[:2]:
                delivery.ack()
        finally:
            await source.aclose()
        again = mqtt_source(mosquitto, prefix, client_id)
        await again.start()
        try:
            deliveries = again.deliveries()
            redelivered = await take(deliveries, 2)
            await mqtt_publish(mosquitto, [message(5)])  # whatever comes before it was redelivered
            [fresh] = await take(deliveries, 1)
        finally:
            await again.aclose()
        seqs = [[frame(d).seq for d in ds] for ds in (first, redelivered, [fresh])]
        for ds in (first, redelivered, [fresh]):
            for d in ds:
                assert np.array_equal(frame(d).image, pixels(payloads[frame(d).seq]))
        return seqs[0], seqs[1], seqs[2]

    first, redelivered, fresh = asyncio.run(scenario())
    assert first == [1, 2, 3, 4]
    assert redelivered == [3, 4]
    assert fresh == [5]


# --------------------------------------------------------------------------------------------- Kafka


def kafka_source(server: TansuServer, topic: str, group: str) -> KafkaFrameSource:
    return KafkaFrameSource(
        bootstrap=[server.bootstrap],
        topic=topic,
        group=group,
        queue_messages=16,
        session_timeout_ms=3000,
        max_bytes=MAX_BYTES,
        max_pixels=MAX_PIXELS,
        commit_interval_s=0.05,
    )


Record = tuple[bytes | None, bytes, dict[str, bytes], int | None]  # key, value, headers, timestamp_ms


async def produce(bootstrap: str, topic: str, records: list[Record]) -> None:
    """Records to partition 0 in order, each acknowledged before the next: offsets follow the list."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers, timestamp_ms in records:
            await producer.send_and_wait(
                topic,
                value,
                key=key,
                partition=0,
                headers=list(headers.items()) or None,
                timestamp_ms=timestamp_ms,
            )
    finally:
        await producer.stop()


def test_kafka_frames_arrive_decoded_and_what_is_not_a_frame_is_rejected(tansu: TansuServer) -> None:
    """A camera producing PNG or JPEG frames keyed robot/camera gets each frame scored once, with its
    pixels, robot, camera, time (the time_ns header, else the record's timestamp), cycle and frame number.
    Bad keys, bad headers, oversized and corrupt records are counted by reason and committed past;
    frames after them come, and once they are acknowledged the group's offset is past everything."""
    topic, group = unique("frames"), unique("g")
    tansu.create_topic(topic, 1)
    first, second, last = encoded("PNG", 21), encoded("JPEG", 22), encoded("JPEG", 23, (40, 16))
    big = encoded("PNG", 24, (120, 120))
    headers = {"time_ns": str(T0).encode(), "cycle": b"3", "frame": b"100"}
    stamp_ms = T0 // 1_000_000 + 1234
    records: list[Record] = [
        (b"r1/top", first, headers, None),
        (b"r2/side", second, {"cycle": b"4"}, stamp_ms),  # offset 1: no time_ns, no frame
        (None, first, headers, None),
        (b"r1", first, headers, None),
        (b"r1/top/extra", first, headers, None),
        (b"r 1/top", first, headers, None),
        (b"r1/top", first, {**headers, "frame": b"\xd9\xa3"}, None),  # not ASCII digits
        (b"r1/top", first, {**headers, "time_ns": str(2**63).encode()}, None),
        (b"r1/top", big, headers, None),
        (b"r1/top", b"\x89PNG\r\n\x1a\n but then nothing of the sort", headers, None),
        (b"r1/top", last, {"frame": b"101", "time_ns": str(T0 + 9).encode()}, None),
    ]

    async def scenario() -> dict[str, Any]:
        await produce(tansu.bootstrap, topic, records)
        source = kafka_source(tansu, topic, group)
        await source.start()
        try:
            got = [frame(d) for d in await take(source.deliveries(), 3)]
            async with Committed(tansu.bootstrap, group, topic) as committed:
                offsets = await committed.wait_for({0: len(records)}, 30)
            return {
                "got": got,
                "rejections": dict(source.rejections),
                "offsets": offsets,
                "threads": decoder_threads(source),
                "source": source,
            }
        finally:
            await source.aclose()

    r = asyncio.run(scenario())
    source = r["source"]
    assert source.kind == "frames"
    assert source.name == f"kafka_frames:{topic}"
    a, b, c = r["got"]
    assert (a.robot, a.camera, a.time_ns, a.cycle, a.seq, a.ref) == ("r1", "top", T0, 3, 100, f"{topic}#100")
    assert (b.robot, b.camera, b.cycle, b.seq, b.ref) == ("r2", "side", 4, 2, f"{topic}[0]@1")
    assert b.time_ns == stamp_ms * 1_000_000  # the record's timestamp
    assert (c.robot, c.camera, c.time_ns, c.cycle, c.seq) == ("r1", "top", T0 + 9, None, 101)
    for f, payload in zip(r["got"], (first, second, last), strict=True):
        assert np.array_equal(f.image, pixels(payload))
    assert r["rejections"] == {"bad_key": 4, "bad_header": 2, "too_large": 1, "not_an_image": 1}
    assert r["offsets"] == {0: len(records)}  # the rejected records were committed past
    assert r["threads"] == 1  # decoded in the source's own thread, not in the fetch loop


def test_kafka_frames_not_acknowledged_are_read_again_after_a_restart(tansu: TansuServer) -> None:
    """Four frames, the pipeline acknowledges the first, second and fourth and stops: the group's offset
    stays at the third (offsets are committed as a prefix), so the restarted source reads the third and
    the fourth again, not the first two."""
    topic, group = unique("redo"), unique("g")
    tansu.create_topic(topic, 1)
    payloads = {n: encoded("JPEG" if n % 2 else "PNG", 30 + n) for n in range(1, 6)}

    def record(n: int) -> Record:
        return b"r1/top", payloads[n], {"frame": str(n).encode()}, None

    async def scenario() -> dict[str, Any]:
        await produce(tansu.bootstrap, topic, [record(n) for n in range(1, 5)])
        source = kafka_source(tansu, topic, group)
        await source.start()
        try:
            first = await take(source.deliveries(), 4, ack=False)
            for i in (0, 1, 3):
                first[i].ack()
            async with Committed(tansu.bootstrap, group, topic) as committed:
                held = await committed.wait_for({0: 2}, 30)
        finally:
            await source.aclose()
        again = kafka_source(tansu, topic, group)
        await again.start()
        try:
            deliveries = again.deliveries()
            redelivered = await take(deliveries, 2)
            await produce(tansu.bootstrap, topic, [record(5)])
            [fresh] = await take(deliveries, 1)
            async with Committed(tansu.bootstrap, group, topic) as committed:
                after = await committed.wait_for({0: 5}, 30)
        finally:
            await again.aclose()
        for d in [*first, *redelivered, fresh]:
            assert np.array_equal(frame(d).image, pixels(payloads[frame(d).seq]))
        return {
            "first": [frame(d).seq for d in first],
            "held": held,
            "redelivered": [frame(d).seq for d in redelivered],
            "fresh": frame(fresh).seq,
            "after": after,
        }

    r = asyncio.run(scenario())
    assert r["first"] == [1, 2, 3, 4]
    assert r["held"] == {0: 2}
    assert r["redelivered"] == [3, 4]
    assert r["fresh"] == 5
    assert r["after"] == {0: 5}


# ---------------------------------------------------------------------------------- without a broker


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("time_ns", "1714543200000000000"), ("cycle", "0"), ("frame", "12")], None),
        ([("time_ns", b"5"), ("other", b"\xff")], None),
        ([("time_ns", " 5")], "bad_header"),
        ([("cycle", "+5")], "bad_header"),
        ([("frame", "٣")], "bad_header"),  # an Arabic-Indic digit: int() takes it, the contract does not
        ([("frame", "1_000")], "bad_header"),
        ([("frame", None)], "bad_header"),
        ([("frame", "1"), ("frame", "1")], "bad_header"),
        ([("time_ns", str(2**63))], "bad_header"),
    ],
)
def test_frame_headers_are_ascii_non_negative_integers(
    pairs: list[tuple[str, Any]], expected: str | None
) -> None:
    """A sender's time_ns, cycle and frame are taken only as plain ASCII digits; anything else rejects
    the frame as bad_header with the value in the reason."""
    if expected is None:
        parsed = frame_headers(pairs)
        assert parsed == {k: int(v) for k, v in pairs if k in ("time_ns", "cycle", "frame")}
    else:
        with pytest.raises(MessageError) as err:
            frame_headers(pairs)
        assert err.value.reason == expected


def test_keys_and_templates() -> None:
    """Keys robot/camera and topic templates {robot}/{camera} are read as the config documents."""
    assert frame_key(b"r1/cam.0") == ("r1", "cam.0")
    for key in (None, b"", b"r1", b"r1/", b"/c", b"a/b/c", b"r\xff/c", b"r 1/c", b"r1/" + b"c" * 65):
        with pytest.raises(MessageError) as err:
            frame_key(key)
        assert err.value.reason == "bad_key"
    assert template_levels("cell/{robot}/camera/{camera}") == ("cell/+/camera/+", 1, 3)
    assert template_levels("{camera}/x/{robot}") == ("+/x/+", 2, 0)
    for bad in (
        "cell/{robot}/camera",
        "cell/+/{robot}/{camera}",
        "{robot}/{robot}/{camera}",
        "a/{robot}x/{camera}",
    ):
        with pytest.raises(ValueError, match="topic template"):
            template_levels(bad)
