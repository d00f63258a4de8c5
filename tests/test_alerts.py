"""Alert hysteresis (k of n, minimum duration, cooldown, no flapping at the threshold) and the alert
lifecycle: firing at once, rate-limited updates while it lasts, resolved when it ends."""

from __future__ import annotations

import pytest

from daemon.alerts import AlertTracker, alert_id

S = 1_000_000_000  # one window per second below


def feed(
    tracker: AlertTracker, flags: str, scores: list[float] | None = None
) -> list[tuple[int, int, float]]:
    """Feed '1'/'0' flags one per second; return resolved alerts as (start s, end s, peak)."""
    out = []
    events = []
    for i, flag in enumerate(flags):
        score = scores[i] if scores else (2.0 if flag == "1" else 0.1)
        events += tracker.update(i * S, score, flag == "1", cycle=i)
    events += tracker.finish(len(flags) * S)
    for event in events:
        if event.state == "resolved":
            alert = event.alert
            assert alert.end_ns is not None
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
    (event,) = tracker.update(3, 0.2, False, cycle=10)
    alert = event.alert
    assert event.state == "resolved"
    assert (alert.peak_score, alert.peak_cycle, alert.peak_window) == (3.0, 8, "w8")
    assert alert.cycles == [7, 8, 9]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="k <= n"):
        AlertTracker("r", k=3, n=2)


def test_an_alert_fires_when_it_opens_and_updates_while_it_lasts() -> None:
    """A fault that persists (every window over) is reported at once, not only when it ends."""
    tracker = AlertTracker("r", k=2, n=3, update_interval_s=5)
    events = []
    for i in range(30):  # 30 s, over the threshold from second 3 on, never resolved
        for event in tracker.update(i * S, 1.0 + i / 10 if i >= 3 else 0.2, i >= 3, cycle=i):
            events.append((i, event.kind, event.state, event.alert.peak_score))
    opened = [e for e in events if e[1] == "opened"]
    assert opened == [(4, "opened", "firing", pytest.approx(1.4))]  # the 2nd of 2-of-3: one window late
    updates = [e[0] for e in events if e[1] == "updated"]
    assert updates == [9, 14, 19, 24, 29]  # every 5 s of data time, no more often
    assert all(state == "firing" for _, _, state, _ in events)
    assert events[-1][3] == pytest.approx(3.9)  # the latest update carries the peak so far
    (end,) = tracker.finish(30 * S)
    assert (end.state, end.alert.end_ns, end.alert.windows) == ("resolved", 30 * S, 26)


def test_alert_ids_are_stable_and_distinct() -> None:
    """The same data gives the same id (a replay overwrites, never duplicates); two alerts differ."""
    first = [e.alert.id for e in AlertTracker("r").update(5 * S, 2.0, True, cycle=5)]
    again = [e.alert.id for e in AlertTracker("r").update(5 * S, 2.0, True, cycle=5)]
    assert first == again == [alert_id("r", 5 * S)]
    tracker = AlertTracker("r")
    ids = {e.alert.id for i, f in enumerate("1101") for e in tracker.update(i * S, 2.0, f == "1", cycle=i)}
    assert len(ids) == 2
    assert alert_id("r", 1) != alert_id("s", 1)


def test_each_event_shows_the_alert_as_it_was_then() -> None:
    """Opened and resolved in one batch: the opening event still says firing, with the peak it had."""
    tracker = AlertTracker("r")
    (opened,) = tracker.update(0, 2.0, True, cycle=1)
    tracker.update(1 * S, 5.0, True, cycle=2)
    (resolved,) = tracker.update(2 * S, 0.1, False, cycle=3)
    assert opened.alert is resolved.alert  # one live alert ...
    assert (opened.view.state, opened.view.peak_score, opened.view.end_ns) == ("firing", 2.0, None)
    assert (resolved.view.state, resolved.view.peak_score, resolved.view.end_ns) == ("resolved", 5.0, 2 * S)
