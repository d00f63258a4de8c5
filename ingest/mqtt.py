"""MQTT sources (aiomqtt, MQTT 5): robot signals from a topic template such as ``cell/+/signals``
(`MqttSource`), camera frames (`ingest.camera.brokers.MqttFrameSource`). Both are an `MqttStream`: the
connection, flow control, acks and reconnects below are shared; a subclass says what a message is
(`MqttStream._item`: message -> item, raising `MessageError` with the reason of a rejection).

- Signals: the ``+`` level of the template is the robot id.
- QoS 1 with a persistent session (a fixed client id, clean start off, a session expiry), so messages
  published while the daemon restarts wait in the broker and are delivered afterwards.
- Messages are acknowledged (PUBACK) by hand, only once the windows holding their rows are written to
  the sinks or their spool: a SIGKILL loses nothing, the broker redelivers what was not acknowledged.
- QoS 0 (a publisher that sends at QoS 0; the subscription is QoS 1, so the broker delivers at the
  lower of the two) is at-most-once: such a message has no packet id and nothing to acknowledge, so
  its delivery's ack is a no-op (a PUBACK for it is a protocol error: Mosquitto disconnects the
  client). It is scored like any other but lost if the daemon stops first. Counted per source.
- Bounded memory whatever the QoS. QoS 1: the MQTT 5 Receive Maximum, the broker never has more than
  that many unacknowledged messages on their way to us; it has to cover the messages of one open
  cycle per robot (robots x messages per cycle) in cycle mode. QoS 0 is not subject to Receive
  Maximum, so the incoming queue itself is bounded: QoS 0 messages are admitted only while fewer than
  `max_queued_qos0` messages are queued (the rest are dropped and counted), which leaves room for the
  Receive Maximum QoS 1 messages that can be outstanding: a QoS 1 message is never dropped by it.
- Maximum Packet Size (MQTT 5) is announced in CONNECT from `max_message_bytes` plus header room, so
  the broker does not send a grossly oversized message at all (Mosquitto drops it for this client
  and logs "Dropping too large outgoing PUBLISH"); a payload just over `max_message_bytes` still
  arrives and is rejected (``too_large``), counted and acknowledged.
- Start-up retries a broker that is down with the reconnect backoff for up to `connect_retry_s`
  (0: fail at once), then raises `SourceUnavailable`; a broker that refuses us (bad credentials, not
  authorized, untrusted certificate) fails at once with `BrokerRefused`. Later losses reconnect with
  the same backoff, forever. TLS and username/password.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ingest.messages import MessageError, decode
from ingest.source import SIGNALS, Item, Kind
from ingest.stream import Delivery, Rejections, SourceUnavailable, once

log = logging.getLogger("cellwatch.ingest.mqtt")


@dataclass(frozen=True)
class MqttTls:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def robot_position(template: str) -> int:
    """Index of the single ``+`` level of a topic template (the robot id)."""
    levels = template.split("/")
    if "#" in template or levels.count("+") != 1:
        raise ValueError(
            f"topic template needs exactly one '+' level (the robot id) and no '#': {template!r}"
        )
    return levels.index("+")


# Room in Maximum Packet Size above the payload limit: the fixed header (5 bytes), a topic of up to
# MQTT's 65,535 bytes with its length, the packet id and a few properties. A payload between
# max_message_bytes and that limit still arrives and is rejected as too_large (counted, visible).
HEADER_ROOM = 2**16 + 1024

# CONNACK reason codes (MQTT 5) that no retry can fix: the broker is up and refuses us.
_REFUSALS = {
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8A: "banned",
    0x8C: "bad authentication method",
}


class BrokerRefused(SourceUnavailable):
    """The broker answered and refused us (credentials, authorization, certificate): a configuration
    problem that retrying does not fix, raised at once by `start()`."""


def refusal(err: BaseException) -> str | None:
    """Why `err` (from connecting) is a refusal rather than an outage; None for an outage."""
    import aiomqtt
    from aiomqtt.exceptions import MqttConnectError

    if isinstance(err, MqttConnectError):
        code = getattr(err.rc, "value", err.rc)
        return _REFUSALS.get(code) if isinstance(code, int) else None
    # aiomqtt re-raises socket errors as MqttError(str(err)) from None: the original is the context
    cause = err.__context__ if isinstance(err, aiomqtt.MqttError) else err
    if isinstance(cause, ssl.SSLCertVerificationError):
        return "certificate not trusted"
    return None


class Backoff:
    """Exponential backoff between connection attempts, reset by a success."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s, self.max_s = min_s, max_s
        self.next_s = min_s

    def step(self) -> float:
        wait, self.next_s = self.next_s, min(self.next_s * 2, self.max_s)
        return wait

    def reset(self) -> None:
        self.next_s = self.min_s


