"""Camera frames (JPEG/PNG payloads) over MQTT and Kafka, acknowledged like the signal messages.

Both sources are the signal sources' machinery (`ingest.mqtt.MqttStream`, `ingest.kafka.KafkaStream`:
persistent session or consumer group, flow control, hand-made acks, reconnects) with a frame decoder:

- MQTT (`MqttFrameSource`): the topic template names the levels, e.g. ``cell/{robot}/camera/{camera}``,
  subscribed as ``cell/+/camera/+``; robot and camera are read from the message's topic. MQTT 5 user
  properties carry the metadata.
- Kafka (`KafkaFrameSource`): the key is ``robot/camera``; headers carry the metadata.
- Metadata, each optional, ASCII digits (a non-negative integer below 2**63): ``time_ns`` (the frame's
  time; default: MQTT the wall clock when the message is received, Kafka the record's timestamp),
  ``cycle`` (the voraus cycle the frame belongs to), ``frame`` (the camera's frame number). Other user
  properties or headers are ignored.
- The payload is bounded (`max_bytes`, checked before anything is decoded) and decoded by
  `ingest.images.decode_image` (PNG or JPEG, at most `max_pixels`) in the source's own thread (a
  ThreadPoolExecutor of one), never on the event loop; for Kafka, in the stream's decoder task, so the
  fetch loop that keeps the consumer in its group goes on polling while a frame is decoded.
- A message that is not a frame is rejected: counted in `rejections` by reason (``bad_topic``,
  ``bad_key``, ``bad_header``, ``too_large``, or decode_image's: ``empty``, ``not_an_image``,
  ``unreadable``, ``too_many_pixels``, ``zero_size``), logged (rate-limited), acknowledged by the source
  itself, never yielded; the source goes on with the next.
- A delivered frame is acknowledged by the pipeline once its points are written (at-least-once): MQTT
  QoS 1 PUBACKs are sent then, Kafka offsets committed up to the first frame not acknowledged.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np

from ingest.images import ImageRejected, decode_image
from ingest.kafka import KafkaSecurity, KafkaStream
from ingest.messages import ROBOT_PATTERN, MessageError
from ingest.mqtt import MqttStream, MqttTls, payload_bytes
from ingest.source import FRAMES, MAX_FRAME_BYTES, MAX_FRAME_PIXELS, Frame, Kind

BAD_TOPIC: Final = "bad_topic"
BAD_KEY: Final = "bad_key"
BAD_HEADER: Final = "bad_header"
TOO_LARGE: Final = "too_large"
HEADERS: Final = ("time_ns", "cycle", "frame")
"""The user properties (MQTT) or headers (Kafka) a frame may carry."""
_DIGITS: Final = re.compile(rb"[0-9]{1,19}")
_MAX_INT: Final = 2**63 - 1  # an Influx integer field, an int64 timestamp


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def frame_headers(pairs: Iterable[tuple[Any, Any]]) -> dict[str, int]:
    """``time_ns``, ``cycle``, ``frame`` from (name, value) pairs (MQTT user properties: str values;
    Kafka headers: bytes values), those present; others are ignored. Raises MessageError("bad_header")
    for a value that is not ASCII digits of a number below 2**63, or a name given twice."""
    out: dict[str, int] = {}
    for name, value in pairs:
        if name not in HEADERS:
            continue
        if name in out:
            raise MessageError(BAD_HEADER, f"{name} given twice")
        raw = value.encode("utf-8", "replace") if isinstance(value, str) else value
        if not isinstance(raw, bytes) or not _DIGITS.fullmatch(raw) or int(raw) > _MAX_INT:
            raise MessageError(
                BAD_HEADER,
                f"{name} must be a non-negative integer in ASCII digits (below 2**63), got {_show(value)}",
            )
        out[name] = int(raw)
    return out


def check_id(value: str, what: str, reason: str) -> str:
    """`value` if it is a valid robot or camera id (checked as robot ids are); raises MessageError."""
    if not ROBOT_PATTERN.fullmatch(value):
        raise MessageError(reason, f"{what} {_show(value)} is not 1 to 64 characters of [A-Za-z0-9_.-]")
    return value


def frame_key(key: bytes | None) -> tuple[str, str]:
    """(robot, camera) from a Kafka key ``robot/camera``; raises MessageError("bad_key")."""
    if not key:
        raise MessageError(BAD_KEY, "no key (it must be robot/camera)")
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        raise MessageError(BAD_KEY, f"key {_show(key)} is not robot/camera") from None
    parts = text.split("/")
    if len(parts) != 2:
        raise MessageError(BAD_KEY, f"key {_show(text)} is not robot/camera")
    robot = check_id(parts[0], "robot", BAD_KEY)
    camera = check_id(parts[1], "camera", BAD_KEY)
    return robot, camera


def _decode(payload: bytes, max_pixels: int) -> np.ndarray:
    """decode_image, its rejection turned into the MessageError that the streams count (in the thread)."""
    try:
        return decode_image(payload, where="payload", max_bytes=len(payload), max_pixels=max_pixels)
    except ImageRejected as err:
        raise MessageError(err.reason, str(err)) from err


async def decode_frame(
    executor: ThreadPoolExecutor, payload: bytes, *, max_bytes: int, max_pixels: int
) -> np.ndarray:
    """The payload's pixels (uint8 RGB, H x W x 3), decoded in `executor`. Raises MessageError:
    ``too_large`` (more than `max_bytes`, not read) or decode_image's reason."""
    if len(payload) > max_bytes:
        raise MessageError(TOO_LARGE, f"payload of {len(payload)} bytes, more than the limit of {max_bytes}")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(_decode, payload, max_pixels))


