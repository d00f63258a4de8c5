"""Kafka source (aiokafka): robot signals from a topic, shared across daemons by a consumer group.

- The message key is the robot id, so a robot's stream stays ordered on one partition.
- Offsets are committed by hand, and only up to the first message whose windows are not written yet
  (per partition, in offset order): a crash or SIGKILL replays from there, so nothing is lost
  (at-least-once; the points' timestamps come from the data, so a replayed window overwrites itself).
- Backpressure: when the pipeline falls behind, the fetched-but-unconsumed queue fills up and the
  assigned partitions are paused. The fetch loop never blocks: it keeps polling (paused partitions
  return nothing), so the consumer stays in its group however long the pipeline stalls; resumed
  below the low-water mark.
- Malformed messages are counted by reason, optionally copied to a dead-letter topic with the reason
  in their headers, and committed past.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ingest.messages import MessageError, decode
from ingest.stream import Delivery, Rejections, SourceUnavailable, once

log = logging.getLogger("cellwatch.ingest.kafka")


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    username: str | None = None
    password: str | None = None

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
            out["ssl_context"] = context
        if self.protocol.startswith("SASL"):
            out["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            out["sasl_plain_username"] = self.username
            out["sasl_plain_password"] = self.password
        return out


class OffsetTracker:
    """Offsets of one partition in fetch order; the commit position is the first one not yet done."""

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self.position: int | None = None  # next offset to commit (last done prefix + 1)

    def received(self, offset: int) -> None:
        self._pending.append(offset)

    def done(self, offset: int) -> None:
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            first = self._pending.popleft()
            self._done.discard(first)
            self.position = first + 1

    @property
    def outstanding(self) -> int:
        return len(self._pending)


class KafkaSource:
    kind = "kafka"

    def __init__(
        self,
        *,
        bootstrap: Sequence[str],
        topic: str,
        group: str,
        signals: Sequence[str],
        client_id: str = "cellwatch",
        security: KafkaSecurity | None = None,
        dead_letter_topic: str | None = None,
        max_message_bytes: int = 4 * 2**20,
        start_from: str = "earliest",
        queue_messages: int = 2000,
        session_timeout_ms: int = 10_000,
        commit_interval_s: float = 0.5,
    ) -> None:
        self.name = f"kafka:{topic}"
        self.bootstrap = list(bootstrap)
        self.topic = topic
        self.group = group
        self.signals = list(signals)
        self.client_id = client_id
        self.security = security or KafkaSecurity()
        self.dead_letter_topic = dead_letter_topic
        self.max_message_bytes = max_message_bytes
        self.start_from = start_from
        self.session_timeout_ms = session_timeout_ms
        self.commit_interval_s = commit_interval_s
        self.rejections = Rejections()
        self.messages_in = 0
        self.paused = False
        # never blocks the fetch loop (it must keep polling to stay in the group); bounded by pausing
        # the partitions at the high-water mark: at most one fetch (`_per_poll` records) beyond it
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._per_poll = max(1, min(500, queue_messages // 4))
        self._high = queue_messages - self._per_poll
        self._low = queue_messages // 4
        self._trackers: dict[Any, OffsetTracker] = {}
        self._committed: dict[Any, int] = {}
        self._consumer: Any = None
        self._producer: Any = None
        self._fetcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
        from aiokafka.errors import KafkaError

        source = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await source._commit(only=set(revoked))
                for tp in revoked:  # acks still to come for these belong to the partition's next owner
                    source._trackers.pop(tp, None)
                    source._committed.pop(tp, None)
                log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

            async def on_partitions_assigned(self, assigned: Any) -> None:
                log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

        options = self.security.options()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            client_id=self.client_id,
            enable_auto_commit=False,
            auto_offset_reset=self.start_from,
            max_partition_fetch_bytes=self.max_message_bytes + 2**16,
            fetch_max_bytes=max(52428800, self.max_message_bytes + 2**16),
            session_timeout_ms=self.session_timeout_ms,
            fetch_max_wait_ms=100,  # latency: the broker answers a fetch within 100 ms even when idle
            heartbeat_interval_ms=max(100, self.session_timeout_ms // 3),
            **options,
        )
        try:
            self._consumer.subscribe([self.topic], listener=Listener())
            await self._consumer.start()
            if self.dead_letter_topic:
                self._producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap,
                    client_id=f"{self.client_id}-dead-letter",
                    acks="all",
                    max_request_size=self.max_message_bytes + 2**16,
                    **options,
                )
                await self._producer.start()
        except (KafkaError, OSError) as err:
            await self.aclose()
            raise SourceUnavailable(f"Kafka at {','.join(self.bootstrap)}: {err}") from None
        self._fetcher = asyncio.create_task(self._fetch(), name=f"kafka-fetch-{self.topic}")

    async def _fetch(self) -> None:
        from aiokafka.errors import KafkaError

        consumer = self._consumer
        loop = asyncio.get_running_loop()
        last_commit = loop.time()
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=100, max_records=self._per_poll)
            except KafkaError as err:  # the client reconnects by itself; keep polling
                log.warning("Kafka fetch failed, retrying: %s", err)
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                tracker = self._trackers.setdefault(tp, OffsetTracker())
                for record in records:
                    tracker.received(record.offset)
                    await self._accept(tp, tracker, record)
            self._flow_control()
            if loop.time() - last_commit >= self.commit_interval_s:
                await self._commit()
                last_commit = loop.time()

    async def _accept(self, tp: Any, tracker: OffsetTracker, record: Any) -> None:
        self.messages_in += 1

        def ack(tracker: OffsetTracker = tracker, offset: int = record.offset) -> None:
            tracker.done(offset)  # a tracker of a revoked partition is orphaned: no effect

        key = record.key.decode("utf-8", "replace") if record.key else None
        try:
            if record.value is None:
                raise MessageError("empty", "message without a value")
            batch = decode(record.value, self.signals, robot=key, max_bytes=self.max_message_bytes)
        except MessageError as err:
            self.rejections.add(err.reason, f"{tp.topic}[{tp.partition}]@{record.offset}: {err}", log)
            await self._dead_letter(record, err)
            ack()
            return
        self._queue.put_nowait(Delivery(batch, once(ack)))

    async def _dead_letter(self, record: Any, err: MessageError) -> None:
        if self._producer is None:
            return
        headers = [
            ("cellwatch-reason", err.reason.encode()),
            ("cellwatch-error", str(err)[:500].encode()),
            ("source", f"{record.topic}[{record.partition}]@{record.offset}".encode()),
        ]
        value = record.value if record.value and len(record.value) <= self.max_message_bytes else b""
        await self._producer.send_and_wait(self.dead_letter_topic, value, key=record.key, headers=headers)

    def _flow_control(self) -> None:
        assignment = self._consumer.assignment()
        if not self.paused and self._queue.qsize() >= self._high:
            self._consumer.pause(*assignment)
            self.paused = True
        elif self.paused and self._queue.qsize() <= self._low:
            self._consumer.resume(*assignment)
            self.paused = False

    async def _commit(self, only: set[Any] | None = None) -> None:
        from aiokafka.errors import KafkaError

        offsets = {
            tp: t.position
            for tp, t in self._trackers.items()
            if t.position is not None
            and t.position != self._committed.get(tp)
            and (only is None or tp in only)
        }
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as err:  # e.g. during a rebalance: the next commit carries the same offsets
            log.warning("offset commit failed, will retry: %s", err)
            return
        self._committed.update(offsets)

    async def deliveries(self) -> AsyncIterator[Delivery]:
        if self._fetcher is None:
            raise RuntimeError("start() the source first")
        while True:
            getter = asyncio.ensure_future(self._queue.get())
            done, _ = await asyncio.wait({getter, self._fetcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                self._fetcher.result()  # the fetch loop died: raise its error
                return
            yield getter.result()
            if self.paused:
                self._flow_control()

    @property
    def assigned(self) -> int:
        """Partitions this member of the group holds now."""
        return len(self._consumer.assignment()) if self._consumer is not None else 0

    @property
    def outstanding(self) -> int:
        """Messages fetched whose windows are not written yet."""
        return sum(t.outstanding for t in self._trackers.values())

    async def aclose(self) -> None:
        if self._fetcher is not None:
            self._fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fetcher
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit()
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
