"""Kafka sources (aiokafka): robot signals (`KafkaSource`) or camera frames
(`ingest.camera.brokers.KafkaFrameSource`) from a topic, shared across daemons by a consumer group. Both
are a `KafkaStream`: fetching, flow control, commits, rebalances and dead letters below are shared; a
subclass says what a record is (`KafkaStream._item`: record -> item, raising `MessageError` with the
reason of a rejection).

- Signals: the message key is the robot id, so a robot's stream stays ordered on one partition.
- Records are turned into items by a task of their own, in fetch order, not by the fetch loop: a
  decoder that awaits (frames decode images in a thread) never holds up the polling that keeps the
  consumer in its group. Records waiting for it count toward backpressure like decoded ones.
- Offsets are committed by hand, and only up to the first message whose windows are not written yet
  (per partition, in offset order): a crash or SIGKILL replays from there, so nothing is lost
  (at-least-once; the points' timestamps come from the data, so a replayed window overwrites itself).
- Backpressure: when the pipeline falls behind, the fetched-but-unconsumed queue fills up and the
  assigned partitions are paused. The fetch loop never blocks: it keeps polling (paused partitions
  return nothing), so the consumer stays in its group however long the pipeline stalls; resumed
  below the low-water mark.
- Rebalances: when the source is paused, partitions assigned to it are paused at once (backpressure
  holds across rebalances; they are resumed with the rest). Fetched messages of a revoked partition that
  the pipeline has not taken yet are dropped (`cellwatch_kafka_revoked_dropped_total`): the partition's
  next owner reads them again from the committed offset, so they are scored there, not twice.
- Malformed messages are counted by reason and, with a dead-letter topic, copied there with the reason
  in their headers. The copy is written by its own task, off the fetch loop, and a bad message's offset
  counts as done only once its copy is written: a dead-letter topic that refuses writes (missing, no
  permission, broker timeout) is retried with exponential backoff, logged as an error (rate-limited) and
  counted (`cellwatch_dead_letter_failures_total`), while good messages go on flowing; commits stop at
  the bad message until its copy is written. Dead letters waiting count toward backpressure (at most
  `dead_letter_queue`, then the partitions are paused). Without a dead-letter topic a bad message is
  committed past at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ingest.messages import MessageError, decode
from ingest.source import SIGNALS, Item, Kind
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


@dataclass(frozen=True)
class _Raw:
    """A fetched record waiting for the decoder task (`_Fetched` says what `tracker` means)."""

    tp: Any
    tracker: OffsetTracker
    record: Any


@dataclass(frozen=True)
class _Fetched:
    """A decoded message waiting for the pipeline; `tracker` is its partition's tracker when fetched.

    A revoke replaces the partition's tracker, so the entry is stale once `tracker` is no longer the
    partition's current one: that is the assignment generation it belongs to."""

    tp: Any
    tracker: OffsetTracker
    delivery: Delivery


@dataclass(eq=False)
class _DeadLetter:
    tp: Any
    tracker: OffsetTracker
    record: Any
    reason: str
    error: str
    attempts: int = field(default=0)