def template_levels(template: str) -> tuple[str, int, int]:
    """(subscription, robot level, camera level) of a topic template with one ``{robot}`` and one
    ``{camera}`` level and no wildcard: ``cell/{robot}/camera/{camera}`` -> ``cell/+/camera/+``, 1, 3."""
    levels = template.split("/")
    if levels.count("{robot}") != 1 or levels.count("{camera}") != 1 or any(c in template for c in "+#"):
        raise ValueError(
            f"topic template needs the levels {{robot}} and {{camera}}, once each, and no '+' or '#': "
            f"{template!r}"
        )
    robot, camera = levels.index("{robot}"), levels.index("{camera}")
    subscription = "/".join("+" if i in (robot, camera) else level for i, level in enumerate(levels))
    return subscription, robot, camera


class MqttFrameSource(MqttStream):
    """Frames over MQTT 5 from the topics of `topic` (a template, see `template_levels`), at QoS 1 with
    a persistent session (`client_id`): a frame's PUBACK waits until the pipeline acks it, so frames not
    written when the daemon stops are redelivered.

    Frame: robot and camera from the topic, time from ``time_ns`` (else the wall clock at receipt),
    cycle from ``cycle``, seq from ``frame`` (else the message's number on this source since it started,
    rejected ones counted), ref ``f"{topic}#{seq}"`` with the message's topic (the frame number, or that
    running count: MQTT packet ids are reused and QoS 0 has none), label None.

    Memory: at most `receive_maximum` QoS 1 frames plus `max_queued_qos0` QoS 0 frames are held
    (`max_bytes` each, plus their pixels once decoded)."""

    kind: Kind = FRAMES

    def __init__(
        self,
        *,
        host: str,
        port: int,
        topic: str = "cell/{robot}/camera/{camera}",
        client_id: str = "cellwatch-camera",
        username: str | None = None,
        password: str | None = None,
        tls: MqttTls | None = None,
        session_expiry_s: int = 86_400,
        receive_maximum: int = 64,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        connect_retry_s: float = 60.0,
        max_bytes: int = MAX_FRAME_BYTES,
        max_pixels: int = MAX_FRAME_PIXELS,
        max_queued_qos0: int = 8,
        connect_timeout_s: float = 10.0,
        stall_after_s: float = 30.0,
    ) -> None:
        subscription, self._robot_level, self._camera_level = template_levels(topic)
        super().__init__(
            name=f"mqtt_frames:{topic}",
            host=host,
            port=port,
            subscription=subscription,
            client_id=client_id,
            username=username,
            password=password,
            tls=tls,
            session_expiry_s=session_expiry_s,
            receive_maximum=receive_maximum,
            max_message_bytes=max_bytes,
            max_queued_qos0=max_queued_qos0,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            connect_timeout_s=connect_timeout_s,
            connect_retry_s=connect_retry_s,
            stall_after_s=stall_after_s,
        )
        self.topic = topic
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-decode")
        self._count = 0

    async def _item(self, message: Any) -> Frame:
        received_ns = time.time_ns()
        self._count += 1
        count = self._count
        topic = str(message.topic)
        levels = topic.split("/")  # the subscription matched: the template's number of levels
        robot = check_id(levels[self._robot_level], "robot", BAD_TOPIC)
        camera = check_id(levels[self._camera_level], "camera", BAD_TOPIC)
        properties = getattr(message.properties, "UserProperty", None) or ()
        headers = frame_headers(properties)
        image = await decode_frame(
            self._executor,
            payload_bytes(message),
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
        )
        seq = headers.get("frame", count)
        return Frame(
            robot=robot,
            camera=camera,
            time_ns=headers.get("time_ns", received_ns),
            image=image,
            ref=f"{topic}#{seq}",
            seq=seq,
            cycle=headers.get("cycle"),
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        await super().aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)


