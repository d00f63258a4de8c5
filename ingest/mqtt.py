"""MQTT source (aiomqtt, MQTT 5): robot signals from a topic template such as ``cell/+/signals``.

- The ``+`` level of the template is the robot id.
- QoS 1 with a persistent session (a fixed client id, clean start off, a session expiry), so messages
  published while the daemon restarts wait in the broker and are delivered afterwards.
- Messages are acknowledged (PUBACK) by hand, only once the windows holding their rows are written to
  the sinks or their spool: a SIGKILL loses nothing, the broker redelivers what was not acknowledged.
- The incoming queue is bounded by the MQTT 5 Receive Maximum: the broker never has more than that
  many unacknowledged messages on their way to us. It has to cover the messages of one open cycle per
  robot (robots × messages per cycle) in cycle mode.
- Reconnects with exponential backoff; TLS and username/password.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ingest.messages import MessageError, decode
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


class MqttSource:
    kind = "mqtt"

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
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        stall_after_s: float = 30.0,
    ) -> None:
        self.name = f"mqtt:{topic}"
        self.host = host
        self.port = port
        self.topic = topic
        self._robot_level = robot_position(topic)
        self.client_id = client_id
        self.signals = list(signals)
        self.username = username
        self.password = password
        self.tls = tls
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.max_message_bytes = max_message_bytes
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self.stall_after_s = stall_after_s
        self.stalled = False  # Receive Maximum reached and nothing acknowledged for stall_after_s
        self._watch: asyncio.Task[None] | None = None
        self.rejections = Rejections()
        self.messages_in = 0
        self.reconnects = 0
        self.unacked = 0
        self._client: Any = None
        self._generation = 0

    def _new_client(self) -> Any:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry_s
        properties.ReceiveMaximum = self.receive_maximum
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
        )
        # PUBACK only once the data is written (aiomqtt does not expose paho's manual ack)
        client._client.manual_ack_set(True)
        return client

    async def _connect(self) -> Any:
        client = self._new_client()
        await client.__aenter__()
        try:
            await client.subscribe(self.topic, qos=1)
        except BaseException:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            raise
        self._generation += 1
        self.unacked = 0
        return client

    async def start(self) -> None:
        import aiomqtt

        try:
            self._client = await self._connect()
        except (aiomqtt.MqttError, OSError) as err:
            raise SourceUnavailable(f"MQTT broker {self.host}:{self.port}: {err}") from None
        log.info("MQTT connected to %s:%d as %s, topic %s", self.host, self.port, self.client_id, self.topic)
        self._watch = asyncio.create_task(self._watch_flow(), name=f"mqtt-flow-{self.topic}")

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

    async def deliveries(self) -> AsyncIterator[Delivery]:
        import aiomqtt

        if self._client is None:
            raise RuntimeError("start() the source first")
        backoff = self.reconnect_min_s
        while True:
            client = self._client
            generation = self._generation
            try:
                async for message in client.messages:
                    self.messages_in += 1
                    self.unacked += 1
                    ack = once(functools.partial(self._ack, client, generation, message.mid))
                    robot = str(message.topic).split("/")[self._robot_level]
                    payload = message.payload
                    try:
                        if not isinstance(payload, bytes | bytearray):
                            raise MessageError("wrong_type", "payload is not bytes")
                        batch = decode(
                            bytes(payload), self.signals, robot=robot, max_bytes=self.max_message_bytes
                        )
                    except MessageError as err:
                        self.rejections.add(err.reason, f"{message.topic}: {err}", log)
                        ack()
                        continue
                    yield Delivery(batch, ack)
                    backoff = self.reconnect_min_s
                raise aiomqtt.MqttError("message stream ended")
            except aiomqtt.MqttError as err:
                log.warning("MQTT connection to %s:%d lost: %s", self.host, self.port, err)
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            self._client = None
            while self._client is None:
                log.info("reconnecting to MQTT %s:%d in %.1f s", self.host, self.port, backoff)
                await asyncio.sleep(backoff)  # reconnect backoff (not waiting on a condition)
                backoff = min(backoff * 2, self.reconnect_max_s)
                try:
                    self._client = await self._connect()
                    self.reconnects += 1
                    log.info("MQTT reconnected to %s:%d", self.host, self.port)
                except (aiomqtt.MqttError, OSError) as err:
                    log.warning("MQTT reconnect failed: %s", err)

    @property
    def outstanding(self) -> int:
        """Messages received whose windows are not written yet (not acknowledged to the broker)."""
        return self.unacked

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
            self._client = None
