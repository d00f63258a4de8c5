"""MQTT publish-back sink (aiomqtt, MQTT 5): anomaly scores and alerts as JSON on the plant bus.

A **best-effort live feed**, not a store: the authoritative record is InfluxDB, written through its durable
on-disk spool. This sink never holds the pipeline up. `write` only encodes the points and appends them to a
bounded in-memory queue; one background task drains the queue to the broker and (re)connects with
exponential backoff (with jitter) while the broker is away. When the queue is full the *oldest* messages are
dropped, counted in ``stats.dropped`` and reported by a rate-limited warning. A daemon restart loses what
was still queued.

- One message per point, on the topic of its robot: scores on ``cell/{robot}/anomaly``, alerts on
  ``cell/{robot}/alert`` (templates; ``/``, ``+`` and ``#`` in a robot id become ``_``).
- Payload: ``{"robot", "model", "mode" (scores), "time_ns", ...fields}`` as UTF-8 JSON (non-finite floats
  become ``null``), with the MQTT 5 content type ``application/json``.
- QoS 1 by default, and retained, so that a subscriber connecting later gets each robot's latest state at
  once (alerts too unless ``retain_alerts=False``).
- Order is kept: messages go out in write order, up to ``max_inflight`` awaiting their PUBACK. After a lost
  connection the unacknowledged ones are sent again (at least once; a retained state sent twice is
  harmless).

The queue logic shared with the Kafka sink (`daemon.sinks.kafka`) lives here as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.layout import ALERT_MEASUREMENT, SCORE_MEASUREMENT
from daemon.sinks.lineprotocol import Point

log = logging.getLogger("cellwatch.sink.mqtt")

# what the feeds carry: scores and alerts; the localization maps (hundreds of points per alert) stay in
# InfluxDB and the file sink
FEED_MEASUREMENTS = frozenset({SCORE_MEASUREMENT, ALERT_MEASUREMENT})
_TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\0": "_"})


# --- shared with the Kafka sink ---------------------------------------------------------------------------
@dataclass
class PublishStats:
    published: int = 0  # acknowledged by the broker (QoS 0: written to the socket)
    dropped: int = 0  # the oldest queued messages, dropped because the queue was full
    reconnects: int = 0  # connections made again after a failed attempt or a lost connection
    rejected: int = 0  # refused for good (too large, bad topic, not authorized): dropped, logged
    last_error: str = ""


@dataclass(frozen=True)
class Outgoing:
    """One encoded message: where it goes, its key (Kafka), its payload, whether it is retained (MQTT)."""

    topic: str
    key: bytes
    payload: bytes
    retain: bool = False


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    return value


def point_message(point: Point) -> dict[str, Any]:
    """A point as a flat JSON object: its tags (robot, model, mode), ``time_ns``, then its fields."""
    message: dict[str, Any] = dict(point.tags)
    message["time_ns"] = int(point.time_ns)
    message.update((key, _json_value(value)) for key, value in point.fields.items())
    return message


def encode_point(point: Point) -> bytes:
    return json.dumps(point_message(point), separators=(",", ":"), allow_nan=False).encode()


def is_alert(point: Point) -> bool:
    return point.measurement == ALERT_MEASUREMENT


def jittered(delay: float) -> float:
    return delay * (0.8 + 0.4 * random.random())  # noqa: S311 (jitter, not cryptography)


class Backlog:
    """A bounded FIFO of messages waiting for the broker. When it is full, the oldest messages go: they are
    counted in ``stats.dropped`` and reported by a warning at most every ``warn_every_s`` seconds."""

    def __init__(
        self, limit: int, stats: PublishStats, what: str, logger: logging.Logger, warn_every_s: float = 10.0
    ) -> None:
        if limit < 1:
            raise ValueError(f"queue_points must be at least 1, got {limit}")
        self.limit = limit
        self.stats = stats
        self.what = what
        self.log = logger
        self.warn_every_s = warn_every_s
        self.wake = asyncio.Event()  # set when messages arrive
        self._items: deque[Outgoing] = deque()
        self._unreported = 0
        self._last_warning = -math.inf

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: Iterable[Outgoing]) -> None:
        self._items.extend(items)
        self._trim()
        self.wake.set()

    def requeue(self, items: Sequence[Outgoing]) -> None:
        """Put messages that did not go out back at the front, in their order."""
        self._items.extendleft(reversed(items))
        self._trim()

    def popleft(self) -> Outgoing:
        return self._items.popleft()

    def take(self, count: int) -> list[Outgoing]:
        return [self._items.popleft() for _ in range(min(count, len(self._items)))]

    def _trim(self) -> None:
        excess = len(self._items) - self.limit
        if excess <= 0:
            return
        for _ in range(excess):
            self._items.popleft()
        self.stats.dropped += excess
        self._unreported += excess
        if time.monotonic() - self._last_warning >= self.warn_every_s:
            self.report()

    def report(self) -> None:
        """Log the drops not reported yet (called on drops, rate-limited, and when delivery resumes)."""
        if not self._unreported:
            return
        self.log.warning(
            "%s: queue full (%d messages), dropping the oldest: %d dropped since the last report, %d in all "
            "(the broker is unreachable or too slow; InfluxDB still has every point)",
            self.what,
            self.limit,
            self._unreported,
            self.stats.dropped,
        )
        self._unreported = 0
        self._last_warning = time.monotonic()


class QueuedPublisher:
    """The non-blocking half of a publish sink: `write` queues, a background task (`_run`) delivers."""

    what = "publish sink"
    client_id: str
    reconnect_min_s: float
    reconnect_max_s: float

    def __init__(self, queue_points: int, logger: logging.Logger) -> None:
        self.stats = PublishStats()
        self.log = logger
        self._backlog = Backlog(queue_points, self.stats, self.what, logger)
        self._drained = asyncio.Event()  # set while nothing is queued or in flight
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Future[bool] | None = None
        self._attempts = 0  # connection attempts so far

    # subclasses
    def _message(self, point: Point) -> Outgoing:
        raise NotImplementedError

    async def _run(self) -> None:
        raise NotImplementedError

    def _in_flight(self) -> int:
        raise NotImplementedError

    async def _shutdown(self, drained: bool) -> None:
        """Release the connection once the background task has stopped."""

    # the Sink protocol
    async def start(self) -> None:
        """Start delivering; returns after the first connection attempt. Never raises because the broker is
        down: the background task keeps trying, with backoff."""
        if self._task is not None:
            return
        self._first_attempt = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"{self.what} delivery")
        self._task.add_done_callback(self._task_done)
        first: set[asyncio.Future[Any]] = {self._first_attempt, self._task}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # a bug, not an outage: let it show

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("%s: delivery stopped", self.what, exc_info=task.exception())

    async def write(self, points: Sequence[Point]) -> None:
        """Queue the points and return at once (never waits for the broker, never raises because of it)."""
        items = [self._message(point) for point in points if point.measurement in FEED_MEASUREMENTS]
        if items:
            self._drained.clear()
            self._backlog.put(items)

    async def flush(self) -> None:
        """Nothing to wait for: this is a live feed, not the store the pipeline's acks depend on."""

    @property
    def pending(self) -> int:
        """Messages queued or sent but not yet acknowledged."""
        return len(self._backlog) + self._in_flight()

    async def close(self, drain_timeout_s: float = 10.0) -> bool:
        """Deliver what can be delivered within `drain_timeout_s`, then stop. True if nothing was left."""
        if self._task is not None and not self._task.done() and self.pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=max(drain_timeout_s, 0.0))
        drained = self.pending == 0
        left = self.pending
        self._backlog.report()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):  # a failure is logged already
                await self._task
        await self._shutdown(drained)
        if not drained:
            self.log.warning("%s closed with %d messages not delivered", self.what, left)
        return drained

    # for `_run`
    def _attempted(self, connected: bool) -> None:
        if self._first_attempt is not None and not self._first_attempt.done():
            self._first_attempt.set_result(connected)

    def _update_drained(self) -> None:
        if self.pending == 0:
            self._drained.set()

    async def _connect_with_backoff(
        self, connect: Callable[[], Awaitable[Any]], errors: tuple[type[BaseException], ...], where: str
    ) -> Any:
        """`connect()` until it works, with jittered exponential backoff; a connection made after a
        failed attempt or a lost one counts as a reconnect. The first attempt ends `start()`."""
        backoff = self.reconnect_min_s
        while True:
            self._attempts += 1
            try:
                client = await connect()
            except errors as err:
                self.stats.last_error = str(err)
                self._attempted(False)
                self.log.warning(
                    "%s unreachable (%s); retrying in %.1f s, %d messages queued",
                    where,
                    err,
                    backoff,
                    self.pending,
                )
                await asyncio.sleep(jittered(backoff))  # reconnect backoff
                backoff = min(backoff * 2, self.reconnect_max_s)
                continue
            if self._attempts > 1:
                self.stats.reconnects += 1
            self._attempted(True)
            self.log.info("publishing to %s as %s", where, self.client_id)
            self._backlog.report()
            return client

    async def _wait_for_messages(self) -> None:
        self._backlog.wake.clear()
        if not self._backlog:
            await self._backlog.wake.wait()