class KafkaFrameSource(KafkaStream):
    """Frames from a Kafka topic, shared across daemons by the consumer group `group`; offsets committed
    only up to the first frame not acknowledged by the pipeline, so frames not written when the daemon
    stops are read again.

    Frame: robot and camera from the key ``robot/camera``, time from ``time_ns`` (else the record's
    timestamp, ms -> ns; the wall clock for a record without one), cycle from ``cycle``, seq from
    ``frame`` (else the record's number on this source since it started, rejected ones counted), ref
    ``f"{topic}#{frame}"`` with the frame header, else ``f"{topic}[{partition}]@{offset}"`` (an offset
    names a record only within its partition), label None.

    Memory: at most about `queue_messages` frames are held fetched or decoded before the partitions are
    paused (`max_bytes` each, plus their pixels once decoded)."""

    kind: Kind = FRAMES

    def __init__(
        self,
        *,
        bootstrap: Sequence[str],
        topic: str = "cell.camera",
        group: str = "cellwatch-camera",
        client_id: str = "cellwatch-camera",
        security: KafkaSecurity | None = None,
        start_from: str = "earliest",
        queue_messages: int = 64,
        session_timeout_ms: int = 10_000,
        max_bytes: int = MAX_FRAME_BYTES,
        max_pixels: int = MAX_FRAME_PIXELS,
        commit_interval_s: float = 0.5,
    ) -> None:
        super().__init__(
            name=f"kafka_frames:{topic}",
            bootstrap=bootstrap,
            topic=topic,
            group=group,
            client_id=client_id,
            security=security,
            max_message_bytes=max_bytes,
            start_from=start_from,
            queue_messages=queue_messages,
            session_timeout_ms=session_timeout_ms,
            commit_interval_s=commit_interval_s,
        )
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-decode")
        self._count = 0

    async def _item(self, tp: Any, record: Any) -> Frame:
        self._count += 1
        count = self._count
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        robot, camera = frame_key(record.key)
        headers = frame_headers(record.headers or ())
        if record.value is None:
            raise MessageError("empty", "record without a value")
        image = await decode_frame(
            self._executor, record.value, max_bytes=self.max_bytes, max_pixels=self.max_pixels
        )
        if "time_ns" in headers:
            time_ns = headers["time_ns"]
        elif record.timestamp is not None and record.timestamp >= 0:
            time_ns = int(record.timestamp) * 1_000_000
        else:
            time_ns = time.time_ns()
        frame = headers.get("frame")
        return Frame(
            robot=robot,
            camera=camera,
            time_ns=time_ns,
            image=image,
            ref=f"{tp.topic}#{frame}" if frame is not None else where,
            seq=frame if frame is not None else count,
            cycle=headers.get("cycle"),
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        await super().aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