class IncomingQueue(asyncio.Queue[Any]):
    """aiomqtt's incoming message queue, bounded for both QoS.

    aiomqtt calls `put_nowait` from paho's on_message callback. QoS 1 messages are bounded by the
    broker (Receive Maximum: at most that many unacknowledged, and a queued message is one of them);
    QoS 0 messages are not, so they are admitted only while fewer than `qos0_limit` messages are
    queued. The queue's own `maxsize` is qos0_limit + receive_maximum: at most qos0_limit QoS 0 plus
    receive_maximum - 1 QoS 1 messages can be queued when a QoS 1 message arrives, so a broker that
    honours Receive Maximum never has a QoS 1 message dropped here. One that does not is dropped
    (never acknowledged, so the broker redelivers it on the next connection) and logged as an error.
    Drops are counted by QoS in `dropped`, never raised: aiomqtt would log a warning per message.
    """

    def __init__(
        self, maxsize: int = 0, *, qos0_limit: int, receive_maximum: int, dropped: dict[int, int]
    ) -> None:
        del maxsize  # aiomqtt's max_queued_incoming_messages (left unset): the bound here replaces it
        super().__init__(maxsize=qos0_limit + receive_maximum)
        self.qos0_limit = qos0_limit
        self.dropped = dropped
        self._logged: dict[int, float] = {}

    def put_nowait(self, item: Any) -> None:
        qos = int(getattr(item, "qos", 1))
        if (qos == 0 and self.qsize() >= self.qos0_limit) or self.full():
            self.dropped[qos] = self.dropped.get(qos, 0) + 1
            self._log_drop(qos)
            return
        super().put_nowait(item)

    def _log_drop(self, qos: int) -> None:
        now = time.monotonic()
        if now - self._logged.get(qos, -1e9) < Rejections.every_s:
            return
        self._logged[qos] = now
        if qos == 0:
            log.warning(
                "MQTT incoming queue holds %d messages: QoS 0 messages are dropped (%d so far); "
                "the pipeline is behind. Publish at QoS 1 to be held back instead of dropped",
                self.qsize(),
                self.dropped[0],
            )
        else:
            log.error(
                "MQTT broker sent more than Receive Maximum unacknowledged QoS %d messages: dropped "
                "(%d so far), redelivered on the next connection",
                qos,
                self.dropped[qos],
            )


def _no_ack() -> None:
    """A QoS 0 message has no packet id: there is nothing to acknowledge."""


def payload_bytes(message: Any) -> bytes:
    """A message's payload as bytes; raises MessageError("wrong_type") for anything else."""
    payload = message.payload
    if not isinstance(payload, bytes | bytearray):
        raise MessageError("wrong_type", "payload is not bytes")
    return bytes(payload)


