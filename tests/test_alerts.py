"""Alert hysteresis: k of n, minimum duration, cooldown, and no flapping at the threshold."""

from __future__ import annotations

import pytest

from daemon.alerts import AlertTracker

S = 1_000_000_000  # one window per second below


def feed(
    tracker: AlertTracker, flags: str, scores: list[float] | None = None
) -> list[tuple[int, int, float]]:
    """Feed '1'/'0' flags one per second; return closed alerts as (start s, end s, peak)."""
    out = []
    for i, flag in enumerate(flags):
        score = scores[i] if scores else (2.0 if flag == "1" else 0.1)
        for alert in tracker.update(i * S, score, flag == "1", cycle=i):
            out.append((alert.start_ns // S, alert.end_ns // S, alert.peak_score))
    for alert in tracker.finish(len(flags) * S):
        out.append((alert.start_ns // S, alert.end_ns // S, alert.peak_score))
    return out


def test_every_window_over_threshold_alerts_with_k1_n1() -> None:
    assert [a[:2] for a in feed(AlertTracker("r"), "0110010")] == [(1, 3), (5, 6)]


def test_k_of_n_ignores_isolated_spikes() -> None:
    tracker = AlertTracker("r", k=2, n=3)
    # single spikes never open; two of three do, from the first window of the excursion
    assert [a[:2] for a in feed(tracker, "0100010011000")] == [(8, 12)]


def test_hysteresis_keeps_one_alert_across_dips() -> None:
    tracker = AlertTracker("r", k=2, n=3)
    # opens at 1-2; the dips at 4 and 6 do not close it (a recent window is still over)
    assert [a[:2] for a in feed(tracker, "01101010000")] == [(1, 9)]  # closes once 3 in a row are below


def test_minimum_duration_and_cooldown() -> None:
    longer = AlertTracker("r", min_duration_s=2)
    assert [a[:2] for a in feed(longer, "0110111100")] == [(4, 8)]  # the 2-window blip is too short
    cooled = AlertTracker("r", cooldown_s=3)
    assert [a[:2] for a in feed(cooled, "1101101100")] == [(0, 2), (6, 8)]  # 3..4 is within the cooldown


def test_peak_is_tracked() -> None:
    tracker = AlertTracker("r")
    tracker.update(0, 1.5, True, cycle=7, window="w7")
    tracker.update(1, 3.0, True, cycle=8, window="w8")
    tracker.update(2, 2.0, True, cycle=9, window="w9")
    (alert,) = tracker.update(3, 0.2, False, cycle=10)
    assert (alert.peak_score, alert.peak_cycle, alert.peak_window) == (3.0, 8, "w8")
    assert alert.cycles == [7, 8, 9]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="k <= n"):
        AlertTracker("r", k=3, n=2)
