"""The streaming pipeline: sources → per-robot windowing → micro-batched scorer → sinks.

Queues are bounded, so a slow scorer or sink makes the sources wait (backpressure) instead of growing
memory. Inference runs in a worker thread, off the event loop, on the GPU when there is one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from daemon.alerts import Alert, AlertEvent, AlertOptions, AlertTracker
from daemon.frames import (
    FrameModel,
    Fusion,
    ScoredFrame,
    camera_alert_point,
    camera_key,
    finite,
    frame_point,
)
from daemon.layout import ALERT_MEASUREMENT, LOCALIZATION_MEASUREMENT, SCORE_MEASUREMENT
from daemon.sinks.file import FileSink as FileSink  # moved there; imported from here too
from daemon.sinks.lineprotocol import Point
from daemon.windowing import Ack, StreamRejected, StreamWindower, Window
from flows.preprocess import downsample, window_starts
from flows.scorer import SCORE_CAP, Scorer
from ingest.messages import SignalBatch
from ingest.source import Delivery, Frame, ReplayedCycle, Source
from ingest.stream import Rejections
from ingest.voraus.reader import Cycle

log = logging.getLogger("cellwatch.pipeline")
MEASUREMENT = SCORE_MEASUREMENT
LOCALIZATION_BINS = 200  # time bins stored per localized window
LOCALIZATION_SIGNALS = 5  # signals stored per localized window besides the total
EXPLAIN_BATCH = 4  # alerts localized per backward pass
RECENT_ALERTS = 100  # resolved alerts kept for the exit summary (counters count them all)
MAX_ROBOTS_REMEMBERED = 100_000


@dataclass
class Scored:
    window: Window
    score: float
    normalized: float
    is_anomaly: bool
    capped: bool = False
    #: a fusion model's parts, each in normal spreads above its normal median (nll, linres, pca)
    parts: dict[str, float] | None = None


class Sink(Protocol):
    """`write` accepts points; after `flush` they are durable (spooled or written)."""

    async def write(self, points: Sequence[Point]) -> None: ...
    async def flush(self) -> None: ...
    async def close(self, drain_timeout_s: float = 10.0) -> bool: ...


@dataclass
class PipelineStats:
    cycles_in: int = 0
    messages_in: int = 0
    windows_scored: int = 0
    anomalies: int = 0
    capped: int = 0  # windows whose score was not finite (stored as the cap, flagged anomalous)
    inputs_clipped: int = 0  # standardized input values of scored windows clipped to ±CLIP_SIGMA
    batches: int = 0
    inference_seconds: float = 0.0
    alerts: int = 0  # alerts opened
    alerts_resolved: int = 0
    alert_updates: int = 0
    robots_retired: int = 0  # robots forgotten after `idle_timeout_s` of silence
    reloads: int = 0
    frames_in: int = 0
    frames_scored: int = 0
    frame_anomalies: int = 0
    frame_batches: int = 0
    frame_inference_seconds: float = 0.0
    camera_alerts: int = 0
    overlays: int = 0  # overlays saved
    results: list[Scored] = field(default_factory=list)  # only with keep_results (tests, evaluation)
    frame_results: list[ScoredFrame] = field(default_factory=list)  # only with keep_results
    cameras: set[str] = field(default_factory=set)  # robot/camera seen (bounded by the robot limits)
    recent_alerts: deque[Alert] = field(default_factory=lambda: deque(maxlen=RECENT_ALERTS))
    robots: set[str] = field(default_factory=set)  # robot ids seen (bounded by the robot limits)


@dataclass(frozen=True)
class ModelState:
    """What scores a window and what its points say about the model: swapped as one (SIGHUP)."""

    scorer: Scorer
    name: str  # the `model` tag
    generation: int = 0

    @property
    def card(self) -> Any:
        return self.scorer.card

    @property
    def divider(self) -> int:
        return int(self.card.training.get("rate_divider", 1))

    @property
    def mode(self) -> str:
        return "cycle" if self.card.mode == "cycle" or self.card.window is None else "window"

    def windowing(self) -> dict[str, Any]:
        """How stream windows are cut for this model (what a windower must follow)."""
        card = self.card
        return {
            "mode": self.mode,
            "period_ns": round(1e9 / (card.rate_hz * self.divider)),
            "divider": self.divider,
            "window": card.window,
            "hop": card.hop,
            "max_cycle_rows": 8 * card.time_steps * self.divider,
        }


@dataclass(frozen=True)
class RobotLimits:
    """Bounded state per robot: robot ids come from topics and keys, so they are not trusted."""

    max_robots: int = 1000
    allow: frozenset[str] | None = None  # only these robots, when given
    idle_timeout_s: float | None = 600.0  # forget a silent robot (and reject its unfinished cycle)


@dataclass
class _Retire:
    """Queue marker: a robot fell silent; its tracker resolves and these acks are released in order."""

    robot: str
    acks: list[Ack]


_Item = Window | _Retire | None


def alert_point(alert: Alert, model: str, updated_ns: int | None = None) -> Point:
    """An alert as one point at its start time, rewritten at each event (InfluxDB keeps the latest):
    `state` firing/resolved, `firing` 1/0, end (or latest window so far), peak, event time
    (localization) and top signals as fields."""
    end = alert.end_ns if alert.end_ns is not None else alert.last_ns
    top = ", ".join(f"{name} {share:.0%}" for name, share in alert.top_signals)
    state = alert.state
    ongoing = "" if state == "resolved" else " (firing)"
    return Point(
        ALERT_MEASUREMENT,
        {
            "alert_id": alert.id,
            "kind": "signals",
            "state": state,
            "firing": int(state == "firing"),
            "end_ns": int(end),
            "updated_ns": int(updated_ns if updated_ns is not None else end),
            "duration_s": (end - alert.start_ns) / 1e9,
            "peak_score": finite(alert.peak_score),
            "peak_cycle": int(alert.peak_cycle),
            "event_time_ns": int(
                alert.event_time_ns if alert.event_time_ns is not None else alert.peak_time_ns
            ),
            "windows": int(alert.windows),
            "cycles": ",".join(str(c) for c in alert.cycles),
            "cycle_count": int(alert.cycle_count),
            "top_signals": top,
            "text": (
                f"{alert.robot}{ongoing}: anomaly score {finite(alert.peak_score):.2f}x threshold; "
                f"top signals: {top}"
            ),
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
    per_step = np.nan_to_num(grad[:, :steps].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    width = -(-steps // LOCALIZATION_BINS)  # ceil
    bins = -(-steps // width)
    padded = np.zeros((per_step.shape[0], bins * width), dtype=np.float64)
    padded[:, :steps] = per_step
    binned = padded.reshape(per_step.shape[0], bins, width).sum(axis=2)
    counts = np.minimum(width, steps - np.arange(bins) * width)
    binned /= counts  # mean per step in each bin
    total = binned.sum(axis=0)
    scale = float(total.max()) if np.isfinite(total.max()) and total.max() > 0 else 1.0
    first_ns = window.time_ns - (len(window.signals) - 1) * dt_ns
    top = np.argsort(-per_step.sum(axis=1))[:LOCALIZATION_SIGNALS]
    rows = [("(all)", total)] + [(signals[j], binned[j]) for j in top]
    return [
        Point(
            LOCALIZATION_MEASUREMENT,
            {"contribution": finite(values[k] / scale, 1.0), "peak_cycle": int(alert.peak_cycle)},
            first_ns + k * width * dt_ns,
            {"robot": alert.robot, "model": model, "signal": name},
        )
        for name, values in rows
        for k in range(bins)
    ]


def to_point(result: Scored, model: str, mode: str, threshold: float) -> Point:
    fields: dict[str, float | int | bool | str] = {
        "score": finite(result.score, SCORE_CAP),
        "normalized_score": finite(result.normalized),
        "threshold": float(threshold),
        "is_anomaly": bool(result.is_anomaly or result.capped),
        "capped": bool(result.capped),
        "cycle": int(result.window.cycle),
    }
    for name, value in (result.parts or {}).items():
        fields[f"part_{name}"] = finite(value)
    return Point(
        MEASUREMENT,
        fields,
        result.window.time_ns,
        {"robot": result.window.robot, "model": model, "mode": mode},
    )


class OverlayWriter(Protocol):
    """Where anomaly-map overlays go (daemon.overlays.OverlayStore): returns the saved file's name."""

    def save(
        self,
        robot: str,
        camera: str,
        time_ns: int,
        seq: int,
        image: np.ndarray,
        anomaly_map: np.ndarray,
        threshold: float,
        reference: float = 0.0,
    ) -> str: ...