# --- MQTT -------------------------------------------------------------------------------------------------
class MqttPublishSink(QueuedPublisher):
    """Publishes scores and alerts to an MQTT broker; a best-effort live feed (InfluxDB is the store)."""

    what = "MQTT publish sink"

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        client_id: str,
        score_topic: str = "cell/{robot}/anomaly",
        alert_topic: str = "cell/{robot}/alert",
        qos: int = 1,
        retain: bool = True,
        retain_alerts: bool | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        queue_points: int = 10_000,
        max_inflight: int = 100,
        keepalive_s: int = 30,
        connect_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        super().__init__(queue_points, log)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        for template in (score_topic, alert_topic):
            try:
                topic = template.format(robot="r")
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"topic template may only use {{robot}}: {template!r}") from None
            if not topic or "+" in topic or "#" in topic:
                raise ValueError(f"not a topic to publish to: {template!r}")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.score_topic = score_topic
        self.alert_topic = alert_topic
        self.qos = qos
        self.retain = retain
        self.retain_alerts = retain if retain_alerts is None else retain_alerts
        self.username = username
        self._password = password
        self.tls_context = tls_context
        self.max_inflight = max(1, max_inflight)
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connected = False
        self._inflight: deque[tuple[Outgoing, asyncio.Task[None]]] = deque()
        self._properties: Any = None

    def __repr__(self) -> str:  # no credentials
        return f"MqttPublishSink({self.host}:{self.port}, client_id={self.client_id!r})"

    def _message(self, point: Point) -> Outgoing:
        robot = str(point.tags.get("robot", "unknown"))
        alert = is_alert(point)
        template = self.alert_topic if alert else self.score_topic
        topic = template.format(robot=robot.translate(_TOPIC_UNSAFE) or "_")
        return Outgoing(
            topic, robot.encode(), encode_point(point), self.retain_alerts if alert else self.retain
        )

    def _in_flight(self) -> int:
        return len(self._inflight)

    def _new_client(self) -> Any:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if self._properties is None:
            self._properties = Properties(PacketTypes.PUBLISH)
            self._properties.PayloadFormatIndicator = 1  # UTF-8
            self._properties.ContentType = "application/json"
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            username=self.username,
            password=self._password,
            tls_context=self.tls_context,
            keepalive=self.keepalive_s,
            timeout=self.connect_timeout_s,
            max_inflight_messages=self.max_inflight,
            max_queued_outgoing_messages=0,
        )
        client.pending_calls_threshold = self.max_inflight  # aiomqtt warns above it (default 10)
        return client

    async def _run(self) -> None:
        import aiomqtt

        while True:
            client = await self._connect_with_backoff(
                self._connect, (aiomqtt.MqttError, OSError), f"MQTT broker {self.host}:{self.port}"
            )
            self.connected = True
            try:
                await self._pump(client)
            except aiomqtt.MqttError as err:
                self.stats.last_error = str(err)
                self.log.warning("MQTT connection to %s:%d lost: %s", self.host, self.port, err)
            finally:
                self.connected = False
                self._requeue_inflight()
                await self._disconnect(client)
            await asyncio.sleep(jittered(self.reconnect_min_s))  # reconnect backoff

    async def _connect(self) -> Any:
        client = self._new_client()
        attempt = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # closing while connecting: let the attempt end (bounded by the timeouts) and close its socket
            with contextlib.suppress(Exception):
                await attempt
                await self._disconnect(client)
            _close_socket(client)
            raise
        except BaseException:
            _close_socket(client)  # e.g. no CONNACK in time: the TCP connection is still open
            raise
        return client

    async def _disconnect(self, client: Any) -> None:
        lost = client._disconnected
        if lost.done() and not lost.cancelled():
            lost.exception()  # already reported as "connection lost"
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)
        _close_socket(client)

    async def _pump(self, client: Any) -> None:
        """Publish in order, up to `max_inflight` awaiting PUBACK, until the connection is lost."""
        import aiomqtt

        lost: asyncio.Future[None] = client._disconnected
        inflight = self._inflight
        while True:
            while self._backlog and len(inflight) < self.max_inflight:
                message = self._backlog.popleft()
                publish = client.publish(
                    message.topic,
                    message.payload,
                    qos=self.qos,
                    retain=message.retain,
                    properties=self._properties,
                    timeout=math.inf,  # a lost connection ends the wait (below), not a timeout
                )
                inflight.append((message, asyncio.ensure_future(publish)))
            idle: asyncio.Task[Any] | None = None
            if inflight:
                waiter: asyncio.Future[Any] = inflight[0][1]
            else:
                self._update_drained()
                self._backlog.wake.clear()  # here, not in the task: a write before it runs must count
                idle = waiter = asyncio.ensure_future(self._backlog.wake.wait())
            try:
                await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if idle is not None:
                    idle.cancel()
            while inflight and inflight[0][1].done():
                message, task = inflight[0]
                error = task.exception()
                if error is not None and (lost.done() or not _refused(error)):
                    raise aiomqtt.MqttError(f"publish failed: {error}")
                inflight.popleft()
                if error is None:
                    self.stats.published += 1
                else:
                    self.stats.rejected += 1
                    self.stats.last_error = str(error)
                    self.log.error("MQTT refused a message for %s: %s", message.topic, error)
            if lost.done():
                reason = lost.exception() if not lost.cancelled() else None
                raise aiomqtt.MqttError(f"disconnected: {reason}" if reason else "disconnected")
            self._update_drained()

    def _requeue_inflight(self) -> None:
        again: list[Outgoing] = []
        for message, task in self._inflight:
            if task.done() and not task.cancelled() and task.exception() is None:
                self.stats.published += 1
                continue
            if not task.done():
                task.cancel()  # the PUBACK will not come on this connection
            again.append(message)
        self._inflight.clear()
        self._backlog.requeue(again)


def _refused(error: BaseException) -> bool:
    """A message the client refuses for good (not a connection problem)."""
    import aiomqtt
    from paho.mqtt.enums import MQTTErrorCode

    if isinstance(error, ValueError):
        return True  # paho: bad topic or payload
    return isinstance(error, aiomqtt.MqttCodeError) and error.rc in (
        MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE,
        MQTTErrorCode.MQTT_ERR_INVAL,
    )


def _close_socket(client: Any) -> None:
    """Make sure the paho socket is closed (aiomqtt leaves it open in a few failure paths)."""
    paho = getattr(client, "_client", None)
    if paho is not None and getattr(paho, "_sock", None) is not None:
        with contextlib.suppress(Exception):
            paho._sock_close()
