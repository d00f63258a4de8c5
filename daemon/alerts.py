"""Alerts from scored windows: a threshold with hysteresis, per robot, with an Alertmanager-style lifecycle.

An alert opens when at least `k` of the last `n` windows are over the threshold and have been for
`min_duration_s` (counted from the first over-threshold window among them), and the robot is not in
its `cooldown_s` after the previous alert. Times are window end times (when a score is known). It closes
when none of the last `n` windows is over the threshold (so it does not flap at the threshold).

The tracker reports each alert as events, in the order they happen:

- ``firing`` as soon as the alert opens (the window that makes it fire: within one window of the
  threshold being crossed, when k = n = 1);
- ``firing`` again as an *update* while it lasts, when its peak has grown or `update_interval_s` of data
  time has passed since the last event, never more often than that (rate-limited);
- ``resolved`` once it closes (or the stream ends, or the robot falls silent).

Every event carries the alert's id (the same for a replay of the same data: robot and start time), its
peak (normalized) score and cycle so far, and the window that peaked, which the pipeline localizes to
give the event time (thesis Eq. 8.6) and the top contributing signals.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypedDict

State = Literal["firing", "resolved"]
MAX_ALERT_CYCLES = 1000  # cycle labels kept per alert (a fault lasting days must not grow without bound)


def alert_id(robot: str, start_ns: int) -> str:
    """Stable id of an alert: the same data gives the same id after a restart or a replay."""
    return hashlib.sha256(f"{robot}\0{start_ns}".encode()).hexdigest()[:16]


@dataclass
class Alert:
    robot: str
    start_ns: int
    peak_score: float
    peak_time_ns: int
    peak_cycle: int
    peak_window: Any = field(default=None, repr=False)  # what the pipeline needs to localize the peak
    end_ns: int | None = None
    last_ns: int = 0  # the newest window seen while open
    windows: int = 0
    cycles: list[int] = field(default_factory=list)
    cycle_count: int = 0  # over-threshold cycles (`cycles` keeps at most MAX_ALERT_CYCLES of them)
    event_time_ns: int | None = None
    event_in_window_s: float | None = None  # where in the peak window the localization peaks
    top_signals: list[tuple[str, float]] = field(default_factory=list)
    localized_peak_ns: int | None = None  # the peak window the localization above belongs to
    map_points: list[Any] = field(default_factory=list, repr=False)  # its map, written at resolve
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = alert_id(self.robot, self.start_ns)

    @property
    def state(self) -> State:
        return "firing" if self.end_ns is None else "resolved"

    def snapshot(self) -> Alert:
        """The alert as it is now, for an event's point: later windows of the same batch change the
        live alert (peak, end), and the point of an earlier event must not show those."""
        return replace(
            self,
            peak_window=None,
            cycles=list(self.cycles),
            top_signals=list(self.top_signals),
            map_points=[],
        )

    def add_cycle(self, cycle: int) -> None:
        if cycle in self.cycles[-8:]:
            return
        self.cycle_count += 1
        if len(self.cycles) < MAX_ALERT_CYCLES:
            self.cycles.append(cycle)


@dataclass(frozen=True)
class AlertEvent:
    """One step of an alert's life: it fired, it was updated (still firing), or it resolved."""

    alert: Alert  # the live alert (the pipeline localizes its peak window)
    state: State
    time_ns: int  # when (data time): the firing window, the update's window, the end
    kind: Literal["opened", "updated", "resolved"]
    view: Alert = field(repr=False)  # the alert as it was at this event

    @classmethod
    def of(cls, alert: Alert, kind: Literal["opened", "updated", "resolved"], time_ns: int) -> AlertEvent:
        state: State = "resolved" if kind == "resolved" else "firing"
        return cls(alert, state, time_ns, kind, alert.snapshot())


