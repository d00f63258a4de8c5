"""StreamWindower: message batches of one robot in, windows out, each message's ack held until no future
window needs its rows (at-least-once delivery of Kafka offsets and MQTT PUBACKs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from daemon.windowing import StreamRejected, StreamWindower, Window
from ingest.messages import SignalBatch, batches_from_cycle

ROBOT = "r1"
S = 3
P = 10_000_000  # 10 ms raw period
T0 = 1_700_000_000_000_000_000  # a multiple of P
BASE = T0 // P  # absolute raw index of T0
COLUMN = np.array([0, 1000, 2000], dtype=np.float32)


class Ack:
    """A counting ack callback with a name (which message it belongs to)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1

    def __repr__(self) -> str:
        return f"Ack({self.name!r}, calls={self.calls})"


def rows(n: int, first: int = 0) -> np.ndarray:
    """(n, S) float32 rows whose column 0 holds first, first + 1, ... (column j adds 1000 * j)."""
    return np.arange(first, first + n, dtype=np.float32)[:, None] + COLUMN


def release(windows: list[Window]) -> None:
    """What the pipeline does once the sinks accepted the windows' points."""
    for window in windows:
        for ack in window.acks:
            ack()


def names(window: Window) -> list[str]:
    return [ack.name if isinstance(ack, Ack) else repr(ack) for ack in window.acks]


@dataclass
class Run:
    """Messages pushed through one windower as the pipeline does it, with per-message outcomes."""

    windower: StreamWindower
    acks: list[Ack] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)  # None: accepted, else the rejection reason
    windows: list[Window] = field(default_factory=list)
    emitted_by: list[int] = field(default_factory=list)  # per window: the message whose push emitted it
    released: set[str] = field(default_factory=set)

    def push(self, batch: SignalBatch, name: str | None = None, *, release_acks: bool = True) -> None:
        ack = Ack(name or f"m{len(self.acks)}")
        self.acks.append(ack)
        try:
            windows = self.windower.push(batch, ack)
        except StreamRejected as err:
            self.reasons.append(err.reason)
            return
        self.reasons.append(None)
        self._check_unreleased()
        self.windows += windows
        self.emitted_by += [len(self.acks) - 1] * len(windows)
        if release_acks:
            self.release(windows)

    def feed(self, batches: list[SignalBatch]) -> Run:
        for batch in batches:
            self.push(batch)
        return self

    def flush(self) -> list[Window]:
        windows = self.windower.flush()
        self._check_unreleased()
        self.windows += windows
        self.emitted_by += [-1] * len(windows)
        self.release(windows)
        return windows

    def release(self, windows: list[Window]) -> None:
        for window in windows:
            self.released.update(names(window))
        release(windows)

    def _check_unreleased(self) -> None:
        # an accepted message's ack is called by nobody but the pipeline, after its window was emitted
        for ack, reason in zip(self.acks, self.reasons, strict=True):
            if reason is None and ack.name not in self.released:
                assert ack.calls == 0, f"{ack} was called before any window carrying it was emitted"

    def calls(self) -> list[int]:
        return [ack.calls for ack in self.acks]


def cycle_windower(divider: int = 1, **kw: int) -> StreamWindower:
    return StreamWindower(ROBOT, mode="cycle", period_ns=P, divider=divider, **kw)


def cycle_stream(
    lengths: list[int], rows_per_message: int, *, cycle_end: bool = True, first_cycle: int = 1
) -> tuple[list[SignalBatch], list[np.ndarray]]:
    """Consecutive cycles (numbered from first_cycle) of the given lengths, split into messages; the
    rows' values count up across the whole stream. Returns the messages and each cycle's rows."""
    batches: list[SignalBatch] = []
    data: list[np.ndarray] = []
    start, value = T0, 0
    for k, n in enumerate(lengths):
        signals = rows(n, value)
        part = batches_from_cycle(
            ROBOT,
            signals,
            start_ns=start,
            period_ns=P,
            cycle=first_cycle + k,
            rows_per_message=rows_per_message,
        )
        if not cycle_end:
            part = [replace(b, cycle_end=False) for b in part]
        batches += part
        data.append(signals)
        start += n * P
        value += n
    return batches, data


# -- cycle mode: content --------------------------------------------------------------------------------


