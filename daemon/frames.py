"""Camera frames in the pipeline: the frame model's wrapper, the points a scored frame makes, and the
fused view that joins a voraus cycle's signal score with the camera score of the same cycle.

The pipeline (daemon/pipeline.py) owns the queues, batching, alerts and acks for both kinds of data;
this module holds what is particular to frames.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from daemon.alerts import Alert
from daemon.layout import ALERT_MEASUREMENT, CYCLE_MEASUREMENT, IMAGE_SCORE_MEASUREMENT
from daemon.sinks.lineprotocol import Point
from flows.scorer import NORMALIZED_CAP
from ingest.source import Frame

FUSED_CYCLES_PER_ROBOT = 64  # cycles a robot's fused view waits for the other half of (oldest forgotten)
MAX_FUSED_ROBOTS = 10_000


class FrameScorer(Protocol):
    """What the pipeline needs of an image model (flows.ast.scorer.ImageScorer): its card (input_size,
    threshold) and `score(uint8 (B, H, W, 3)) -> scores with raw, normalized, is_anomaly, maps`."""

    card: Any

    def score(self, frames: np.ndarray) -> Any: ...


@dataclass(frozen=True)
class FrameModel:
    """The image model that scores frames, and the `model` tag of its points (swapped whole on SIGHUP)."""

    scorer: FrameScorer
    name: str

    @property
    def card(self) -> Any:
        return self.scorer.card


@dataclass
class ScoredFrame:
    frame: Frame
    score: float
    normalized: float
    is_anomaly: bool
    overlay: str = ""  # file name in the overlay directory ("" when none was saved)


def finite(value: float, cap: float = NORMALIZED_CAP) -> float:
    """A field value sinks can store: non-finite becomes ±cap (the score is flagged, never lost)."""
    value = float(value)
    if math.isfinite(value):
        return value
    return -cap if value < 0 else cap


def camera_key(robot: str, camera: str) -> str:
    """The alert tracker of a camera (its alert ids differ from the robot's signal alerts)."""
    return f"{robot}/{camera}"


def frame_point(result: ScoredFrame, model: str, threshold: float) -> Point:
    frame = result.frame
    return Point(
        IMAGE_SCORE_MEASUREMENT,
        {
            "score": finite(result.score),
            "normalized_score": finite(result.normalized),
            "threshold": float(threshold),
            "is_anomaly": bool(result.is_anomaly),
            "frame": frame.ref,
            "seq": int(frame.seq),
            "cycle": int(frame.cycle) if frame.cycle is not None else -1,
            "overlay": result.overlay,
            "label": frame.label or "",
        },
        frame.time_ns,
        {"robot": frame.robot, "camera": frame.camera, "model": model},
    )


def camera_alert_point(alert: Alert, robot: str, camera: str, model: str, updated_ns: int) -> Point:
    """A camera's alert: the signal alert's fields (see pipeline.alert_point) without the localization,
    with the frame that peaked and its overlay."""
    end = alert.end_ns if alert.end_ns is not None else alert.last_ns
    state = alert.state
    peak: Any = alert.peak_window  # the ScoredFrame of the peak
    ref = peak.frame.ref if isinstance(peak, ScoredFrame) else ""
    overlay = peak.overlay if isinstance(peak, ScoredFrame) else ""
    ongoing = "" if state == "resolved" else " (firing)"
    return Point(
        ALERT_MEASUREMENT,
        {
            "alert_id": alert.id,
            "kind": "camera",
            "state": state,
            "firing": int(state == "firing"),
            "end_ns": int(end),
            "updated_ns": int(updated_ns),
            "duration_s": (end - alert.start_ns) / 1e9,
            "peak_score": finite(alert.peak_score),
            "peak_cycle": int(alert.peak_cycle),
            "event_time_ns": int(alert.peak_time_ns),
            "windows": int(alert.windows),
            "cycles": ",".join(str(c) for c in alert.cycles if c >= 0),
            "cycle_count": int(alert.cycle_count),
            "top_signals": "",
            "frame": ref,
            "overlay": overlay,
            "text": (
                f"{robot} camera {camera}{ongoing}: image score {finite(alert.peak_score):.2f}x threshold "
                f"at frame {ref}" + (f"; overlay {overlay}" if overlay else "")
            ),
        },
        alert.start_ns,
        {"robot": robot, "model": model, "camera": camera},
    )


@dataclass
class _Half:
    normalized: float
    is_anomaly: bool


@dataclass
class _Entry:
    time_ns: int  # the first half's time: every rewrite of the fused point lands on the same point
    signals: _Half | None = None
    cameras: dict[str, _Half] = field(default_factory=dict)


def fired(signal: bool, camera: bool) -> str:
    return {(False, False): "none", (True, False): "signals", (False, True): "camera"}.get(
        (signal, camera), "both"
    )


class Fusion:
    """Joins, per robot and voraus cycle, the cycle's signal score (the highest of its windows) with the
    score of each camera frame that carries the cycle id. Once both halves of a (robot, camera, cycle) are
    in, a `cycle_fused` point is written, and written again (same time and tags: it replaces itself)
    whenever a later window or frame of that cycle changes it. Bounded: per robot the latest
    FUSED_CYCLES_PER_ROBOT cycles wait for their other half."""

    def __init__(self) -> None:
        self._robots: OrderedDict[str, OrderedDict[int, _Entry]] = OrderedDict()
        self.fused = 0  # points written (rewrites included)

    def _entry(self, robot: str, cycle: int, time_ns: int) -> _Entry:
        cycles = self._robots.get(robot)
        if cycles is None:
            cycles = self._robots[robot] = OrderedDict()
            while len(self._robots) > MAX_FUSED_ROBOTS:
                self._robots.popitem(last=False)
        entry = cycles.get(cycle)
        if entry is None:
            entry = cycles[cycle] = _Entry(time_ns)
            while len(cycles) > FUSED_CYCLES_PER_ROBOT:
                cycles.popitem(last=False)
        return entry

    def signal(
        self, robot: str, cycle: int, time_ns: int, normalized: float, is_anomaly: bool
    ) -> list[Point]:
        entry = self._entry(robot, cycle, time_ns)
        half = entry.signals
        if half is None:
            entry.signals = _Half(normalized, is_anomaly)
        else:
            half.normalized = max(half.normalized, normalized)
            half.is_anomaly = half.is_anomaly or is_anomaly
        return [self._point(robot, camera, cycle, entry) for camera in entry.cameras]

    def camera(
        self, robot: str, camera: str, cycle: int, time_ns: int, normalized: float, is_anomaly: bool
    ) -> list[Point]:
        entry = self._entry(robot, cycle, time_ns)
        half = entry.cameras.get(camera)
        if half is None:
            entry.cameras[camera] = _Half(normalized, is_anomaly)
        else:  # a second frame of the same cycle: the worse one counts
            half.normalized = max(half.normalized, normalized)
            half.is_anomaly = half.is_anomaly or is_anomaly
        return [self._point(robot, camera, cycle, entry)] if entry.signals is not None else []

    def _point(self, robot: str, camera: str, cycle: int, entry: _Entry) -> Point:
        signals, image = entry.signals, entry.cameras[camera]
        assert signals is not None
        self.fused += 1
        which = fired(signals.is_anomaly, image.is_anomaly)
        return Point(
            CYCLE_MEASUREMENT,
            {
                "cycle": int(cycle),
                "signal_score": finite(signals.normalized),
                "camera_score": finite(image.normalized),
                "signal_anomaly": bool(signals.is_anomaly),
                "camera_anomaly": bool(image.is_anomaly),
                "fired": which,
                "text": f"{robot} cycle {cycle}: "
                + {
                    "none": "normal",
                    "signals": "the signals fired, the camera did not",
                    "camera": "the camera fired, the signals did not",
                    "both": "the signals and the camera fired",
                }[which],
            },
            entry.time_ns,
            {"robot": robot, "camera": camera},
        )