@dataclass(frozen=True)
class Models:
    """The models of one daemon, one per kind of data: `signals` scores robot signals (MVT-Flow),
    `frames` scores camera frames (AST). A source's kind picks its model."""

    signals: ModelState | None = None
    frames: FrameModel | None = None


class Pipeline:
    """Sources of both kinds → per-kind micro-batches → one inference thread → sinks.

    Signal sources feed windows to the signal model's queue; camera sources feed frames to the frame
    model's queue; each queue has its own batching consumer, and both run their models on the same
    inference thread (one device). Alerts are tracked per robot (signals) and per robot and camera
    (frames); a frame that carries a voraus cycle id is joined with that cycle's signal score."""

    def __init__(
        self,
        sources: Sequence[Source],
        models: Models,
        sinks: Sequence[Sink],
        *,
        batch: int = 32,
        max_wait_ms: int = 50,
        frame_batch: int = 8,
        frame_max_wait_ms: int | None = None,
        queue_size: int | None = None,
        keep_results: bool = False,
        alerts: AlertOptions | None = None,
        limits: RobotLimits | None = None,
        overlays: OverlayWriter | None = None,
    ) -> None:
        self.sources = list(sources)
        self._signal_model = models.signals
        self.frame_model = models.frames
        self._models: dict[int, ModelState] = {0: models.signals} if models.signals else {}
        self._queued: Counter[int] = Counter()  # windows in the queue per model generation
        self.sinks = list(sinks)
        self.batch = batch
        self.frame_batch = frame_batch
        self.max_wait_s = max_wait_ms / 1000
        self.frame_max_wait_s = (frame_max_wait_ms if frame_max_wait_ms is not None else max_wait_ms) / 1000
        # bounded: a few batches in flight; sources wait when it is full (backpressure)
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size or max(4 * batch, 16))
        self.frame_queue: asyncio.Queue[Delivery | None] = asyncio.Queue(
            maxsize=queue_size or max(2 * frame_batch, 4)
        )
        self.stats = PipelineStats()
        self.keep_results = keep_results
        self.limits = limits or RobotLimits()
        self.overlays = overlays
        self.fusion = Fusion()
        self._producers: list[asyncio.Task[None]] = []
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellwatch-inference")
        self._overlay_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellwatch-overlays")
        self._sink_lock = asyncio.Lock()  # one writer at a time: a batch's points, then its flush
        self.alert_options: AlertOptions = alerts or {}
        self.trackers: dict[str, AlertTracker] = {}
        self.camera_trackers: dict[str, AlertTracker] = {}
        self.windowers: dict[str, StreamWindower] = {}
        self._last_seen: dict[str, float] = {}  # stream robot -> monotonic time of its last message
        self._last_label: dict[str, int] = {}  # window mode: the cycle label of a robot's last window
        self.stream_rejections: dict[str, Rejections] = {}  # source name -> reason -> count
        self.last_time: dict[str, int] = {}

    # -- the models, each swapped whole ------------------------------------------------------------
    @property
    def model(self) -> ModelState:
        """The signal model (a pipeline of camera sources only has none)."""
        if self._signal_model is None:
            raise RuntimeError("no signal model is configured")
        return self._signal_model

    @property
    def scorer(self) -> Scorer:
        return self.model.scorer

    @property
    def model_name(self) -> str:
        names = [m.name for m in (self._signal_model, self.frame_model) if m is not None]
        return ", ".join(names)

    def swap_frame_model(self, model: FrameModel) -> None:
        """Score frames with another image model from the next batch on (SIGHUP)."""
        self.frame_model = model
        self.stats.reloads += 1

    def swap_model(self, scorer: Scorer, model_name: str) -> None:
        """Score with another model from the next window cut on (SIGHUP). Call on the event loop.

        Windows already queued are scored by the model they were cut for, so every point after the
        first point of the new model carries the new model's threshold, mode and tag; windowers follow
        a changed rate, window or hop at once (rows held for an unfinished cycle are kept)."""
        old = self.model
        self._signal_model = ModelState(scorer, model_name, old.generation + 1)
        self._models[self.model.generation] = self.model
        self._drop_idle_generations()
        spec, before = self.model.windowing(), old.windowing()
        if spec != before:
            for robot, windower in self.windowers.items():
                if windower.reconfigure(**spec):
                    log.warning(
                        "%s: the new model cuts windows differently (%s); rows held for the unfinished "
                        "cycle or window are not scored",
                        robot,
                        ", ".join(f"{k}={v}" for k, v in spec.items() if before[k] != v),
                    )
        self.stats.reloads += 1

    def _drop_idle_generations(self) -> None:
        """Forget the models of earlier generations once no queued window needs them."""
        current = self._signal_model.generation if self._signal_model else None
        for generation in list(self._models):
            if generation != current and not self._queued[generation]:
                del self._models[generation]
                self._queued.pop(generation, None)

    # -- per robot ---------------------------------------------------------------------------------
    def _tracker(self, robot: str) -> AlertTracker:
        tracker = self.trackers.get(robot)
        if tracker is None:
            tracker = self.trackers[robot] = AlertTracker(robot, **self.alert_options)
        return tracker

    def _admit(self, robot: str) -> StreamWindower:
        """The robot's windower; raises StreamRejected for a robot not allowed or one too many."""
        windower = self.windowers.get(robot)
        if windower is not None:
            return windower
        limits = self.limits
        if limits.allow is not None and robot not in limits.allow:
            raise StreamRejected("robot_not_allowed", f"robot {robot!r} is not in the allowed robots")
        if len(self.windowers) >= limits.max_robots:
            raise StreamRejected(
                "too_many_robots",
                f"robot {robot!r} would be robot {len(self.windowers) + 1}; "
                f"max_robots is {limits.max_robots}",
            )
        windower = self.windowers[robot] = StreamWindower(robot, **self.model.windowing())
        if len(self.stats.robots) < MAX_ROBOTS_REMEMBERED:
            self.stats.robots.add(robot)
        return windower

    async def _put(self, window: Window) -> None:
        window.generation = self.model.generation
        self._queued[window.generation] += 1
        await self.queue.put(window)  # waits when full: backpressure

    async def _produce(self, source: Source) -> None:
        """Everything a source delivers, to the queue of the model made for it."""
        rejected = self.stream_rejections.setdefault(source.name, Rejections())
        async for delivery in source.deliveries():
            item = delivery.item
            if isinstance(item, Frame):
                self.stats.frames_in += 1
                await self._put_frame(delivery, rejected)
            elif isinstance(item, ReplayedCycle):
                self.stats.cycles_in += 1
                self.stats.robots.add(item.robot)
                for window in self._windows(item.robot, item.cycle, item.end_ns):
                    await self._put(window)
                delivery.ack()
            else:
                self.stats.messages_in += 1
                await self._put_batch(delivery, item, rejected)

    async def _put_batch(self, delivery: Delivery, batch: SignalBatch, rejected: Rejections) -> None:
        """A streamed batch of signals (Kafka, MQTT): windowed per robot."""
        try:
            windower = self._admit(batch.robot)
        except StreamRejected as err:
            delivery.ack()  # never scored: holding it would block the acks behind it for good
            rejected.add(err.reason, str(err), log)
            return
        self._last_seen[batch.robot] = time.monotonic()
        try:
            windows = windower.push(batch, delivery.ack)
        except StreamRejected as err:
            rejected.add(err.reason, str(err), log)
            return
        for window in windows:
            self._count_cycle(window)
            await self._put(window)

    async def _put_frame(self, delivery: Delivery, rejected: Rejections) -> None:
        frame = delivery.item
        assert isinstance(frame, Frame)
        key = camera_key(frame.robot, frame.camera)
        limits = self.limits
        reason = None
        if self.frame_model is None:
            reason = ("no_model", f"{key}: a camera frame, but no image model is configured")
        elif limits.allow is not None and frame.robot not in limits.allow:
            reason = ("robot_not_allowed", f"robot {frame.robot!r} is not in the allowed robots")
        elif key not in self.camera_trackers and len(self.camera_trackers) >= limits.max_robots:
            reason = (
                "too_many_cameras",
                f"camera {key!r} would be one too many; max_robots is {limits.max_robots}",
            )
        if reason is not None:
            delivery.ack()
            rejected.add(reason[0], reason[1], log)
            return
        if key not in self.camera_trackers:
            self.camera_trackers[key] = AlertTracker(key, **self.alert_options)
            if len(self.stats.cameras) < MAX_ROBOTS_REMEMBERED:
                self.stats.cameras.add(key)
        await self.frame_queue.put(delivery)  # waits when full: backpressure

    def _count_cycle(self, window: Window) -> None:
        if self.model.mode == "cycle":
            self.stats.cycles_in += 1
        elif self._last_label.get(window.robot) != window.cycle:
            self._last_label[window.robot] = window.cycle
            self.stats.cycles_in += 1

    async def _expire_idle(self) -> None:
        """Forget robots silent for `idle_timeout_s`: an unfinished cycle is rejected (`cycle_timeout`:
        its end never came, and a truncated cycle would score as an anomaly it is not), its messages
        are released, the robot's open alert resolves, and its state is freed."""
        timeout = self.limits.idle_timeout_s
        if not timeout:
            return
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))  # a periodic sweep, not a wait for a condition
            now = time.monotonic()
            for robot, seen in list(self._last_seen.items()):
                if now - seen < timeout:
                    continue
                del self._last_seen[robot]
                self._last_label.pop(robot, None)
                windower = self.windowers.pop(robot, None)
                acks: list[Ack] = []
                if windower is not None:
                    ready, acks, unfinished = windower.expire()
                    for window in ready:
                        self._count_cycle(window)
                        await self._put(window)
                    if unfinished:
                        rejected = self.stream_rejections.setdefault("(idle)", Rejections())
                        rejected.add(
                            "cycle_timeout",
                            f"{robot}: no message for {timeout:g} s; unfinished cycle {unfinished} dropped",
                            log,
                        )
                self.stats.robots_retired += 1
                await self.queue.put(_Retire(robot, acks))

    def _windows(self, robot: str, cycle: Cycle, end_ns: int) -> list[Window]:
        card = self.model.card
        divider = self.model.divider
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

    # -- scoring -----------------------------------------------------------------------------------
    async def _next_batch(self) -> tuple[list[Window], list[_Retire], bool]:
        first = await self.queue.get()
        if first is None:
            return [], [], True
        batch: list[Window] = []
        retired: list[_Retire] = []
        if isinstance(first, _Retire):
            retired.append(first)
        else:
            batch.append(first)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.batch and not retired:
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
                return batch, retired, True
            if isinstance(item, _Retire):
                retired.append(item)  # ends the batch: what follows belongs after the retirement
            else:
                batch.append(item)
        return batch, retired, False

    def _score(self, model: ModelState, windows: list[Window]) -> list[Scored]:
        started = time.perf_counter()
        scorer = model.scorer  # one model for the whole batch: scaler and weights together
        clipped = scorer.clipped  # counted here: localizing an alert prepares its window again
        prepared = np.stack([scorer.prepare_cycle(w.signals) for w in windows])
        self.stats.inputs_clipped += scorer.clipped - clipped
        scores = scorer.score(prepared)
        self.stats.inference_seconds += time.perf_counter() - started
        return [
            Scored(
                w,
                float(scores.raw[i]),
                float(scores.normalized[i]),
                bool(scores.is_anomaly[i]),
                bool(scores.capped[i]),
                {k: float(v[i]) for k, v in scores.components.items()} if scores.components else None,
            )
            for i, w in enumerate(windows)
        ]

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            windows, retired, done = await self._next_batch()
            points: list[Point] = []
            events: list[tuple[AlertEvent, ModelState]] = []
            results: list[Scored] = []
            # a batch of windows cut for one model generation each (normally all the same)
            for generation in sorted({w.generation for w in windows}):
                group = [w for w in windows if w.generation == generation]
                model = self._models[generation]
                # off the event loop, always on the same thread (one set of per-thread BLAS/oneDNN buffers)
                scored = await loop.run_in_executor(self._inference, self._score, model, group)
                self._queued[generation] -= len(group)
                results += scored
                points += [
                    to_point(r, model.name, model.card.mode, model.card.threshold.value) for r in scored
                ]
                for r in scored:
                    w = r.window
                    self.last_time[w.robot] = w.time_ns
                    if self.frame_model is not None:  # a camera may send this cycle's frame
                        points += self.fusion.signal(
                            w.robot, w.cycle, w.time_ns, r.normalized, r.is_anomaly or r.capped
                        )
                    for event in self._tracker(w.robot).update(
                        w.time_ns, r.normalized, r.is_anomaly, w.cycle, w
                    ):
                        events.append((event, model))
            if windows:
                self._drop_idle_generations()
                self.stats.batches += 1
                self.stats.windows_scored += len(results)
                self.stats.anomalies += sum(r.is_anomaly for r in results)
                self.stats.capped += sum(r.capped for r in results)
                if self.keep_results:
                    self.stats.results.extend(results)
            for retire in retired:  # a silent robot: resolve its alert, free its state
                tracker = self.trackers.pop(retire.robot, None)
                if tracker is not None:
                    events += [(e, self.model) for e in tracker.finish(self.last_time.get(retire.robot, 0))]
                self.last_time.pop(retire.robot, None)
            if done:  # the stream ended: resolve alerts still open
                for robot, tracker in self.trackers.items():
                    events += [(e, self.model) for e in tracker.finish(self.last_time.get(robot, 0))]
            if events:
                points += await loop.run_in_executor(self._inference, self._explain, events)
            acks = [ack for window in windows for ack in window.acks] + [a for r in retired for a in r.acks]
            await self._write(points, acks)
            for window in windows:
                window.acks = []
            if done:
                return

    async def _write(self, points: list[Point], acks: Sequence[Ack]) -> None:
        """Points to every sink; then, when there are acks, a flush (durable) before they are released."""
        if not points and not acks:
            return
        async with self._sink_lock:
            if points:
                for sink in self.sinks:
                    await sink.write(points)
            if acks:
                # release the messages behind these points only once the points are durable
                for sink in self.sinks:
                    await sink.flush()
        for ack in acks:
            ack()

    # -- frames ------------------------------------------------------------------------------------
    async def _next_frames(self) -> tuple[list[Delivery], bool]:
        first = await self.frame_queue.get()
        if first is None:
            return [], True
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.frame_max_wait_s
        while len(batch) < self.frame_batch:
            timeout = deadline - loop.time()
            try:
                item = (
                    self.frame_queue.get_nowait()
                    if timeout <= 0
                    else await asyncio.wait_for(self.frame_queue.get(), timeout)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _score_frames(
        self, model: FrameModel, frames: list[Frame]
    ) -> tuple[list[ScoredFrame], list[np.ndarray]]:
        """On the inference thread: score (frames of one size together; the model resizes them to its
        input as `evaluate` and training do). Returns the results and their anomaly maps."""
        started = time.perf_counter()
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, frame in enumerate(frames):
            by_size.setdefault(frame.image.shape, []).append(i)
        raw = np.zeros(len(frames))
        normalized = np.zeros(len(frames))
        flagged = np.zeros(len(frames), dtype=bool)
        maps: list[np.ndarray] = [np.empty(0)] * len(frames)
        for indices in by_size.values():
            scores = model.scorer.score(np.stack([frames[i].image for i in indices]))
            for j, i in enumerate(indices):
                raw[i], normalized[i], flagged[i] = scores.raw[j], scores.normalized[j], scores.is_anomaly[j]
                maps[i] = np.asarray(scores.maps[j])
        out = [
            ScoredFrame(frame, float(raw[i]), float(normalized[i]), bool(flagged[i]))
            for i, frame in enumerate(frames)
        ]
        self.stats.frame_inference_seconds += time.perf_counter() - started
        return out, maps

    def _save_overlays(self, model: FrameModel, scored: list[ScoredFrame], maps: list[np.ndarray]) -> None:
        """On the overlay thread (drawing and PNG-encoding a 720p overlay takes ~60 ms: not on the
        inference thread, which the other model shares): the overlay of each frame over the threshold,
        on the card's threshold scale, its name kept in the result."""
        if self.overlays is None:
            return
        threshold = float(model.card.threshold.value)
        reference = float(model.card.threshold.reference)
        for result, anomaly_map in zip(scored, maps, strict=True):
            if not result.is_anomaly:
                continue
            frame = result.frame
            try:
                result.overlay = self.overlays.save(
                    frame.robot,
                    frame.camera,
                    frame.time_ns,
                    frame.seq,
                    frame.image,  # the camera's own picture: the overlay keeps its aspect ratio
                    anomaly_map,
                    threshold,
                    reference,
                )
                self.stats.overlays += 1
            except (OSError, ValueError) as err:  # a full disk loses the picture, never the score
                log.error("overlay of %s not saved: %s", frame.ref, err)

    async def _consume_frames(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deliveries, done = await self._next_frames()
            points: list[Point] = []
            if deliveries:
                model = self.frame_model
                assert model is not None  # frames are admitted only with a frame model
                frames = [d.item for d in deliveries if isinstance(d.item, Frame)]
                scored, maps = await loop.run_in_executor(self._inference, self._score_frames, model, frames)
                if any(r.is_anomaly for r in scored) and self.overlays is not None:
                    await loop.run_in_executor(self._overlay_thread, self._save_overlays, model, scored, maps)
                del maps
                threshold = float(model.card.threshold.value)
                for r in scored:
                    frame = r.frame
                    points.append(frame_point(r, model.name, threshold))
                    key = camera_key(frame.robot, frame.camera)
                    tracker = self.camera_trackers.get(key)
                    if tracker is not None:
                        cycle = frame.cycle if frame.cycle is not None else -1
                        for event in tracker.update(frame.time_ns, r.normalized, r.is_anomaly, cycle, r):
                            points.append(self._camera_event(event, frame.robot, frame.camera, model.name))
                    if frame.cycle is not None:
                        points += self.fusion.camera(
                            frame.robot, frame.camera, frame.cycle, frame.time_ns, r.normalized, r.is_anomaly
                        )
                    r.frame = _without_pixels(frame)  # what is kept must not hold the image
                self.stats.frame_batches += 1
                self.stats.frames_scored += len(scored)
                self.stats.frame_anomalies += sum(r.is_anomaly for r in scored)
                if self.keep_results:
                    self.stats.frame_results.extend(scored)
            if done:  # the streams ended: resolve camera alerts still open
                name = self.frame_model.name if self.frame_model is not None else ""
                for key, tracker in self.camera_trackers.items():
                    robot, camera = key.split("/", 1)
                    last = tracker.open.last_ns if tracker.open is not None else 0
                    for event in tracker.finish(last):
                        points.append(self._camera_event(event, robot, camera, name))
            await self._write(points, [d.ack for d in deliveries])
            if done:
                return

    def _camera_event(self, event: AlertEvent, robot: str, camera: str, model: str) -> Point:
        if event.kind == "opened":
            self.stats.camera_alerts += 1
            self.stats.alerts += 1
        elif event.kind == "updated":
            self.stats.alert_updates += 1
        else:
            self.stats.alerts_resolved += 1
            self.stats.recent_alerts.append(event.alert)
        return camera_alert_point(event.view, robot, camera, model, event.time_ns)

    def _explain(self, events: list[tuple[AlertEvent, ModelState]]) -> list[Point]:
        """Each alert event as a point; the alert's peak window is localized (event time by Eq. 8.6,
        top signals, the map) when the alert opens and whenever its peak has moved since, in small
        batches of backward passes."""
        todo: list[tuple[Alert, Window, ModelState]] = []
        seen: set[str] = set()
        for event, model in events:
            alert = event.alert
            window = alert.peak_window
            if (
                isinstance(window, Window)
                and alert.localized_peak_ns != alert.peak_time_ns
                and alert.id not in seen
            ):
                todo.append((alert, window, self._models.get(window.generation, model)))
                seen.add(alert.id)
        # small batches: a backward pass keeps every activation (tens of MB per whole cycle)
        for chunk in (todo[i : i + EXPLAIN_BATCH] for i in range(0, len(todo), EXPLAIN_BATCH)):
            for model in {id(m): m for _, _, m in chunk}.values():
                self._localize(model, [(a, w) for a, w, m in chunk if m is model])
        out: list[Point] = []
        maps: list[Point] = []
        for event, model in events:
            alert = event.alert
            if event.kind == "opened":
                self.stats.alerts += 1
            elif event.kind == "updated":
                self.stats.alert_updates += 1
            else:
                self.stats.alerts_resolved += 1
                self.stats.recent_alerts.append(alert)
                alert.peak_window = None  # do not keep the raw data around
                maps += alert.map_points
                alert.map_points = []
            view = event.view  # the alert as it was at this event; the localization as it is now
            if view.peak_time_ns == alert.localized_peak_ns:
                view.event_time_ns, view.event_in_window_s = alert.event_time_ns, alert.event_in_window_s
                view.top_signals = alert.top_signals
            out.append(alert_point(view, model.name, event.time_ns))
        return out + maps

    def _localize(self, model: ModelState, part: list[tuple[Alert, Window]]) -> None:
        card = model.card
        dt_ns = round(1e9 / card.rate_hz)
        prepared = np.stack([model.scorer.prepare_cycle(w.signals) for _, w in part])
        loc = model.scorer.localize(prepared, top=3)
        for i, (alert, window) in enumerate(part):
            steps = min(len(window.signals), card.time_steps)
            peak = int(np.argmax(loc.per_time[i][:steps]))
            first_ns = window.time_ns - (len(window.signals) - 1) * dt_ns
            alert.event_time_ns = first_ns + peak * dt_ns
            alert.event_in_window_s = peak * dt_ns / 1e9
            alert.top_signals = loc.top_signals[i]
            alert.localized_peak_ns = alert.peak_time_ns
            if alert.state == "firing":
                alert.peak_window = None  # localized: a later, higher peak brings its own window
            if loc.maps is not None:  # written once the alert resolves: one map per alert, its final peak
                alert.map_points = localization_points(
                    alert, window, loc.maps[i], card.signals, dt_ns, model.name
                )

    def scored(self) -> int:
        """Windows and frames scored so far (the watchdog's progress counter)."""
        return self.stats.windows_scored + self.stats.frames_scored

    def moving(self, last_scored: int) -> bool:
        """For the watchdog: windows or frames were scored since `last_scored`, or nothing is waiting."""
        return self.scored() != last_scored or (self.queue.empty() and self.frame_queue.empty())

    def request_stop(self) -> None:
        """Graceful stop: sources stop reading; what is queued is still scored and written."""
        for task in self._producers:
            task.cancel()

    async def run(self, drain_timeout_s: float = 10.0) -> PipelineStats:
        consumer = asyncio.create_task(self._consume(), name="scorer")
        frame_consumer = asyncio.create_task(self._consume_frames(), name="frame-scorer")
        self._producers = [
            asyncio.create_task(self._produce(source), name=f"source-{source.name}")
            for source in self.sources
        ]
        sweeper = asyncio.create_task(self._expire_idle(), name="idle-robots")
        try:
            producing = asyncio.gather(*self._producers, return_exceptions=True)
            waiting: set[asyncio.Future[Any]] = {consumer, frame_consumer, producing}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for scorer in (consumer, frame_consumer):
                if scorer.done():  # a scorer died: stop the sources instead of letting them wait forever
                    for task in self._producers:
                        task.cancel()
                    await producing
                    scorer.result()  # raises the scorer's error
                    raise RuntimeError("the scorer stopped before the sources")
            outcomes = await producing
            errors = [
                o
                for o in outcomes
                if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)
            ]
            if errors:
                raise errors[0]
            sweeper.cancel()
            await self.queue.put(None)
            await self.frame_queue.put(None)
            await asyncio.gather(consumer, frame_consumer)
        except BaseException:
            consumer.cancel()
            frame_consumer.cancel()
            raise
        finally:
            sweeper.cancel()
            for sink in self.sinks:
                await sink.close(drain_timeout_s=drain_timeout_s)
            for source in self.sources:
                await source.aclose()
            self._inference.shutdown(wait=True)
            self._overlay_thread.shutdown(wait=True)
        return self.stats


def _without_pixels(frame: Frame) -> Frame:
    import dataclasses

    return dataclasses.replace(frame, image=np.empty((0, 0, 3), dtype=np.uint8))