@pytest.mark.parametrize(("divider", "rows_per_message"), [(1, 4), (2, 3), (3, 4), (3, 1), (2, 10)])
def test_cycle_split_over_messages_is_one_window_of_the_downsampled_rows(
    divider: int, rows_per_message: int
) -> None:
    batches, (data,) = cycle_stream([10], rows_per_message, first_cycle=42)
    run = Run(cycle_windower(divider)).feed(batches)

    assert run.reasons == [None] * len(batches)
    assert len(run.windows) == 1
    assert run.emitted_by == [len(batches) - 1]  # completed by the message with cycle_end, not before
    (window,) = run.windows
    assert window.robot == ROBOT
    assert window.cycle == 42
    assert window.time_ns == T0 + 9 * P  # the last raw sample's timestamp
    # downsampled after concatenation (messages of 3 rows with divider 2 would differ if done per message)
    np.testing.assert_array_equal(window.signals, data[::divider])
    assert window.signals.dtype == np.float32
    assert window.signals.shape == (len(range(0, 10, divider)), S)


def test_cycle_without_cycle_end_is_completed_by_the_next_cycles_first_message() -> None:
    batches, data = cycle_stream([7, 5, 6], 3, cycle_end=False, first_cycle=8)
    run = Run(cycle_windower(2)).feed(batches)

    assert run.reasons == [None] * len(batches)
    # cycle 8: messages 0-2, cycle 9: messages 3-4, cycle 10: messages 5-6 (still open)
    assert [w.cycle for w in run.windows] == [8, 9]
    assert run.emitted_by == [3, 5]  # each by the next cycle's first message
    np.testing.assert_array_equal(run.windows[0].signals, data[0][::2])
    np.testing.assert_array_equal(run.windows[1].signals, data[1][::2])
    # the time of the completed cycle's last sample, not that of the message that completed it
    assert run.windows[0].time_ns == T0 + 6 * P
    assert run.windows[1].time_ns == T0 + 11 * P

    (last,) = run.flush()  # the open cycle is emitted at the end of the stream
    assert last.cycle == 10
    assert last.time_ns == T0 + 17 * P
    np.testing.assert_array_equal(last.signals, data[2][::2])
    assert run.windower.flush() == []  # and only once


def test_flush_emits_the_open_cycle_with_its_acks_and_nothing_in_window_mode() -> None:
    batches, (data,) = cycle_stream([5], 2, cycle_end=False, first_cycle=3)
    run = Run(cycle_windower()).feed(batches)
    assert run.windows == []
    assert run.calls() == [0, 0, 0]

    (window,) = run.flush()
    assert window.cycle == 3
    assert window.time_ns == T0 + 4 * P
    np.testing.assert_array_equal(window.signals, data)
    assert names(window) == ["m0", "m1", "m2"]
    assert run.calls() == [1, 1, 1]
    assert run.windower.flush() == []

    windowed = StreamWindower(ROBOT, mode="window", period_ns=P, window=4, hop=2)
    windowed.push(SignalBatch(ROBOT, T0, P, rows(3)), Ack("w"))
    assert windowed.flush() == []


# -- cycle mode: acks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cycle_end", [True, False])
def test_cycle_acks_are_released_with_their_cycles_window_exactly_once(cycle_end: bool) -> None:
    batches, _ = cycle_stream([5, 3, 6, 2], 2, cycle_end=cycle_end)
    run = Run(cycle_windower(2)).feed(batches)  # Run checks no ack is called before its window exists
    run.flush()

    # messages per cycle: 3, 2, 3, 1
    assert [w.cycle for w in run.windows] == [1, 2, 3, 4]
    assert [names(w) for w in run.windows] == [
        ["m0", "m1", "m2"],
        ["m3", "m4"],
        ["m5", "m6", "m7"],
        ["m8"],
    ]
    assert run.calls() == [1] * len(batches)


def test_cycle_acks_are_not_called_by_push() -> None:
    batches, _ = cycle_stream([4], 2)
    windower = cycle_windower()
    acks = [Ack("a"), Ack("b")]
    assert windower.push(batches[0], acks[0]) == []
    (window,) = windower.push(batches[1], acks[1])
    assert [a.calls for a in acks] == [0, 0]  # the pipeline calls them, after the sinks took the point
    assert window.acks == acks


