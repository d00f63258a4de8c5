"""Alerts from scored windows: a threshold with hysteresis, per robot.

An alert opens when at least `k` of the last `n` windows are over the threshold and have been for
`min_duration_s` (counted from the first over-threshold window among them), and the robot is not in
its `cooldown_s` after the previous alert. Times are window end times (when a score is known). It closes
when none of the last `n` windows is over the threshold (so it does not flap at the threshold). Each
alert carries its peak (normalized) score and the window that peaked, which the pipeline localizes to
give the event time (thesis Eq. 8.6) and the top contributing signals.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Alert:
    robot: str
    start_ns: int
    peak_score: float
    peak_time_ns: int
    peak_cycle: int
    peak_window: Any = field(default=None, repr=False)  # what the pipeline needs to localize the peak
    end_ns: int | None = None
    windows: int = 0
    cycles: list[int] = field(default_factory=list)
    event_time_ns: int | None = None
    event_in_window_s: float | None = None  # where in the peak window the localization peaks
    top_signals: list[tuple[str, float]] = field(default_factory=list)


class AlertTracker:
    """Feed one robot's windows in time order with `update`; it returns alerts as they close."""

    def __init__(
        self, robot: str, *, k: int = 1, n: int = 1, min_duration_s: float = 0.0, cooldown_s: float = 0.0
    ):
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
        self.robot = robot
        self.k, self.n = k, n
        self.min_duration_ns = int(min_duration_s * 1e9)
        self.cooldown_ns = int(cooldown_s * 1e9)
        self.recent: deque[tuple[int, bool]] = deque(maxlen=n)
        self.open: Alert | None = None
        self.excursion_start: int | None = None
        self.last_end: int | None = None

    def reconfigure(self, *, k: int, n: int, min_duration_s: float, cooldown_s: float) -> None:
        """New settings (config reload); the recent windows and an open alert are kept."""
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
        self.k, self.n = k, n
        self.min_duration_ns = int(min_duration_s * 1e9)
        self.cooldown_ns = int(cooldown_s * 1e9)
        self.recent = deque(self.recent, maxlen=n)

    def update(
        self, time_ns: int, normalized: float, over: bool, cycle: int, window: Any = None
    ) -> list[Alert]:
        self.recent.append((time_ns, over))
        count = sum(flag for _, flag in self.recent)
        closed: list[Alert] = []
        if count >= self.k:  # an excursion: k of n over, from the first over-threshold window counted
            if self.excursion_start is None:
                self.excursion_start = min(t for t, flag in self.recent if flag)
        else:
            self.excursion_start = None
        alert = self.open
        if alert is not None:
            alert.windows += 1
            if over and cycle not in alert.cycles:
                alert.cycles.append(cycle)
            if normalized > alert.peak_score:
                alert.peak_score, alert.peak_time_ns, alert.peak_cycle = normalized, time_ns, cycle
                alert.peak_window = window
            if count == 0:
                alert.end_ns = time_ns
                self.last_end = time_ns
                self.open = None
                closed.append(alert)
            return closed
        cooling = self.last_end is not None and time_ns - self.last_end < self.cooldown_ns
        lasted = self.excursion_start is not None and time_ns - self.excursion_start >= self.min_duration_ns
        if over and count >= self.k and lasted and not cooling:
            self.open = Alert(
                robot=self.robot,
                start_ns=self.excursion_start if self.excursion_start is not None else time_ns,
                peak_score=normalized,
                peak_time_ns=time_ns,
                peak_cycle=cycle,
                peak_window=window,
                windows=1,
                cycles=[cycle],
            )
        return closed

    def finish(self, time_ns: int) -> list[Alert]:
        """Close an alert still open when the stream ends (shutdown, end of a replay)."""
        if self.open is None:
            return []
        alert, self.open = self.open, None
        alert.end_ns = time_ns
        self.last_end = time_ns
        return [alert]