class MqttStream:
    """What every MQTT source shares: the persistent QoS 1 session, Receive Maximum and the bounded
    incoming queue, hand-made PUBACKs, start-up retries and reconnects. A subclass gives `kind`, a
    `name` and `subscription` (the topic filter), and `_item`: what one message is."""

    kind: Kind

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        subscription: str,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: MqttTls | None = None,
        session_expiry_s: int = 86_400,
        receive_maximum: int = 4096,
        max_message_bytes: int = 4 * 2**20,
        max_queued_qos0: int = 1000,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        connect_retry_s: float = 60.0,
        stall_after_s: float = 30.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.subscription = subscription
        self.client_id = client_id
        self.username = username
        self.password = password
        self.tls = tls
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.max_message_bytes = max_message_bytes
        self.max_packet_bytes = min(max_message_bytes + HEADER_ROOM, 2**32 - 1)
        self.max_queued_qos0 = max_queued_qos0
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self.connect_retry_s = connect_retry_s
        self.stall_after_s = stall_after_s
        self.stalled = False  # Receive Maximum reached and nothing acknowledged for stall_after_s
        self._watch: asyncio.Task[None] | None = None
        self.rejections = Rejections()
        self.messages_in = 0
        self.qos0_in = 0  # messages delivered at QoS 0 (at-most-once)
        self.dropped: dict[int, int] = {0: 0, 1: 0}  # by QoS, by the bounded incoming queue
        self.reconnects = 0
        self.unacked = 0  # QoS 1 messages received and not acknowledged yet
        self._client: Any = None
        self._generation = 0

    async def _item(self, message: Any) -> Item:
        """The item one message carries (an aiomqtt Message); raises MessageError to reject it (counted
        by reason and acknowledged). CPU work goes off the event loop here."""
        raise NotImplementedError

    def _new_client(self) -> Any:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry_s
        properties.ReceiveMaximum = self.receive_maximum
        properties.MaximumPacketSize = self.max_packet_bytes
        queue = functools.partial(
            IncomingQueue,
            qos0_limit=self.max_queued_qos0,
            receive_maximum=self.receive_maximum,
            dropped=self.dropped,
        )
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            username=self.username,
            password=self.password,
            tls_context=self.tls.context() if self.tls else None,
            timeout=self.connect_timeout_s,
            queue_type=queue,  # type: ignore[arg-type]  # called as queue_type(maxsize=...)
        )
        # PUBACK only once the data is written (aiomqtt does not expose paho's manual ack)
        client._client.manual_ack_set(True)
        return client

    async def _connect(self) -> Any:
        client = self._new_client()
        await client.__aenter__()
        try:
            await client.subscribe(self.subscription, qos=1)
        except BaseException:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            raise
        self._generation += 1
        self.unacked = 0
        return client

    async def start(self) -> None:
        """Connect and subscribe. A broker that cannot be reached is retried with the reconnect
        backoff for up to `connect_retry_s` (each attempt logged), then `SourceUnavailable`; one that
        refuses us raises `BrokerRefused` at once."""
        import aiomqtt

        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.connect_retry_s
        backoff = Backoff(self.reconnect_min_s, self.reconnect_max_s)
        attempt = 0
        while self._client is None:
            attempt += 1
            try:
                self._client = await self._connect()
            except (aiomqtt.MqttError, OSError) as err:
                where = f"MQTT broker {self.host}:{self.port}"
                why = refusal(err)
                if why is not None:
                    raise BrokerRefused(f"{where} refused the connection ({why}): {err}") from None
                left = give_up_at - loop.time()
                if left <= 0:
                    tried = (
                        f" (after {attempt} attempts in {self.connect_retry_s:.0f} s)" if attempt > 1 else ""
                    )
                    raise SourceUnavailable(f"{where}: {err}{tried}") from None
                wait = min(backoff.step(), left)
                log.warning(
                    "%s unavailable at start (attempt %d: %s); retrying in %.1f s, giving up in %.0f s",
                    where,
                    attempt,
                    err,
                    wait,
                    left,
                )
                await asyncio.sleep(wait)  # reconnect backoff (not waiting on a condition)
        log.info(
            "MQTT connected to %s:%d as %s, topic %s (maximum packet size %d bytes)",
            self.host,
            self.port,
            self.client_id,
            self.subscription,
            self.max_packet_bytes,
        )
        self._watch = asyncio.create_task(self._watch_flow(), name=f"mqtt-flow-{self.subscription}")

    async def _watch_flow(self) -> None:
        """Say so when the broker has sent Receive Maximum messages and none is acknowledged for a
        while: in cycle mode that is a deadlock if robots x messages per cycle exceed the maximum."""
        full_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.stall_after_s / 4))  # a periodic check, not a wait
            if self.unacked < self.receive_maximum:
                if self.stalled:
                    log.info("MQTT flow resumed (%d messages unacknowledged)", self.unacked)
                full_since, self.stalled = None, False
                continue
            full_since = full_since if full_since is not None else loop.time()
            if not self.stalled and loop.time() - full_since >= self.stall_after_s:
                self.stalled = True
                log.error(
                    "MQTT flow stalled: %d messages (receive_maximum) held unacknowledged for %.0f s. "
                    "Either a sink is blocking the pipeline, or receive_maximum is too small to hold "
                    "one open cycle per robot (robots x messages per cycle): raise it",
                    self.unacked,
                    self.stall_after_s,
                )

    def _ack(self, client: Any, generation: int, mid: int) -> None:
        if generation != self._generation:
            return  # that connection is gone; the broker redelivers the message on the new one
        self.unacked -= 1
        client._client.ack(mid, 1)

    def _acker(self, client: Any, generation: int, message: Any) -> Any:
        """The ack for one message: a PUBACK for QoS 1, nothing for QoS 0 (at-most-once)."""
        if message.qos == 0:
            self.qos0_in += 1
            if self.qos0_in == 1:
                log.warning(
                    "MQTT messages on %s arrive at QoS 0: at most once, a message not yet written "
                    "when the daemon stops is lost (cellwatch_mqtt_qos0_total counts them); "
                    "publish at QoS 1 for at-least-once",
                    message.topic,
                )
            return _no_ack
        self.unacked += 1
        return once(functools.partial(self._ack, client, generation, message.mid))

    async def deliveries(self) -> AsyncIterator[Delivery]:
        import aiomqtt

        if self._client is None:
            raise RuntimeError("start() the source first")
        backoff = Backoff(self.reconnect_min_s, self.reconnect_max_s)
        while True:
            client = self._client
            generation = self._generation
            try:
                async for message in client.messages:
                    self.messages_in += 1
                    ack = self._acker(client, generation, message)
                    try:
                        item = await self._item(message)
                    except MessageError as err:
                        self.rejections.add(err.reason, f"{message.topic}: {err}", log)
                        ack()
                        continue
                    yield Delivery(item, ack)
                    backoff.reset()
                raise aiomqtt.MqttError("message stream ended")
            except aiomqtt.MqttError as err:
                log.warning("MQTT connection to %s:%d lost: %s", self.host, self.port, err)
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            self._client = None
            while self._client is None:
                wait = backoff.step()
                log.info("reconnecting to MQTT %s:%d in %.1f s", self.host, self.port, wait)
                await asyncio.sleep(wait)  # reconnect backoff (not waiting on a condition)
                try:
                    self._client = await self._connect()
                    self.reconnects += 1
                    log.info("MQTT reconnected to %s:%d", self.host, self.port)
                except (aiomqtt.MqttError, OSError) as err:
                    log.warning("MQTT reconnect failed: %s", err)

    @property
    def outstanding(self) -> int:
        """QoS 1 messages received whose windows are not written yet (not acknowledged to the broker)."""
        return self.unacked

    def metric_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        source = {"source": self.name}
        return [
            ("cellwatch_source_unacked", "gauge", source, self.unacked),
            ("cellwatch_mqtt_stalled", "gauge", source, int(self.stalled)),
            ("cellwatch_mqtt_reconnects_total", "counter", source, self.reconnects),
            ("cellwatch_mqtt_qos0_total", "counter", source, self.qos0_in),
            *(
                ("cellwatch_mqtt_dropped_total", "counter", {**source, "qos": str(qos)}, count)
                for qos, count in sorted(self.dropped.items())
            ),
        ]

    def close(self) -> None:
        """Nothing is opened before start()."""

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
            self._client = None