class AlertOptions(TypedDict, total=False):
    """The `alerts:` settings, as AlertTracker takes them."""

    k: int
    n: int
    min_duration_s: float
    cooldown_s: float
    update_interval_s: float


class AlertTracker:
    """Feed one robot's windows in time order with `update`; it returns the alert events they cause."""

    def __init__(
        self,
        robot: str,
        *,
        k: int = 1,
        n: int = 1,
        min_duration_s: float = 0.0,
        cooldown_s: float = 0.0,
        update_interval_s: float = 10.0,
    ):
        self.robot = robot
        self.recent: deque[tuple[int, bool]] = deque(maxlen=n)
        self.open: Alert | None = None
        self.excursion_start: int | None = None
        self.last_end: int | None = None
        self._last_event_ns = 0
        self.reconfigure(
            k=k,
            n=n,
            min_duration_s=min_duration_s,
            cooldown_s=cooldown_s,
            update_interval_s=update_interval_s,
        )

    def reconfigure(
        self, *, k: int, n: int, min_duration_s: float, cooldown_s: float, update_interval_s: float = 10.0
    ) -> None:
        """New settings (config reload); the recent windows and an open alert are kept."""
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
        self.k, self.n = k, n
        self.min_duration_ns = int(min_duration_s * 1e9)
        self.cooldown_ns = int(cooldown_s * 1e9)
        self.update_interval_ns = int(update_interval_s * 1e9)
        self.recent = deque(self.recent, maxlen=n)

    def update(
        self, time_ns: int, normalized: float, over: bool, cycle: int, window: Any = None
    ) -> list[AlertEvent]:
        self.recent.append((time_ns, over))
        count = sum(flag for _, flag in self.recent)
        if count >= self.k:  # an excursion: k of n over, from the first over-threshold window counted
            if self.excursion_start is None:
                self.excursion_start = min(t for t, flag in self.recent if flag)
        else:
            self.excursion_start = None
        alert = self.open
        if alert is not None:
            alert.windows += 1
            alert.last_ns = time_ns
            if over:
                alert.add_cycle(cycle)
            if normalized > alert.peak_score:
                alert.peak_score, alert.peak_time_ns, alert.peak_cycle = normalized, time_ns, cycle
                alert.peak_window = window
            if count == 0:
                return [self._resolve(time_ns)]
            return self._maybe_update(time_ns)
        cooling = self.last_end is not None and time_ns - self.last_end < self.cooldown_ns
        lasted = self.excursion_start is not None and time_ns - self.excursion_start >= self.min_duration_ns
        if over and count >= self.k and lasted and not cooling:
            self.open = alert = Alert(
                robot=self.robot,
                start_ns=self.excursion_start if self.excursion_start is not None else time_ns,
                peak_score=normalized,
                peak_time_ns=time_ns,
                peak_cycle=cycle,
                peak_window=window,
                last_ns=time_ns,
                windows=1,
            )
            alert.add_cycle(cycle)
            self._last_event_ns = time_ns
            return [AlertEvent.of(alert, "opened", time_ns)]
        return []

    def _maybe_update(self, time_ns: int) -> list[AlertEvent]:
        """An update of the open alert (peak, cycles and windows so far), at most one per
        `update_interval_s` of data time since its last event."""
        alert = self.open
        assert alert is not None
        if time_ns - self._last_event_ns < self.update_interval_ns:
            return []
        self._last_event_ns = time_ns
        return [AlertEvent.of(alert, "updated", time_ns)]

    def _resolve(self, time_ns: int) -> AlertEvent:
        alert = self.open
        assert alert is not None
        alert.end_ns = time_ns
        self.last_end = time_ns
        self.open = None
        return AlertEvent.of(alert, "resolved", time_ns)

    def finish(self, time_ns: int) -> list[AlertEvent]:
        """Resolve an alert still open when the stream ends (shutdown, end of a replay, an idle robot)."""
        if self.open is None:
            return []
        return [self._resolve(max(time_ns, self.open.last_ns))]