def test_wrong_rate_is_rejected_and_acked_at_once() -> None:
    batches, (data,) = cycle_stream([4], 2)
    run = Run(cycle_windower())
    run.push(batches[0])
    run.push(replace(batches[1], period_ns=2 * P), "wrong")
    run.push(batches[1])

    assert run.reasons == [None, "wrong_rate", None]
    assert run.acks[1].calls == 1  # it can never be scored: holding it would block commits for good
    (window,) = run.windows
    np.testing.assert_array_equal(window.signals, data)
    assert names(window) == ["m0", "m2"]
    assert run.calls() == [1, 1, 1]


def test_a_period_within_one_percent_is_accepted() -> None:
    windower = cycle_windower()
    batch = SignalBatch(ROBOT, T0, P + P // 100, rows(2), cycle=1, cycle_end=True, cycle_row=0)
    assert len(windower.push(batch, None)) == 1


def test_missing_cycle_marker_is_rejected_and_acked_at_once() -> None:
    run = Run(cycle_windower())
    run.push(SignalBatch(ROBOT, T0, P, rows(3)))
    assert run.reasons == ["missing_cycle"]
    assert run.calls() == [1]


def test_out_of_order_rows_are_rejected_and_acked_at_once() -> None:
    batches, (data,) = cycle_stream([6], 3)
    run = Run(cycle_windower())
    run.push(batches[0])  # rows 0-2, held
    # overlaps the held rows, but is not the same message
    run.push(SignalBatch(ROBOT, T0 + P, P, rows(3, 1), cycle=1, cycle_row=1), "overlap")
    assert run.reasons == [None, "out_of_order"]
    assert run.calls() == [0, 1]

    run.push(batches[1])
    (window,) = run.windows
    np.testing.assert_array_equal(window.signals, data)
    assert names(window) == ["m0", "m2"]
    assert run.calls() == [1, 1, 1]


# -- redelivery -----------------------------------------------------------------------------------------


def test_a_redelivered_held_message_takes_over_the_originals_ack() -> None:
    batches, (data,) = cycle_stream([9], 3)
    run = Run(cycle_windower())
    run.push(batches[0], "first")
    run.push(batches[1], "second")
    run.push(batches[0], "first-again")  # a reconnect: the broker sends it again
    run.push(batches[1], "second-again")
    run.push(batches[2], "third")

    assert run.reasons == [None] * 5
    (window,) = run.windows
    np.testing.assert_array_equal(window.signals, data)  # the rows are not taken twice
    assert sorted(names(window)) == ["first-again", "second-again", "third"]
    # the originals' acks belong to a dead connection: never called
    assert run.calls() == [0, 0, 1, 1, 1]


def test_a_redelivered_message_older_than_anything_held_is_released_with_the_next_window() -> None:
    """A duplicate was scored, but its window may still be on its way to the sinks: its ack rides
    with the robot's next window (written after that one), never before."""
    batches, data = cycle_stream([4, 4, 4], 2)
    run = Run(cycle_windower())
    run.feed(batches[:2])  # cycle 1 emitted
    run.push(batches[0], "old")  # nothing held
    assert run.reasons[-1] == "duplicate"
    assert run.acks[-1].calls == 0

    run.push(batches[2])  # cycle 2 half held
    run.push(batches[1], "old-again")  # older than everything held
    assert run.reasons[-1] == "duplicate"
    assert run.acks[-1].calls == 0

    run.push(batches[3])
    assert [w.cycle for w in run.windows] == [1, 2]
    np.testing.assert_array_equal(run.windows[1].signals, data[1])
    assert sorted(names(run.windows[1])) == ["m3", "m5", "old", "old-again"]
    assert run.calls() == [1] * 6
    run.feed(batches[4:])
    assert run.calls() == [1] * 8


def test_redelivery_in_window_mode_takes_over_the_ack() -> None:
    run = Run(StreamWindower(ROBOT, mode="window", period_ns=P, window=4, hop=4))
    first = SignalBatch(ROBOT, T0, P, rows(2))
    run.push(first, "first")
    run.push(first, "again")
    run.push(SignalBatch(ROBOT, T0 + 2 * P, P, rows(2, 2)), "next")
    assert run.reasons == [None, None, None]
    (window,) = run.windows
    np.testing.assert_array_equal(window.signals, rows(4))
    assert names(window) == ["again", "next"]
    assert run.calls() == [0, 1, 1]


# -- partial and over-long cycles ---------------------------------------------------------------------


def test_resuming_inside_a_cycle_skips_it_and_releases_its_acks_with_the_next_window() -> None:
    batches, data = cycle_stream([8, 6], 2, first_cycle=5)  # cycle 5: messages 0-3, cycle 6: 4-6
    run = Run(cycle_windower()).feed(batches[1:4])  # the daemon resumes at cycle 5's second message
    assert run.reasons == ["partial_cycle", "skipped_cycle", "skipped_cycle"]
    assert run.calls() == [0, 0, 0]  # not released before a later window is written
    assert run.windows == []

    run.feed(batches[4:])
    assert run.reasons[3:] == [None, None, None]
    (window,) = run.windows  # no truncated cycle 5
    assert window.cycle == 6
    np.testing.assert_array_equal(window.signals, data[1])
    assert window.time_ns == T0 + 13 * P
    assert names(window) == ["m0", "m1", "m2", "m3", "m4", "m5"]  # the skipped ones too
    assert run.calls() == [1] * 6


def test_skipped_messages_are_released_with_the_next_window_even_without_cycle_end() -> None:
    batches, data = cycle_stream([6, 4, 4], 2, cycle_end=False, first_cycle=1)
    run = Run(cycle_windower()).feed(batches[2:])  # resumes inside cycle 1
    assert run.reasons == ["partial_cycle", None, None, None, None]
    assert [w.cycle for w in run.windows] == [2]  # completed by cycle 3's first message
    np.testing.assert_array_equal(run.windows[0].signals, data[1])
    assert names(run.windows[0]) == ["m0", "m1", "m2"]
    assert run.calls() == [1, 1, 1, 0, 0]


def test_a_lost_message_inside_a_cycle_skips_the_rest_of_that_cycle() -> None:
    batches, data = cycle_stream([8, 4], 2)
    run = Run(cycle_windower()).feed([b for i, b in enumerate(batches) if i != 1])
    assert run.reasons == [None, "partial_cycle", "skipped_cycle", None, None]
    assert [w.cycle for w in run.windows] == [2]
    np.testing.assert_array_equal(run.windows[0].signals, data[1])
    assert names(run.windows[0]) == ["m0", "m1", "m2", "m3", "m4"]
    assert run.calls() == [1] * 5


def test_a_partial_cycle_after_an_open_cycle_does_not_lose_the_open_cycle() -> None:
    # cycle 1 is open (no cycle_end yet) when the next message belongs to a cycle 2 whose start is lost
    batches, data = cycle_stream([6, 6, 4], 2, cycle_end=False)  # cycle 1: 0-2, cycle 2: 3-5, cycle 3: 6-7
    run = Run(cycle_windower()).feed(batches[:3] + batches[4:])
    run.flush()

    assert run.reasons == [None, None, None, "partial_cycle", "skipped_cycle", None, None]
    # cycle 1 was complete when cycle 2 began: it must be scored, and its acks released (else a Kafka
    # partition's commits stay stuck before its first offset for good)
    assert [w.cycle for w in run.windows] == [1, 3]
    np.testing.assert_array_equal(run.windows[0].signals, data[0])
    np.testing.assert_array_equal(run.windows[1].signals, data[2])
    assert names(run.windows[0]) == ["m0", "m1", "m2"]
    assert names(run.windows[1]) == ["m3", "m4", "m5", "m6"]
    assert run.calls() == [1] * 7


def test_a_cycle_too_long_after_an_open_cycle_does_not_lose_the_open_cycle() -> None:
    windower = cycle_windower(max_cycle_rows=4)
    run = Run(windower)
    run.push(SignalBatch(ROBOT, T0, P, rows(3), cycle=1, cycle_row=0))
    run.push(SignalBatch(ROBOT, T0 + 3 * P, P, rows(5, 3), cycle=2, cycle_row=0))  # alone over the limit
    run.push(SignalBatch(ROBOT, T0 + 8 * P, P, rows(2, 8), cycle=3, cycle_row=0, cycle_end=True))
    assert run.reasons == [None, "cycle_too_long", None]
    assert [w.cycle for w in run.windows] == [1, 3]
    np.testing.assert_array_equal(run.windows[0].signals, rows(3))
    assert run.calls() == [1, 1, 1]


def test_a_cycle_longer_than_the_bound_is_skipped() -> None:
    batches, data = cycle_stream([16, 10, 4], 4)  # cycle 1: 0-3, cycle 2: 4-6, cycle 3: 7
    run = Run(cycle_windower(max_cycle_rows=10)).feed(batches)

    assert run.reasons == [None, None, "cycle_too_long", "skipped_cycle", None, None, None, None]
    assert [w.cycle for w in run.windows] == [2, 3]  # exactly max_cycle_rows is fine
    np.testing.assert_array_equal(run.windows[0].signals, data[1])
    np.testing.assert_array_equal(run.windows[1].signals, data[2])
    assert names(run.windows[0]) == ["m0", "m1", "m2", "m3", "m4", "m5", "m6"]
    assert run.calls() == [1] * 8


# -- window mode ----------------------------------------------------------------------------------------

SIZES = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]


