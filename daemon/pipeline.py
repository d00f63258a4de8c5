"""The streaming pipeline: sources → per-robot windowing → micro-batched scorer → sinks.

Queues are bounded, so a slow scorer or sink makes the sources wait (backpressure) instead of growing
memory. Inference runs in a worker thread, off the event loop, on the GPU when there is one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from daemon.alerts import Alert, AlertTracker
from daemon.layout import ALERT_MEASUREMENT, LOCALIZATION_MEASUREMENT, SCORE_MEASUREMENT
from daemon.sinks.lineprotocol import Point
from daemon.windowing import StreamRejected, StreamWindower, Window
from flows.preprocess import downsample, window_starts
from flows.scorer import Scorer
from ingest.stream import Rejections
from ingest.voraus.reader import Cycle

log = logging.getLogger("cellwatch.pipeline")
MEASUREMENT = SCORE_MEASUREMENT
LOCALIZATION_BINS = 200  # time bins stored per localized window
LOCALIZATION_SIGNALS = 5  # signals stored per localized window besides the total
EXPLAIN_BATCH = 4  # alerts localized per backward pass


@dataclass
class Scored:
    window: Window
    score: float
    normalized: float
    is_anomaly: bool


class Sink(Protocol):
    """`write` accepts points; after `flush` they are durable (spooled or written)."""

    async def write(self, points: Sequence[Point]) -> None: ...
    async def flush(self) -> None: ...
    async def close(self, drain_timeout_s: float = 10.0) -> bool: ...


class FileSink:
    """JSON lines, one per scored window: the embedded default that needs no infrastructure."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    async def write(self, points: Sequence[Point]) -> None:
        lines = "".join(
            json.dumps({"measurement": p.measurement, "time_ns": p.time_ns, **p.tags, **p.fields}) + "\n"
            for p in points
        )
        await asyncio.to_thread(self._write, lines)

    def _write(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()

    async def flush(self) -> None:
        """Each write is already in the file (a process crash cannot lose it)."""

    async def close(self, drain_timeout_s: float = 10.0) -> bool:
        self._fh.close()
        return True


@dataclass
class PipelineStats:
    cycles_in: int = 0
    messages_in: int = 0
    windows_scored: int = 0
    anomalies: int = 0
    batches: int = 0
    inference_seconds: float = 0.0
    results: list[Scored] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)


def alert_point(alert: Alert, model: str) -> Point:
    """An alert as an event: time = start; end, peak, event time (localization) and top signals as fields."""
    end = alert.end_ns if alert.end_ns is not None else alert.peak_time_ns
    top = ", ".join(f"{name} {share:.0%}" for name, share in alert.top_signals)
    return Point(
        ALERT_MEASUREMENT,
        {
            "end_ns": int(end),
            "duration_s": (end - alert.start_ns) / 1e9,
            "peak_score": float(alert.peak_score),
            "peak_cycle": int(alert.peak_cycle),
            "event_time_ns": int(
                alert.event_time_ns if alert.event_time_ns is not None else alert.peak_time_ns
            ),
            "windows": int(alert.windows),
            "cycles": ",".join(str(c) for c in alert.cycles),
            "top_signals": top,
            "text": f"{alert.robot}: anomaly score {alert.peak_score:.2f}x threshold; top signals: {top}",
        },
        alert.start_ns,
        {"robot": alert.robot, "model": model},
    )