class KafkaStream:
    """What every Kafka source shares: the consumer group, manual commits of the acknowledged prefix,
    pause/resume, rebalances, dead letters. A subclass gives `kind`, a `name`, and `_item`: what one
    record is."""

    kind: Kind

    def __init__(
        self,
        *,
        name: str,
        bootstrap: Sequence[str],
        topic: str,
        group: str,
        client_id: str = "cellwatch",
        security: KafkaSecurity | None = None,
        dead_letter_topic: str | None = None,
        max_message_bytes: int = 4 * 2**20,
        start_from: str = "earliest",
        queue_messages: int = 2000,
        session_timeout_ms: int = 10_000,
        commit_interval_s: float = 0.5,
        dead_letter_queue: int = 100,
        dead_letter_retry_s: tuple[float, float] = (0.5, 30.0),
        dead_letter_timeout_s: float = 30.0,
    ) -> None:
        low, high = dead_letter_retry_s
        if not 0 < low <= high:
            raise ValueError(
                f"dead_letter_retry_s must be (min, max) with 0 < min <= max, got {dead_letter_retry_s}"
            )
        if dead_letter_queue < 1:
            raise ValueError(f"dead_letter_queue must be at least 1, got {dead_letter_queue}")
        self.name = name
        self.bootstrap = list(bootstrap)
        self.topic = topic
        self.group = group
        self.client_id = client_id
        self.security = security or KafkaSecurity()
        self.dead_letter_topic = dead_letter_topic
        self.max_message_bytes = max_message_bytes
        self.start_from = start_from
        self.session_timeout_ms = session_timeout_ms
        self.commit_interval_s = commit_interval_s
        self.dead_letter_retry_s = (low, high)
        self.dead_letter_timeout_s = dead_letter_timeout_s
        self.rejections = Rejections()
        self.messages_in = 0
        self.paused = False
        self.dead_letters = 0  # copies written to the dead-letter topic
        self.dead_letter_failures = 0  # failed attempts (each retried)
        self.revoked_dropped = 0  # fetched messages of a revoked partition dropped before the pipeline
        self.rebalances = 0  # assignments received
        # never blocks the fetch loop (it must keep polling to stay in the group); bounded by pausing
        # the partitions at the high-water mark: at most one fetch (`_per_poll` records) beyond it.
        # Records wait in _undecoded for the decoder task, decoded ones in _ready for the pipeline.
        self._undecoded: deque[_Raw] = deque()
        self._undecoded_event = asyncio.Event()
        self._decoding: _Raw | None = None
        self._ready: deque[_Fetched] = deque()
        self._ready_event = asyncio.Event()
        self._per_poll = max(1, min(500, queue_messages // 4))
        self._high = queue_messages - self._per_poll
        self._low = queue_messages // 4
        # dead letters not written yet (their offsets are held): paused at the bound, resumed at a quarter
        self._dead: deque[_DeadLetter] = deque()
        self._dead_writing: _DeadLetter | None = None
        self._dead_event = asyncio.Event()
        self._dead_high = dead_letter_queue
        self._dead_low = dead_letter_queue // 4
        self._dead_logged: tuple[float, int] | None = None  # (when, failures then) of the last error log
        self._trackers: dict[Any, OffsetTracker] = {}
        self._committed: dict[Any, int] = {}
        self._consumer: Any = None
        self._producer: Any = None
        self._fetcher: asyncio.Task[None] | None = None
        self._decoder: asyncio.Task[None] | None = None
        self._dead_writer: asyncio.Task[None] | None = None

    async def _item(self, tp: Any, record: Any) -> Item:
        """The item one record carries (an aiokafka ConsumerRecord of partition `tp`); raises
        MessageError to reject it (counted by reason, dead-lettered or committed past). Runs in the
        decoder task, one record at a time in fetch order; CPU work goes off the event loop here."""
        raise NotImplementedError

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
        from aiokafka.errors import KafkaError

        source = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await source._commit(only=set(revoked))
                source._forget(set(revoked))
                log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

            async def on_partitions_assigned(self, assigned: Any) -> None:
                source.rebalances += 1
                if source.paused and assigned:  # fresh partitions come unpaused: keep the backpressure
                    source._consumer.pause(*assigned)
                log.info(
                    "partitions assigned%s: %s",
                    " (paused: the pipeline is behind)" if source.paused else "",
                    sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned),
                )

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
                    request_timeout_ms=max(1000, int(self.dead_letter_timeout_s * 1000)),
                    **options,
                )
                await self._producer.start()
        except (KafkaError, OSError) as err:
            await self.aclose()
            raise SourceUnavailable(f"Kafka at {','.join(self.bootstrap)}: {err}") from None
        self._fetcher = asyncio.create_task(self._fetch(), name=f"kafka-fetch-{self.topic}")
        self._decoder = asyncio.create_task(self._decode(), name=f"kafka-decode-{self.topic}")
        if self._producer is not None:
            self._dead_writer = asyncio.create_task(
                self._write_dead_letters(), name=f"kafka-dead-letters-{self.topic}"
            )

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
                    self._accept(tp, tracker, record)
            if batches:
                # let the decoder task take this fetch before the check below: a decoder that does
                # not await (signals) takes it whole, so its rejected records are dead letters by then
                await asyncio.sleep(0)
            self._flow_control()
            if loop.time() - last_commit >= self.commit_interval_s:
                await self._commit()
                last_commit = loop.time()

    def _accept(self, tp: Any, tracker: OffsetTracker, record: Any) -> None:
        self.messages_in += 1
        self._undecoded.append(_Raw(tp, tracker, record))
        self._undecoded_event.set()

    async def _decode(self) -> None:
        """Turn fetched records into deliveries, in fetch order (the decoder task). A record whose
        partition is revoked while it waits or is decoded is dropped (its next owner reads it again);
        one that cannot be decoded is rejected."""
        while True:
            if not self._undecoded:
                self._undecoded_event.clear()
                await self._undecoded_event.wait()
                continue
            raw = self._decoding = self._undecoded.popleft()
            try:
                try:
                    item = await self._item(raw.tp, raw.record)
                except MessageError as err:
                    if self._current(raw.tp, raw.tracker):
                        self._reject(raw, err)
                    continue
                if not self._current(raw.tp, raw.tracker):
                    self.revoked_dropped += 1
                    continue

                def ack(tracker: OffsetTracker = raw.tracker, offset: int = raw.record.offset) -> None:
                    tracker.done(offset)  # a tracker of a revoked partition is orphaned: no effect

                self._ready.append(_Fetched(raw.tp, raw.tracker, Delivery(item, once(ack))))
                self._ready_event.set()
            finally:
                self._decoding = None

    def _reject(self, raw: _Raw, err: MessageError) -> None:
        tp, record = raw.tp, raw.record
        self.rejections.add(err.reason, f"{tp.topic}[{tp.partition}]@{record.offset}: {err}", log)
        if self._producer is None:
            raw.tracker.done(record.offset)
        else:  # held until its copy is written: the commits stop here until then
            self._dead.append(_DeadLetter(tp, raw.tracker, record, err.reason, str(err)))
            self._dead_event.set()

    def _current(self, tp: Any, tracker: OffsetTracker) -> bool:
        """Whether `tracker` still belongs to the assignment that holds `tp` (not revoked since)."""
        return self._trackers.get(tp) is tracker

    async def _write_dead_letters(self) -> None:
        """Copy bad messages to the dead-letter topic, in order, retrying each until it is written; only
        then is its offset done. Never ends on a broker error: the fetch loop and the group go on."""
        from aiokafka.errors import KafkaError

        low, high = self.dead_letter_retry_s
        delay = low
        failing = 0  # failed attempts since the last write
        while True:
            if not self._dead:
                self._dead_event.clear()
                await self._dead_event.wait()
                continue
            letter = self._dead_writing = self._dead.popleft()
            try:
                while self._current(letter.tp, letter.tracker):  # revoked: the next owner copies it again
                    try:
                        async with asyncio.timeout(self.dead_letter_timeout_s):
                            await self._send_dead_letter(letter)
                    except (KafkaError, OSError, TimeoutError) as err:
                        letter.attempts += 1
                        failing += 1
                        self.dead_letter_failures += 1
                        self._log_dead_letter_failure(letter, err, delay)
                        await asyncio.sleep(delay)
                        delay = min(high, delay * 2)
                        continue
                    self.dead_letters += 1
                    if failing:
                        log.info(
                            "dead letters to %s written again after %d failed attempt(s)",
                            self.dead_letter_topic,
                            failing,
                        )
                        failing, self._dead_logged = 0, None
                    delay = low
                    letter.tracker.done(letter.record.offset)
                    break
            finally:
                self._dead_writing = None

    async def _send_dead_letter(self, letter: _DeadLetter) -> None:
        record = letter.record
        headers = [
            ("cellwatch-reason", letter.reason.encode()),
            ("cellwatch-error", letter.error[:500].encode()),
            ("source", f"{record.topic}[{record.partition}]@{record.offset}".encode()),
        ]
        value = record.value if record.value and len(record.value) <= self.max_message_bytes else b""
        await self._producer.send_and_wait(self.dead_letter_topic, value, key=record.key, headers=headers)

    def _log_dead_letter_failure(self, letter: _DeadLetter, err: BaseException, delay: float) -> None:
        """An error line for the first failure, then at most one every `Rejections.every_s` seconds."""
        now = time.monotonic()
        last = self._dead_logged
        if last is not None and now - last[0] < Rejections.every_s:
            return
        since = (
            f" ({self.dead_letter_failures - last[1]} failed attempts since the last report)" if last else ""
        )
        record = letter.record
        log.error(
            "dead letter for %s[%d]@%d (%s) not written to %s: %s: %s; retrying in %.1f s, its offset "
            "is not committed until then%s",
            record.topic,
            record.partition,
            record.offset,
            letter.reason,
            self.dead_letter_topic,
            type(err).__name__,
            err,
            delay,
            since,
        )
        self._dead_logged = (now, self.dead_letter_failures)

    def _forget(self, revoked: set[Any]) -> None:
        """After a revoke: acks still to come belong to the partition's next owner, and what is fetched
        but not handed out yet is dropped (the next owner reads it again from the committed offset)."""
        for tp in revoked:
            self._trackers.pop(tp, None)
            self._committed.pop(tp, None)
        kept = deque(f for f in self._ready if f.tp not in revoked)
        waiting = deque(r for r in self._undecoded if r.tp not in revoked)
        dropped = len(self._ready) - len(kept) + len(self._undecoded) - len(waiting)
        self._ready, self._undecoded = kept, waiting
        letters = deque(d for d in self._dead if d.tp not in revoked)
        dropped_letters = len(self._dead) - len(letters)
        self._dead = letters
        self.revoked_dropped += dropped
        if dropped or dropped_letters:
            log.info(
                "dropped %d fetched message(s) and %d unwritten dead letter(s) of revoked partitions",
                dropped,
                dropped_letters,
            )

    @property
    def _dead_backlog(self) -> int:
        return len(self._dead) + (self._dead_writing is not None)

    def _flow_control(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        queued, dead = self.queued, self._dead_backlog
        if not self.paused and (queued >= self._high or dead >= self._dead_high):
            self.paused = True
        elif self.paused and queued <= self._low and dead <= self._dead_low:
            self.paused = False
            consumer.resume(*consumer.paused())
        if self.paused:  # every partition held now, including ones assigned since the pause
            unpaused = set(consumer.assignment()) - set(consumer.paused())
            if unpaused:
                consumer.pause(*unpaused)

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
        tasks = {t for t in (self._fetcher, self._decoder, self._dead_writer) if t is not None}
        while True:
            while self._ready:
                fetched = self._ready.popleft()
                if not self._current(fetched.tp, fetched.tracker):
                    self.revoked_dropped += 1  # revoked since it was fetched (normally dropped at revoke)
                    continue
                yield fetched.delivery
                if self.paused:
                    self._flow_control()
            self._ready_event.clear()
            waiter = asyncio.ensure_future(self._ready_event.wait())
            try:
                done, _ = await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            for task in tasks & done:
                task.result()  # a task of the source died: raise its error
                return

    @property
    def assigned(self) -> int:
        """Partitions this member of the group holds now."""
        return len(self._consumer.assignment()) if self._consumer is not None else 0

    @property
    def assigned_partitions(self) -> frozenset[int]:
        """Numbers of the partitions of `topic` this member holds now."""
        if self._consumer is None:
            return frozenset()
        return frozenset(tp.partition for tp in self._consumer.assignment() if tp.topic == self.topic)

    @property
    def outstanding(self) -> int:
        """Messages fetched whose windows (or dead letters) are not written yet."""
        return sum(t.outstanding for t in self._trackers.values())

    @property
    def queued(self) -> int:
        """Messages fetched that the pipeline has not taken yet (decoded or waiting to be)."""
        return len(self._ready) + len(self._undecoded) + (self._decoding is not None)

    @property
    def dead_letters_pending(self) -> int:
        """Bad messages whose copy to the dead-letter topic is not written yet."""
        return self._dead_backlog

    def metric_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        """(name, type, labels, value) for the Prometheus endpoint (rejections come from `rejections`)."""
        values: list[tuple[str, str, float]] = [
            ("cellwatch_kafka_assigned_partitions", "gauge", self.assigned),
            ("cellwatch_source_paused", "gauge", int(self.paused)),
            ("cellwatch_source_unacked", "gauge", self.outstanding),
            ("cellwatch_source_queued", "gauge", self.queued),
            ("cellwatch_kafka_rebalances_total", "counter", self.rebalances),
            ("cellwatch_kafka_revoked_dropped_total", "counter", self.revoked_dropped),
            ("cellwatch_dead_letters_total", "counter", self.dead_letters),
            ("cellwatch_dead_letter_failures_total", "counter", self.dead_letter_failures),
            ("cellwatch_dead_letters_pending", "gauge", self.dead_letters_pending),
        ]
        return [(name, kind, {"source": self.name}, float(value)) for name, kind, value in values]

    def close(self) -> None:
        """Nothing is opened before start()."""

    async def aclose(self) -> None:
        for task in (self._fetcher, self._decoder, self._dead_writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit()
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):  # a dead letter still in flight to a broker that is away
                    await self._producer.stop()


class KafkaSource(KafkaStream):
    """Robot signals: every record is a `SignalBatch` (Arrow or JSON, `ingest.messages.decode`); its key
    is the robot id."""

    kind: Kind = SIGNALS

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
        dead_letter_queue: int = 100,
        dead_letter_retry_s: tuple[float, float] = (0.5, 30.0),
        dead_letter_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(
            name=f"kafka:{topic}",
            bootstrap=bootstrap,
            topic=topic,
            group=group,
            client_id=client_id,
            security=security,
            dead_letter_topic=dead_letter_topic,
            max_message_bytes=max_message_bytes,
            start_from=start_from,
            queue_messages=queue_messages,
            session_timeout_ms=session_timeout_ms,
            commit_interval_s=commit_interval_s,
            dead_letter_queue=dead_letter_queue,
            dead_letter_retry_s=dead_letter_retry_s,
            dead_letter_timeout_s=dead_letter_timeout_s,
        )
        self.signals = list(signals)

    async def _item(self, tp: Any, record: Any) -> Item:
        key = record.key.decode("utf-8", "replace") if record.key else None
        if record.value is None:
            raise MessageError("empty", "message without a value")
        return decode(record.value, self.signals, robot=key, max_bytes=self.max_message_bytes)
