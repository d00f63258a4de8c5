"""Load generator: a voraus-AD file (real or simulated) as N robots' signal streams to Kafka or MQTT.

Every robot streams the file's cycles back to back, as a controller would: row i of the stream is
sampled at ``start + i * period``; each message holds ``rows_per_message`` rows of one cycle (with
its ``cycle`` marker, the row offset in the cycle, and ``cycle_end`` on a cycle's last message).
Robot r is shifted by r/N of `spread_s` (at least of one message), so the robots' messages and cycle
ends interleave instead of arriving in bursts, as in a plant where cells do not run in lockstep.
Messages go out in timestamp order, paced at ``speed`` × real time (or as fast as the broker takes
them with an infinite speed).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ingest.messages import SignalBatch, batches_from_cycle, encode_arrow, encode_json
from ingest.voraus import schema
from ingest.voraus.reader import VorausReader


@dataclass(frozen=True)
class Target:
    scheme: str  # kafka | mqtt
    host: str
    port: int
    topic: str  # Kafka topic, or MQTT topic template with one '+' (the robot id)

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("kafka", "mqtt"):
            raise ValueError(f"--to must be kafka://HOST:PORT/TOPIC or mqtt://HOST:PORT/TOPIC, got {url!r}")
        topic = parts.path.lstrip("/")
        if not parts.hostname or not topic:
            raise ValueError(f"{url!r}: needs a host and a topic")
        try:
            port = parts.port or (9092 if parts.scheme == "kafka" else 1883)
        except ValueError:
            raise ValueError(f"{url!r}: bad port") from None
        if parts.scheme == "mqtt" and topic.split("/").count("+") != 1:
            raise ValueError(f"{url!r}: the MQTT topic needs exactly one '+' level for the robot id")
        return cls(parts.scheme, parts.hostname, port, topic)

    def topic_for(self, robot: str) -> str:
        if self.scheme == "kafka":
            return self.topic
        return "/".join(robot if level == "+" else level for level in self.topic.split("/"))


@dataclass
class PublishStats:
    messages: int = 0
    rows: int = 0
    bytes: int = 0
    cycles: int = 0
    seconds: float = 0.0


def robot_ids(count: int, prefix: str = "robot") -> list[str]:
    return [f"{prefix}{i + 1}" for i in range(count)]


def plan(
    path: Path,
    robots: Sequence[str],
    *,
    start_ns: int,
    rows_per_message: int = 100,
    test_split_only: bool = True,
    max_cycles: int | None = None,
    skip_cycles: int = 0,
    spread_s: float = 0.0,
    signals: Sequence[str] = schema.MACHINE_SIGNALS,
) -> Iterator[SignalBatch]:
    """Every robot's messages, merged in order of their last sample's timestamp. The first
    `skip_cycles` cycles are not sent, but their time passes (to continue an earlier run)."""
    reader = VorausReader(path, signals, batch_rows=8192)
    rate = reader.rate_hz
    if rate is None:
        raise ValueError(f"{path}: cannot tell the sampling rate")
    period_ns = round(1e9 / rate)
    # spread the robots' phases over `spread_s` (cells do not run in lockstep), on the sample grid
    spread_rows = max(rows_per_message, round(spread_s * rate))
    shift = [(i * spread_rows // max(len(robots), 1)) * period_ns for i in range(len(robots))]
    clock = [start_ns + s for s in shift]
    seq = [0] * len(robots)
    heap: list[tuple[int, int, int, SignalBatch]] = []
    order = 0
    try:
        count = 0
        for cycle in reader.cycles():
            if test_split_only and cycle.is_train:
                continue
            if max_cycles is not None and count >= skip_cycles + max_cycles:
                break
            count += 1
            if count <= skip_cycles:
                clock = [c + len(cycle.signals) * period_ns for c in clock]
                continue
            data = cycle.signals.astype("float32")
            for r, robot in enumerate(robots):
                batches = batches_from_cycle(
                    robot,
                    data,
                    start_ns=clock[r],
                    period_ns=period_ns,
                    cycle=cycle.sample,
                    rows_per_message=rows_per_message,
                    seq_start=seq[r],
                )
                seq[r] += len(batches)
                clock[r] += len(data) * period_ns
                for batch in batches:
                    heapq.heappush(heap, (batch.end_ns, order, r, batch))
                    order += 1
            # everything ending before the earliest robot clock is final: hand it out in time order
            horizon = min(clock)
            while heap and heap[0][0] < horizon:
                yield heapq.heappop(heap)[3]
        while heap:
            yield heapq.heappop(heap)[3]
    finally:
        reader.close()


async def publish(
    target: Target,
    batches: Iterator[SignalBatch],
    *,
    fmt: str = "json",
    speed: float = 1.0,
    signals: Sequence[str] = schema.MACHINE_SIGNALS,
    on_message: Callable[[SignalBatch], None] | None = None,
    max_in_flight: int = 1000,
    live: bool = False,
) -> PublishStats:
    """Send the batches; real-time pacing from the first batch's timestamp, × speed. With `live`,
    the timestamps are wall-clock times: each message leaves when its last sample's time has come."""
    encode = encode_arrow if fmt == "arrow" else encode_json
    stats = PublishStats()
    transport = _Kafka(target, max_in_flight) if target.scheme == "kafka" else _Mqtt(target, max_in_flight)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first_ns: int | None = None
    try:
        await transport.start()
        for batch in batches:
            if first_ns is None:
                first_ns = batch.time_ns
            if live:
                delay = (batch.end_ns - time.time_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
            elif math.isfinite(speed):
                due = started + (batch.end_ns - first_ns) / 1e9 / speed
                delay = due - loop.time()
                if delay > 0:  # pacing: a message leaves once its last sample has been taken
                    await asyncio.sleep(delay)
            payload = encode(batch, signals)
            await transport.send(batch.robot, payload)
            stats.messages += 1
            stats.rows += batch.rows
            stats.bytes += len(payload)
            stats.cycles += int(batch.cycle_end)
            if on_message is not None:
                on_message(batch)
        await transport.flush()
    finally:
        await transport.close()
    stats.seconds = loop.time() - started
    return stats


class _Kafka:
    def __init__(self, target: Target, max_in_flight: int) -> None:
        self.target = target
        self.max_in_flight = max_in_flight
        self.pending: list[asyncio.Future[Any]] = []
        self.producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        self.producer = AIOKafkaProducer(
            bootstrap_servers=f"{self.target.host}:{self.target.port}",
            client_id="cellwatch-publish",
            acks="all",
            linger_ms=5,
            max_request_size=8 * 2**20,
            max_batch_size=1 * 2**20,
        )
        await self.producer.start()

    async def send(self, robot: str, payload: bytes) -> None:
        future = await self.producer.send(self.target.topic, payload, key=robot.encode())
        self.pending.append(future)
        if len(self.pending) >= self.max_in_flight:
            await self.flush()

    async def flush(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending)  # raises the first delivery error
            self.pending.clear()

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class _Mqtt:
    def __init__(self, target: Target, max_in_flight: int) -> None:
        self.target = target
        self.max_in_flight = max_in_flight
        self.client: Any = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []

    async def start(self) -> None:
        import aiomqtt

        self.client = aiomqtt.Client(
            self.target.host,
            self.target.port,
            identifier=f"cellwatch-publish-{time.time_ns()}",
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=self.max_in_flight,
            max_queued_outgoing_messages=0,
        )
        self.client.pending_calls_threshold = self.max_in_flight + 1  # we bound them ourselves
        await self.client.__aenter__()

    async def send(self, robot: str, payload: bytes) -> None:
        while len(self.tasks) >= self.max_in_flight:
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        # the PUBLISH is queued in order at once; the task only waits for its PUBACK
        task = asyncio.ensure_future(self.client.publish(self.target.topic_for(robot), payload, qos=1))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())  # type: ignore[arg-type]

    async def flush(self) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        if self.errors:
            raise self.errors[0]

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.__aexit__(None, None, None)