def localization_points(
    alert: Alert, window: Window, grad: np.ndarray, signals: Sequence[str], dt_ns: int, model: str
) -> list[Point]:
    """The temporal-analysis map of an alert's peak window (thesis Eq. 8.6) for a heatmap: per time bin
    the contribution of all signals (`signal=(all)`) and of the top signals, scaled so the highest
    total bin is 1. At most LOCALIZATION_BINS bins over the window's real (unpadded) samples."""
    steps = min(len(window.signals), grad.shape[1])
    per_step = grad[:, :steps]
    width = -(-steps // LOCALIZATION_BINS)  # ceil
    bins = -(-steps // width)
    padded = np.zeros((per_step.shape[0], bins * width), dtype=np.float64)
    padded[:, :steps] = per_step
    binned = padded.reshape(per_step.shape[0], bins, width).sum(axis=2)
    counts = np.minimum(width, steps - np.arange(bins) * width)
    binned /= counts  # mean per step in each bin
    total = binned.sum(axis=0)
    scale = float(total.max()) or 1.0
    first_ns = window.time_ns - (len(window.signals) - 1) * dt_ns
    top = np.argsort(-per_step.sum(axis=1))[:LOCALIZATION_SIGNALS]
    rows = [("(all)", total)] + [(signals[j], binned[j]) for j in top]
    return [
        Point(
            LOCALIZATION_MEASUREMENT,
            {"contribution": float(values[k] / scale), "peak_cycle": int(alert.peak_cycle)},
            first_ns + k * width * dt_ns,
            {"robot": alert.robot, "model": model, "signal": name},
        )
        for name, values in rows
        for k in range(bins)
    ]


def to_point(result: Scored, model: str, mode: str, threshold: float) -> Point:
    return Point(
        MEASUREMENT,
        {
            "score": float(result.score),
            "normalized_score": float(result.normalized),
            "threshold": float(threshold),
            "is_anomaly": bool(result.is_anomaly),
            "cycle": int(result.window.cycle),
        },
        result.window.time_ns,
        {"robot": result.window.robot, "model": model, "mode": mode},
    )


class Pipeline:
    def __init__(
        self,
        sources: Sequence[Any],
        scorer: Scorer,
        sinks: Sequence[Sink],
        *,
        model_name: str,
        start_ns: dict[str, int],
        batch: int = 32,
        max_wait_ms: int = 50,
        queue_size: int | None = None,
        keep_results: bool = False,
        alerts: dict[str, Any] | None = None,
    ) -> None:
        self.sources = list(sources)
        self.scorer = scorer
        self.sinks = list(sinks)
        self.model_name = model_name
        self.start_ns = start_ns
        self.batch = batch
        self.max_wait_s = max_wait_ms / 1000
        # bounded: a few batches in flight; sources wait when it is full (backpressure)
        self.queue: asyncio.Queue[Window | None] = asyncio.Queue(maxsize=queue_size or max(4 * batch, 16))
        self.stats = PipelineStats()
        self.keep_results = keep_results
        self._producers: list[asyncio.Task[None]] = []
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellwatch-inference")
        self.alert_options = alerts or {}
        self.trackers: dict[str, AlertTracker] = {}
        self.windowers: dict[str, StreamWindower] = {}
        self.stream_rejections: dict[str, Rejections] = {}  # source name -> reason -> count
        self.last_time: dict[str, int] = {}

    def _tracker(self, robot: str) -> AlertTracker:
        tracker = self.trackers.get(robot)
        if tracker is None:
            tracker = self.trackers[robot] = AlertTracker(robot, **self.alert_options)
        return tracker

    def _windower(self, robot: str) -> StreamWindower:
        windower = self.windowers.get(robot)
        if windower is None:
            card = self.scorer.card
            divider = int(card.training.get("rate_divider", 1))
            windower = StreamWindower(
                robot,
                mode="cycle" if card.mode == "cycle" or card.window is None else "window",
                period_ns=round(1e9 / (card.rate_hz * divider)),
                divider=divider,
                window=card.window,
                hop=card.hop,
                max_cycle_rows=8 * card.time_steps * divider,
            )
            self.windowers[robot] = windower
        return windower

    async def _produce(self, source: Any) -> None:
        if not hasattr(source, "cycles"):
            await self._produce_stream(source)
            return
        clock_ns = self.start_ns[source.robot]
        async for cycle in source.cycles():
            self.stats.cycles_in += 1
            clock_ns += round(cycle.duration_s * 1e9)
            for window in self._windows(source.robot, cycle, clock_ns):
                await self.queue.put(window)  # waits when full: backpressure

    async def _produce_stream(self, source: Any) -> None:
        """A streaming source (Kafka, MQTT): message batches are windowed per robot."""
        rejected = self.stream_rejections.setdefault(source.name, Rejections())
        async for delivery in source.deliveries():
            self.stats.messages_in += 1
            batch = delivery.batch
            try:
                windows = self._windower(batch.robot).push(batch, delivery.ack)
            except StreamRejected as err:
                rejected.add(err.reason, str(err), log)
                continue
            for window in windows:
                await self.queue.put(window)  # waits when full: backpressure

    def _windows(self, robot: str, cycle: Cycle, end_ns: int) -> list[Window]:
        card = self.scorer.card
        divider = int(card.training.get("rate_divider", 1))
        # own a compact float32 copy: a strided view would keep the whole float64 cycle alive in the queue
        signals = np.ascontiguousarray(downsample(cycle.signals, divider), dtype=np.float32)
        category, anomaly = cycle.category_name, cycle.anomaly
        if card.mode == "cycle" or card.window is None or card.hop is None:
            return [Window(robot, cycle.sample, end_ns, signals, category, anomaly)]
        dt_ns = round(1e9 / card.rate_hz)
        out = []
        for start in window_starts(len(signals), card.window, card.hop):
            stop = start + card.window
            time_ns = end_ns - (len(signals) - stop) * dt_ns
            out.append(Window(robot, cycle.sample, time_ns, signals[start:stop], category, anomaly))
        return out

    async def _next_batch(self) -> tuple[list[Window], bool]:
        first = await self.queue.get()
        if first is None:
            return [], True
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.batch:
            timeout = deadline - loop.time()
            try:
                item = (
                    self.queue.get_nowait()
                    if timeout <= 0
                    else await asyncio.wait_for(self.queue.get(), timeout)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _score(self, windows: list[Window]) -> list[Scored]:
        started = time.perf_counter()
        prepared = np.stack([self.scorer.prepare_cycle(w.signals) for w in windows])
        scores = self.scorer.score(prepared)
        self.stats.inference_seconds += time.perf_counter() - started
        return [
            Scored(w, float(scores.raw[i]), float(scores.normalized[i]), bool(scores.is_anomaly[i]))
            for i, w in enumerate(windows)
        ]

    async def _consume(self) -> None:
        card = self.scorer.card
        loop = asyncio.get_running_loop()
        while True:
            windows, done = await self._next_batch()
            points: list[Point] = []
            closed: list[Alert] = []
            if windows:
                # off the event loop, always on the same thread (one set of per-thread BLAS/oneDNN buffers)
                results = await loop.run_in_executor(self._inference, self._score, windows)
                self.stats.batches += 1
                self.stats.windows_scored += len(results)
                self.stats.anomalies += sum(r.is_anomaly for r in results)
                if self.keep_results:
                    self.stats.results.extend(results)
                points = [to_point(r, self.model_name, card.mode, card.threshold.value) for r in results]
                for r in results:
                    w = r.window
                    self.last_time[w.robot] = w.time_ns
                    closed += self._tracker(w.robot).update(w.time_ns, r.normalized, r.is_anomaly, w.cycle, w)
            if done:  # the stream ended: close alerts still open
                for robot, tracker in self.trackers.items():
                    closed += tracker.finish(self.last_time.get(robot, 0))
            if closed:
                points += await loop.run_in_executor(self._inference, self._explain, closed)
            if points:
                for sink in self.sinks:
                    await sink.write(points)
            acks = [ack for window in windows for ack in window.acks]
            if acks:
                # release the messages behind these windows only once their points are durable
                for sink in self.sinks:
                    await sink.flush()
                for ack in acks:
                    ack()
                for window in windows:
                    window.acks = []
            if done:
                return

    def _explain(self, alerts: list[Alert]) -> list[Point]:
        """Localize each alert's peak window: event time (Eq. 8.6 peak) and top signals. One batched
        backward pass for all alerts closed together."""
        card = self.scorer.card
        dt_ns = round(1e9 / card.rate_hz)
        peaks = [(a, a.peak_window) for a in alerts if isinstance(a.peak_window, Window)]
        maps: list[Point] = []
        # small batches: a backward pass keeps every activation (tens of MB per whole cycle)
        for chunk in (peaks[i : i + EXPLAIN_BATCH] for i in range(0, len(peaks), EXPLAIN_BATCH)):
            prepared = np.stack([self.scorer.prepare_cycle(w.signals) for _, w in chunk])
            loc = self.scorer.localize(prepared, top=3)
            for i, (alert, window) in enumerate(chunk):
                steps = min(len(window.signals), card.time_steps)
                peak = int(np.argmax(loc.per_time[i][:steps]))
                first_ns = window.time_ns - (len(window.signals) - 1) * dt_ns
                alert.event_time_ns = first_ns + peak * dt_ns
                alert.event_in_window_s = peak * dt_ns / 1e9
                alert.top_signals = loc.top_signals[i]
                if loc.maps is not None:
                    maps += localization_points(
                        alert, window, loc.maps[i], card.signals, dt_ns, self.model_name
                    )
        for alert in alerts:
            alert.peak_window = None  # do not keep the raw data around
            self.stats.alerts.append(alert)
        return [alert_point(a, self.model_name) for a in alerts] + maps

    def moving(self, last_scored: int) -> bool:
        """For the watchdog: windows were scored since `last_scored`, or nothing is waiting to be."""
        return self.stats.windows_scored != last_scored or self.queue.empty()

    def request_stop(self) -> None:
        """Graceful stop: sources stop reading; what is queued is still scored and written."""
        for task in self._producers:
            task.cancel()

    async def run(self, drain_timeout_s: float = 10.0) -> PipelineStats:
        consumer = asyncio.create_task(self._consume(), name="scorer")
        self._producers = [
            asyncio.create_task(self._produce(source), name=f"source-{source.name}")
            for source in self.sources
        ]
        try:
            producing = asyncio.gather(*self._producers, return_exceptions=True)
            waiting: set[asyncio.Future[Any]] = {consumer, producing}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():  # the scorer died: stop the sources instead of letting them wait forever
                for task in self._producers:
                    task.cancel()
                await producing
                consumer.result()  # raises the scorer's error
                raise RuntimeError("the scorer stopped before the sources")
            outcomes = await producing
            errors = [
                o
                for o in outcomes
                if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)
            ]
            if errors:
                raise errors[0]
            await self.queue.put(None)
            await consumer
        except BaseException:
            consumer.cancel()
            raise
        finally:
            for sink in self.sinks:
                await sink.close(drain_timeout_s=drain_timeout_s)
            for source in self.sources:
                await source.aclose()
            self._inference.shutdown(wait=True)
        return self.stats
