"""Kafka publish-back sink (aiokafka): anomaly scores and alerts as JSON records on Kafka topics.

A **best-effort live feed**, not a store: the authoritative record is InfluxDB, written through its durable
on-disk spool. Like the MQTT sink (`daemon.sinks.mqtt`), `write` only queues: a bounded in-memory queue is
drained by one background task; when the queue is full the *oldest* messages are dropped, counted in
``stats.dropped`` and reported by a rate-limited warning. A daemon restart loses what was still queued.

- Scores go to ``cellwatch.scores``, alerts to ``cellwatch.alerts``; the record key is the robot id, so a
  robot's records stay in order on one partition; the value is the same JSON as on MQTT
  (``{"robot", "model", "mode" (scores), "time_ns", ...fields}``).
- The producer waits for all in-sync replicas (``acks="all"``). Records the cluster does not take in
  time (``request_timeout_ms``) are queued again and retried with exponential backoff; records refused
  for good (too large, unknown topic name, not authorized) are dropped and counted in ``stats.rejected``.
- A broker that is down at start is retried in the background; aiokafka reconnects a started producer by
  itself. ``stats.reconnects`` counts recoveries: a producer started after failed attempts, or deliveries
  succeeding again after failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from daemon.sinks.lineprotocol import Point
from daemon.sinks.mqtt import Outgoing, QueuedPublisher, encode_point, is_alert, jittered

log = logging.getLogger("cellwatch.sink.kafka")


class KafkaPublishSink(QueuedPublisher):
    """Publishes scores and alerts to Kafka; a best-effort live feed (InfluxDB is the store)."""

    what = "Kafka publish sink"

    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        score_topic: str = "cellwatch.scores",
        alert_topic: str = "cellwatch.alerts",
        client_id: str = "cellwatch",
        security_options: dict[str, Any] | None = None,
        queue_points: int = 10_000,
        max_inflight: int = 1000,
        linger_ms: int = 5,
        request_timeout_ms: int = 10_000,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        super().__init__(queue_points, log)
        if isinstance(bootstrap, str):
            bootstrap = [bootstrap]
        if not bootstrap:
            raise ValueError("Kafka publish sink needs at least one bootstrap server")
        self.bootstrap = list(bootstrap)
        self.score_topic = score_topic
        self.alert_topic = alert_topic
        self.client_id = client_id
        # e.g. ingest.kafka.KafkaSecurity(...).options(): passed to the producer, never logged
        self._security_options = dict(security_options or {})
        self.max_inflight = max(1, max_inflight)
        self.linger_ms = linger_ms
        self.request_timeout_ms = request_timeout_ms
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._producer: Any = None
        self._inflight: list[Outgoing] = []

    def __repr__(self) -> str:  # no credentials
        return f"KafkaPublishSink({','.join(self.bootstrap)}, client_id={self.client_id!r})"

    def _message(self, point: Point) -> Outgoing:
        robot = str(point.tags.get("robot", "unknown"))
        topic = self.alert_topic if is_alert(point) else self.score_topic
        return Outgoing(topic, robot.encode(), encode_point(point))

    def _in_flight(self) -> int:
        return len(self._inflight)

    def _new_producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            acks="all",
            linger_ms=self.linger_ms,
            request_timeout_ms=self.request_timeout_ms,
            **self._security_options,
        )

    async def _start_producer(self) -> Any:
        producer = self._new_producer()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()  # closes its connections (an unstarted producer warns when collected)
            raise
        return producer

    async def _run(self) -> None:
        from aiokafka.errors import KafkaError

        backoff = self.reconnect_min_s
        failing = False
        try:
            while True:
                if self._producer is None:
                    self._producer = await self._connect_with_backoff(
                        self._start_producer, (KafkaError, OSError), f"Kafka {','.join(self.bootstrap)}"
                    )
                if not self._backlog:
                    self._update_drained()
                    await self._wait_for_messages()
                    continue
                self._inflight = self._backlog.take(self.max_inflight)
                retry, error = await self._deliver(self._producer, self._inflight)
                self._inflight = []
                if retry:
                    self._backlog.requeue(retry)
                    self.stats.last_error = str(error)
                    self.log.warning(
                        "Kafka delivery failed (%s); retrying in %.1f s, %d messages queued",
                        error,
                        backoff,
                        self.pending,
                    )
                    failing = True
                    await asyncio.sleep(jittered(backoff))  # retry backoff
                    backoff = min(backoff * 2, self.reconnect_max_s)
                    continue
                if failing:
                    failing = False
                    self.stats.reconnects += 1
                    self.log.info("Kafka deliveries resumed")
                    self._backlog.report()
                backoff = self.reconnect_min_s
                self._update_drained()
        finally:
            if self._inflight:  # stopped mid-delivery: whether they went out is unknown
                self._backlog.requeue(self._inflight)
                self._inflight = []

    async def _deliver(
        self, producer: Any, batch: list[Outgoing]
    ) -> tuple[list[Outgoing], BaseException | None]:
        """Send a batch and wait for the acknowledgements; returns the messages to try again."""
        from aiokafka.errors import KafkaError

        sent: list[tuple[Outgoing, asyncio.Future[Any]]] = []
        retry: list[Outgoing] = []
        error: BaseException | None = None
        for index, message in enumerate(batch):
            try:
                sent.append((message, await producer.send(message.topic, message.payload, key=message.key)))
            except KafkaError as err:
                if _refused(err):
                    self._reject(message, err)
                    continue
                retry, error = batch[index:], err  # e.g. no metadata in time: the cluster is away
                break
        results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        failed: list[Outgoing] = []
        for (message, _), result in zip(sent, results, strict=True):
            if not isinstance(result, BaseException):
                self.stats.published += 1
            elif _refused(result):
                self._reject(message, result)
            else:
                failed.append(message)
                error = error or result
        return failed + retry, error

    def _reject(self, message: Outgoing, error: BaseException) -> None:
        self.stats.rejected += 1
        self.stats.last_error = str(error)
        self.log.error("Kafka refused a record for %s: %s", message.topic, error)

    async def _shutdown(self, drained: bool) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if not drained:
            _expire_pending(producer)
        await producer.stop()


def _refused(error: BaseException) -> bool:
    """Errors that retrying cannot fix: the record is dropped (and counted) instead of retried forever."""
    from aiokafka import errors

    permanent = (
        errors.MessageSizeTooLargeError,
        errors.RecordListTooLargeError,
        errors.InvalidTopicError,
        errors.TopicAuthorizationFailedError,
        errors.CorruptRecordException,
        errors.UnsupportedForMessageFormatError,
    )
    return isinstance(error, permanent)


def _expire_pending(producer: Any) -> None:
    """Let the records the broker has not taken expire now, so that `stop()` does not wait up to
    ``request_timeout_ms`` for them: aiokafka's sender then fails them at its next retry (its own path,
    unlike failing them from outside, which races a retry in flight). Internal aiokafka state; should
    that change, `stop()` is merely slower."""
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is None:
        return
    with contextlib.suppress(Exception):
        batches = [b for queued in accumulator._batches.values() for b in queued]
        for batch in [*batches, *accumulator._pending_batches]:
            if hasattr(batch, "_ttl"):
                batch._ttl = 0.0