def window_stream(first: int, sizes: list[int], offset_ns: int = 0) -> list[SignalBatch]:
    """Contiguous messages from absolute raw index BASE + first; row values = index - BASE."""
    out = []
    for n in sizes:
        out.append(SignalBatch(ROBOT, (BASE + first) * P + offset_ns, P, rows(n, first)))
        first += n
    return out


def expected_windows(first: int, last: int, *, window: int, hop: int, divider: int) -> dict[int, np.ndarray]:
    """time_ns -> rows of every window within contiguous raw rows BASE + first .. BASE + last."""
    out = {}
    for end in range(-(-(BASE + first) // divider), (BASE + last) // divider + 1):
        begin = end - window + 1
        if (end + 1) % hop == 0 and begin * divider >= BASE + first:
            raw = np.arange(begin, end + 1) * divider - BASE
            out[end * divider * P] = raw[:, None].astype(np.float32) + COLUMN
    return out


def by_time(windows: list[Window]) -> dict[int, np.ndarray]:
    out = {w.time_ns: w.signals for w in windows}
    assert len(out) == len(windows), "two windows with the same time"
    return out


def assert_same_windows(actual: dict[int, np.ndarray], expected: dict[int, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for t, signals in expected.items():
        np.testing.assert_array_equal(actual[t], signals, err_msg=f"window at {t}")
        assert actual[t].dtype == np.float32


WINDOW_SHAPES = [(4, 2, 1), (5, 3, 3), (3, 3, 2), (2, 5, 1), (6, 1, 2), (1, 2, 3)]  # window, hop, divider


def window_windower(window: int, hop: int, divider: int) -> StreamWindower:
    return StreamWindower(ROBOT, mode="window", period_ns=P, divider=divider, window=window, hop=hop)


@pytest.mark.parametrize(("window", "hop", "divider"), WINDOW_SHAPES)
def test_window_ends_are_aligned_to_the_absolute_index_and_hold_the_stream_rows(
    window: int, hop: int, divider: int
) -> None:
    batches = window_stream(1, SIZES)
    run = Run(window_windower(window, hop, divider)).feed(batches)
    assert run.reasons == [None] * len(batches)
    assert len(run.windows) > 3
    last = 1 + sum(SIZES) - 1
    assert_same_windows(
        by_time(run.windows), expected_windows(1, last, window=window, hop=hop, divider=divider)
    )
    for w in run.windows:
        absolute = w.time_ns // P // divider
        assert (absolute + 1) % hop == 0
        assert w.signals.shape == (window, S)
    assert [w.time_ns for w in run.windows] == sorted(w.time_ns for w in run.windows)


@pytest.mark.parametrize(("window", "hop", "divider"), WINDOW_SHAPES)
@pytest.mark.parametrize("restart_at", [1, 2, 5, 9])
def test_a_restarted_windower_cuts_the_same_windows(
    window: int, hop: int, divider: int, restart_at: int
) -> None:
    batches = window_stream(1, SIZES)
    full = by_time(Run(window_windower(window, hop, divider)).feed(batches).windows)
    restarted = by_time(Run(window_windower(window, hop, divider)).feed(batches[restart_at:]).windows)
    assert restarted
    for t, signals in restarted.items():
        assert t in full
        np.testing.assert_array_equal(signals, full[t])
    # and it misses none that lie entirely in what it received
    first = 1 + sum(SIZES[:restart_at])
    assert sorted(restarted) == [
        t for t in sorted(full) if t - (window - 1) * divider * P >= (BASE + first) * P
    ]


@pytest.mark.parametrize(("window", "hop", "divider"), WINDOW_SHAPES)
@pytest.mark.parametrize("offset_ns", [1, -1, 3, -3, P // 2 - 1, -(P // 2 - 1), P // 2, -(P // 2)])
def test_timestamps_off_the_period_grid_are_cut_as_on_it(
    window: int, hop: int, divider: int, offset_ns: int
) -> None:
    """A producer clock's epoch is arbitrary: each row belongs to its nearest grid index (exactly half a
    period off: the later one, for every row alike), and no gap is seen in a contiguous stream."""
    shift = 1 if offset_ns == P // 2 else 0
    run = Run(window_windower(window, hop, divider)).feed(window_stream(1, SIZES, offset_ns))
    last = 1 + sum(SIZES) - 1
    expected = expected_windows(1 + shift, last + shift, window=window, hop=hop, divider=divider)
    assert_same_windows(by_time(run.windows), {t: signals - shift for t, signals in expected.items()})


@pytest.mark.parametrize(("window", "hop", "divider"), WINDOW_SHAPES)
def test_no_window_spans_a_gap(window: int, hop: int, divider: int) -> None:
    before = window_stream(1, SIZES[:8])  # raw 1..31
    after = window_stream(40, SIZES[8:])  # raw 40..
    run = Run(window_windower(window, hop, divider)).feed(before + after)
    assert run.reasons == [None] * len(before + after)
    expected = expected_windows(1, 31, window=window, hop=hop, divider=divider)
    expected |= expected_windows(40, 40 + sum(SIZES[8:]) - 1, window=window, hop=hop, divider=divider)
    assert_same_windows(by_time(run.windows), expected)


def test_a_gap_shorter_than_the_divider_between_model_rate_rows_is_no_gap() -> None:
    # divider 4: the model keeps raw indices divisible by 4; raw row BASE+3 is missing, but it is not
    # on the model's grid (BASE is divisible by 4)
    batches = [SignalBatch(ROBOT, T0, P, rows(3, 0)), SignalBatch(ROBOT, T0 + 4 * P, P, rows(13, 4))]
    run = Run(window_windower(4, 4, 4)).feed(batches)
    (window,) = run.windows
    np.testing.assert_array_equal(window.signals, rows(4, 0)[:, :1] * 4 + COLUMN)


@pytest.mark.parametrize(("window", "hop", "divider"), WINDOW_SHAPES)
@pytest.mark.parametrize("offset_ns", [0, 3, -3, P // 2 - 1, -(P // 2) + 1])
def test_window_acks_are_released_once_no_future_window_needs_the_rows(
    window: int, hop: int, divider: int, offset_ns: int
) -> None:
    """offset_ns: timestamps off the period grid (a producer clock's epoch is arbitrary)."""
    batches = window_stream(1, SIZES, offset_ns)
    run = Run(window_windower(window, hop, divider)).feed(batches)
    assert run.windows
    first_raw = [1 + sum(SIZES[:i]) for i in range(len(SIZES))]  # raw index - BASE of each message
    last_raw = [f + n - 1 for f, n in zip(first_raw, SIZES, strict=True)]

    def begin_raw(w: Window) -> int:  # raw index - BASE of the window's first row
        return w.time_ns // P - (window - 1) * divider - BASE

    released_at: dict[str, int] = {}
    for pos, w in enumerate(run.windows):
        for name in names(w):
            assert name not in released_at, f"{name} released twice"
            released_at[name] = pos
    assert run.calls() == [1 if f"m{i}" in released_at else 0 for i in range(len(batches))]
    for i in range(len(batches)):
        k = released_at.get(f"m{i}")
        if k is not None:
            # safe: no later window (of the complete stream) holds any of its rows
            for later in run.windows[k + 1 :]:
                assert begin_raw(later) > last_raw[i], f"m{i} released before a window needing it"
            end = run.windows[k].time_ns // P - BASE
            next_begin = end + hop * divider - (window - 1) * divider  # raw index of the next window's start
            assert last_raw[i] < next_begin
        # not held longer than needed: released by the first window emitted once it arrived after
        # which no window needs it
        for j, w in enumerate(run.windows):
            if run.emitted_by[j] < i:
                continue
            end = w.time_ns // P - BASE
            if last_raw[i] < end + hop * divider - (window - 1) * divider:
                assert k is not None
                assert k <= j, f"m{i} held past window {j}"
                break


def test_window_mode_rejections_are_acked_at_once() -> None:
    run = Run(window_windower(4, 2, 1))
    run.push(SignalBatch(ROBOT, T0, P, rows(3)))
    run.push(SignalBatch(ROBOT, T0 + 3 * P, 2 * P, rows(3, 3)), "wrong_rate")
    run.push(SignalBatch(ROBOT, T0 + P, P, rows(3, 1)), "out_of_order")
    run.push(SignalBatch(ROBOT, T0 + 3 * P, P, rows(3, 3)))
    assert run.reasons == [None, "wrong_rate", "out_of_order", None]
    assert run.calls()[1:3] == [1, 1]
    assert_same_windows(by_time(run.windows), expected_windows(0, 5, window=4, hop=2, divider=1))
    assert run.windows[0].time_ns == T0 + 3 * P
    assert run.windows[1].time_ns == T0 + 5 * P


# -- the at-least-once property end to end: a crash after any message loses no window ---------------------


def check_crash_anywhere(
    make: Callable[[], StreamWindower], batches: list[SignalBatch], *, flush: bool
) -> None:
    """Crash after any message (everything the sinks accepted is acked); restart from the first
    unacked message (as a Kafka consumer group does): every window of an uninterrupted run is written
    by one of the two runs, with the same rows."""
    full = Run(make())
    full.feed(batches)
    if flush:
        full.flush()
    expected = {(w.cycle, w.time_ns): w.signals for w in full.windows}
    assert expected
    for crash in range(len(batches)):
        before = Run(make()).feed(batches[: crash + 1])
        calls = before.calls()
        assert all(c <= 1 for c in calls)
        resume = calls.index(0) if 0 in calls else len(calls)
        assert calls == [1] * resume + [0] * (len(calls) - resume), "acked messages are not a prefix"
        after = Run(make()).feed(batches[resume:])
        if flush:
            after.flush()
        written = {(w.cycle, w.time_ns): w.signals for w in before.windows + after.windows}
        for key, signals in expected.items():
            assert key in written, f"crash after m{crash}: window {key} lost"
            np.testing.assert_array_equal(written[key], signals)


@pytest.mark.parametrize(("window", "hop", "divider"), WINDOW_SHAPES)
@pytest.mark.parametrize("offset_ns", [0, -3, P // 2 - 1])
def test_window_mode_loses_no_window_on_a_crash(window: int, hop: int, divider: int, offset_ns: int) -> None:
    check_crash_anywhere(
        lambda: window_windower(window, hop, divider), window_stream(1, SIZES, offset_ns), flush=False
    )


@pytest.mark.parametrize("cycle_end", [True, False])
def test_cycle_mode_loses_no_cycle_on_a_crash(cycle_end: bool) -> None:
    batches, _ = cycle_stream([5, 3, 6, 2, 7], 2, cycle_end=cycle_end)
    check_crash_anywhere(lambda: cycle_windower(2), batches, flush=True)


# -- construction -----------------------------------------------------------------------------------------


def test_bad_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        StreamWindower(ROBOT, mode="sliding", period_ns=P)
    with pytest.raises(ValueError, match="window and hop"):
        StreamWindower(ROBOT, mode="window", period_ns=P, window=4)


# -- window mode on a stream that marks its cycles ---------------------------------------------------------


def training_windows(cycle: np.ndarray, window: int, hop: int, divider: int) -> list[np.ndarray]:
    """The windows the model was trained on for this cycle (flows.preprocess)."""
    from flows.preprocess import downsample, window_starts

    ds = downsample(cycle, divider)
    return [ds[s : s + window] for s in window_starts(len(ds), window, hop)]


@pytest.mark.parametrize(
    ("window", "hop", "divider", "rows_per_message"),
    [(4, 2, 1, 3), (5, 3, 2, 4), (3, 3, 3, 7), (6, 1, 1, 10)],
)
def test_marked_cycles_are_windowed_within_each_cycle_as_in_training(
    window: int, hop: int, divider: int, rows_per_message: int
) -> None:
    lengths = [23, 17, 30]
    # and one more cycle, whose first window releases the messages of the last cycle checked
    batches, data = cycle_stream([*lengths, window * divider], rows_per_message)
    run = Run(StreamWindower(ROBOT, mode="window", period_ns=P, divider=divider, window=window, hop=hop))
    run.feed(batches)
    expected = [
        (k + 1, w) for k, cycle in enumerate(data[:3]) for w in training_windows(cycle, window, hop, divider)
    ]
    checked = run.windows[: len(expected)]
    assert [w.cycle for w in checked] == [c for c, _ in expected]
    for got, (_, want) in zip(checked, expected, strict=True):
        np.testing.assert_array_equal(got.signals, want)  # never across a cycle boundary
        assert got.time_ns == T0 + int(got.signals[-1, 0]) * P  # stamped with its last row's time
    # every message of the three cycles released exactly once (Run checks: never before its windows)
    first_of_last = next(i for i, b in enumerate(batches) if b.cycle == 4)
    assert run.calls()[:first_of_last] == [1] * first_of_last


def test_cycle_aligned_windows_are_the_same_after_a_restart_mid_cycle() -> None:
    batches, _ = cycle_stream([40, 40], 6)
    full = Run(StreamWindower(ROBOT, mode="window", period_ns=P, window=8, hop=4)).feed(batches)
    resumed = Run(StreamWindower(ROBOT, mode="window", period_ns=P, window=8, hop=4)).feed(batches[3:])
    by_time = {w.time_ns: w for w in full.windows}
    assert resumed.windows
    for w in resumed.windows:
        np.testing.assert_array_equal(w.signals, by_time[w.time_ns].signals)
        assert w.cycle == by_time[w.time_ns].cycle
    # from the resume point on, nothing is missing in the second cycle
    assert {w.time_ns for w in resumed.windows if w.cycle == 2} == {
        w.time_ns for w in full.windows if w.cycle == 2
    }


# -- reload and idle robots -------------------------------------------------------------------------


def cycle_batch(first: int, n: int, cycle: int, *, end: bool = False, at: int = 0) -> SignalBatch:
    """Rows `first`.. of `cycle`, which starts `at` raw periods after T0."""
    time_ns = T0 + (at + first) * P
    return SignalBatch(ROBOT, time_ns, P, rows(n, first), cycle=cycle, cycle_end=end, cycle_row=first)


def test_a_reload_keeps_a_cycle_being_collected_and_applies_the_new_divider() -> None:
    """Same stream rate, another model rate: the rows held are raw, so the cycle completes whole and
    is downsampled the new model's way."""
    windower = StreamWindower(ROBOT, mode="cycle", period_ns=P, divider=2)
    first = Ack("first")
    assert windower.push(cycle_batch(0, 6, 7), first) == []
    assert windower.reconfigure(mode="cycle", period_ns=P, divider=3) is False
    second = Ack("second")
    (window,) = windower.push(cycle_batch(6, 6, 7, end=True), second)
    assert window.signals[:, 0].tolist() == [0, 3, 6, 9]  # every 3rd raw row of all 12
    assert names(window) == ["first", "second"]


def test_a_reload_to_window_mode_lets_held_rows_go_and_their_acks_ride_with_the_next_window() -> None:
    windower = StreamWindower(ROBOT, mode="cycle", period_ns=P)
    held = Ack("held")
    windower.push(cycle_batch(0, 5, 7), held)
    assert windower.reconfigure(mode="window", period_ns=P, window=4, hop=2) is True
    assert held.calls == 0  # never acknowledged ahead of the windows written before it
    windows = windower.push(cycle_batch(0, 6, 8, at=5), Ack("next"))
    assert [w.signals.shape for w in windows] == [(4, S), (4, S)]
    assert "held" in names(windows[0])


def test_expire_hands_out_every_ack_and_names_the_unfinished_cycle() -> None:
    windower = StreamWindower(ROBOT, mode="cycle", period_ns=P)
    a, b = Ack("a"), Ack("b")
    windower.push(cycle_batch(0, 5, 7), a)
    windower.push(cycle_batch(5, 5, 7), b)
    ready, acks, unfinished = windower.expire()
    assert (ready, unfinished) == ([], 7)
    assert sorted(ack.name for ack in acks if isinstance(ack, Ack)) == ["a", "b"]
    # the robot may come back: it starts afresh
    (window,) = windower.push(cycle_batch(0, 3, 9, end=True, at=10), Ack("c"))
    assert window.cycle == 9