class MqttSource(MqttStream):
    """Robot signals: every message is a `SignalBatch` (Arrow or JSON, `ingest.messages.decode`) of the
    robot named by the ``+`` level of `topic`."""

    kind: Kind = SIGNALS

    def __init__(
        self,
        *,
        host: str,
        port: int,
        topic: str,
        client_id: str,
        signals: Sequence[str],
        username: str | None = None,
        password: str | None = None,
        tls: MqttTls | None = None,
        session_expiry_s: int = 86_400,
        receive_maximum: int = 4096,
        max_message_bytes: int = 4 * 2**20,
        max_queued_qos0: int = 1000,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        connect_retry_s: float = 60.0,
        stall_after_s: float = 30.0,
    ) -> None:
        self._robot_level = robot_position(topic)
        super().__init__(
            name=f"mqtt:{topic}",
            host=host,
            port=port,
            subscription=topic,
            client_id=client_id,
            username=username,
            password=password,
            tls=tls,
            session_expiry_s=session_expiry_s,
            receive_maximum=receive_maximum,
            max_message_bytes=max_message_bytes,
            max_queued_qos0=max_queued_qos0,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            connect_timeout_s=connect_timeout_s,
            connect_retry_s=connect_retry_s,
            stall_after_s=stall_after_s,
        )
        self.topic = topic
        self.signals = list(signals)

    async def _item(self, message: Any) -> Item:
        robot = str(message.topic).split("/")[self._robot_level]
        return decode(payload_bytes(message), self.signals, robot=robot, max_bytes=self.max_message_bytes)
