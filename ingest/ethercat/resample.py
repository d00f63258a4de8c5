"""Bus cycles (1-4 kHz, jittering, drifting, sometimes lost) onto the model's sample grid.

Samples are placed by capture time: the grid is the epoch-aligned multiples of the model's period, and
each grid sample is the mean of the bus cycles captured inside it (an anti-aliasing box filter; the
bus runs 10-40x faster than the models). Stale bus cycles (a short working counter: some slave did not
take part) are left out of the mean; a grid sample with no fresh bus cycle is a gap. Gaps and lost bus
cycles (a capture-time step well over the measured bus period) are counted, never filled: a cycle with a
hole is cut there, and the daemon's windower decides what it can still score.

Process cycles (the voraus `sample`: one pick and place) come from a mapped counter signal: a grid
sample belongs to the cycle its first fresh bus cycle carried, and a change of the counter ends the
cycle before it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ingest.messages import SignalBatch


@dataclass
class BusStats:
    """What the resampler saw of the bus clock (the source's metrics)."""

    bus_cycles: int = 0
    stale: int = 0
    samples: int = 0  # grid samples made
    gaps: int = 0  # stretches without a fresh bus cycle for more than one grid sample or 3 bus periods
    lost: int = 0  # bus cycles missing by the measured period
    backwards: int = 0  # capture times that went back (dropped)
    period_ns: float | None = None  # measured bus period (median of the latest batch)
    jitter_ns: float | None = None  # p99 |step - period| of the latest batch
    counts: Counter[str] = field(default_factory=Counter)


MAX_JUMP_NS = (
    10_000_000_000  # a capture time this far ahead of the last is an outlier unless the next confirms it
)
FLOAT32_MAX = float(np.finfo(np.float32).max)


class Resampler:
    """`push(ts_ns, values, stale)` bus cycles in capture order; yields finished grid samples as
    `(time_ns, means (B, S) float64, cycle (B,) int64 or None)` blocks of consecutive grid samples (a
    gap starts a new block). The newest grid sample stays open (its running sum and count: O(1) memory,
    whatever the capture's clock does) until a later bus cycle closes it (`flush()` at the end).

    Capture times a damaged capture gives are dropped and counted, never raised: before the epoch or
    past int64 (`before_epoch`), going back (`backwards`), a lone time far ahead (`jump_ahead`: more than
    MAX_JUMP_NS past the last one and not confirmed by the next); so are bus cycles with values that are
    not finite or beyond float32 (`nonfinite`: the model's samples are float32)."""

    def __init__(self, period_ns: int, *, cycle_column: int | None = None) -> None:
        if period_ns <= 0:
            raise ValueError(f"period_ns must be positive, got {period_ns}")
        self.period_ns = int(period_ns)
        self.cycle_column = cycle_column
        self.stats = BusStats()
        # the open grid sample: (bin, sum of its fresh bus cycles, their count, its first bus cycle's row)
        self._open: tuple[int, np.ndarray, int, np.ndarray] | None = None
        self._last_ts: int | None = None
        self._last_bin: int | None = None

    def _ordered(self, ts: np.ndarray) -> np.ndarray:
        """Which capture times can be placed: in order, none a lone jump far ahead."""
        steps = np.diff(ts, prepend=ts[:1] if self._last_ts is None else np.array([self._last_ts]))
        fine = (steps >= 0) & (steps <= MAX_JUMP_NS)
        if fine.all():
            self._last_ts = int(ts[-1])
            return fine
        keep = np.zeros(len(ts), dtype=bool)  # the rare damaged stretch: decided one time at a time
        last = self._last_ts
        for k, t in enumerate(ts.tolist()):
            if last is None or 0 <= t - last <= MAX_JUMP_NS:
                keep[k], last = True, t
            elif t > last:  # far ahead: a real jump (the capture paused) only if the next time follows it
                following = ts[k + 1] if k + 1 < len(ts) else None
                if following is not None and 0 <= following - t <= MAX_JUMP_NS:
                    keep[k], last = True, t
                else:
                    self.stats.counts["jump_ahead"] += 1
            else:
                self.stats.backwards += 1
        self._last_ts = last
        return keep

    def push(
        self, ts_ns: np.ndarray, values: np.ndarray, stale: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        ts = np.asarray(ts_ns, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        stale = np.asarray(stale, dtype=bool)
        if not len(ts):
            return
        self.stats.bus_cycles += len(ts)
        placeable = (ts >= 0) & (ts <= np.iinfo(np.int64).max - 4 * self.period_ns)
        if not placeable.all():
            self.stats.counts["before_epoch"] += int((~placeable).sum())
            ts, values, stale = ts[placeable], values[placeable], stale[placeable]
            if not len(ts):
                return
        previous = self._last_ts
        keep = self._ordered(ts)
        placed = ts[keep]
        self._clock(placed if previous is None else np.concatenate([[previous], placed]))
        self.stats.stale += int((stale & keep).sum())
        keep &= ~stale
        with np.errstate(invalid="ignore"):
            finite = (np.abs(values) <= FLOAT32_MAX).all(axis=1)  # NaN and inf compare False
        bad = keep & ~finite
        if bad.any():
            self.stats.counts["nonfinite"] += int(bad.sum())
            keep &= finite
        ts, values = ts[keep], values[keep]
        if not len(ts):
            return
        bins = ts // self.period_ns
        starts = np.flatnonzero(np.concatenate([[True], bins[1:] != bins[:-1]]))
        unique = bins[starts]
        counts = np.diff(np.concatenate([starts, [len(bins)]]))
        sums = np.add.reduceat(values, starts, axis=0)
        firsts = values[starts]
        if self._open is not None:
            bin_, total, count, first = self._open
            if unique[0] == bin_:
                sums[0] += total
                counts[0] += count
                firsts[0] = first
            else:  # the open grid sample is complete: it goes out ahead of this batch's
                unique = np.concatenate([[bin_], unique])
                sums = np.concatenate([total[None], sums])
                counts = np.concatenate([[count], counts])
                firsts = np.concatenate([first[None], firsts])
        self._open = (int(unique[-1]), sums[-1].copy(), int(counts[-1]), firsts[-1].copy())
        yield from self._emit(unique[:-1], sums[:-1], counts[:-1], firsts[:-1])

    def flush(self) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        if self._open is not None:
            bin_, total, count, first = self._open
            self._open = None
            yield from self._emit(np.array([bin_]), total[None], np.array([count]), first[None])

    def _clock(self, ts: np.ndarray) -> None:
        steps = np.diff(ts)
        steps = steps[steps > 0]
        if len(steps) < 2:
            return
        period = float(np.median(steps))
        self.stats.period_ns = period
        self.stats.jitter_ns = float(np.percentile(np.abs(steps - period), 99))
        big = steps > 1.5 * period
        self.stats.lost += int(np.maximum(np.rint(steps[big] / period) - 1, 0).sum())

    def _emit(
        self, unique: np.ndarray, sums: np.ndarray, counts: np.ndarray, firsts: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        if not len(unique):
            return
        means = sums / counts[:, None]
        cycles = None
        if self.cycle_column is not None:
            cycles = np.rint(firsts[:, self.cycle_column]).astype(np.int64)  # the first bus cycle's
        # consecutive runs of grid samples; a missing grid sample is a gap
        previous = self._last_bin
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        if previous is not None and unique[0] != previous + 1:
            self.stats.gaps += 1
        self.stats.gaps += len(breaks)
        self._last_bin = int(unique[-1])
        self.stats.samples += len(unique)
        for part in np.split(np.arange(len(unique)), breaks):
            yield (
                int(unique[part[0]]) * self.period_ns,
                means[part],
                cycles[part] if cycles is not None else None,
            )


class CycleCutter:
    """Grid-sample blocks → SignalBatch messages of one robot, as the stream sources send them: cut at
    each change of the cycle counter (the batch that ends a cycle has `cycle_end`), at gaps, and every
    `max_rows` rows within a cycle (`cycle_row` says where in its cycle a batch starts; after a gap it
    has moved on by the missing rows)."""

    def __init__(self, robot: str, period_ns: int, columns: np.ndarray, *, max_rows: int = 100) -> None:
        self.robot = robot
        self.period_ns = int(period_ns)
        self.columns = np.asarray(columns)  # which resampled columns are the model's signals, in its order
        self.max_rows = max_rows
        self.seq = 0
        self._cycle: int | None = None
        self._row = 0  # the cycle row of the first pending row
        self._pending: np.ndarray | None = None  # rows of the current cycle not sent yet
        self._pending_ns = 0
        self._next_ns: int | None = None

    def push(self, time_ns: int, means: np.ndarray, cycles: np.ndarray | None) -> list[SignalBatch]:
        out: list[SignalBatch] = []
        with np.errstate(over="ignore"):  # the resampler left out values beyond float32
            rows = means[:, self.columns].astype(np.float32)
        if self._next_ns is not None and time_ns != self._next_ns:
            missing = max((time_ns - self._next_ns) // self.period_ns, 0)
            out += self._send(len(self._pending) if self._pending is not None else 0, cycle_end=False)
            self._row += int(missing)  # the gap's rows are missing from the cycle
        if cycles is None:
            cycles = np.full(len(rows), -1, dtype=np.int64)
        change = np.flatnonzero(np.diff(cycles)) + 1
        bounds = [0, *change.tolist(), len(rows)]
        for a, b in itertools.pairwise(bounds):
            cycle = int(cycles[a])
            if self._cycle is not None and cycle != self._cycle:
                out += self._send(len(self._pending) if self._pending is not None else 0, cycle_end=True)
                self._row = 0
            self._cycle = cycle
            part = rows[a:b]
            if self._pending is None or not len(self._pending):
                self._pending, self._pending_ns = part, time_ns + a * self.period_ns
            else:
                self._pending = np.concatenate([self._pending, part])
            while len(self._pending) > self.max_rows:  # keep one row back: it may end the cycle
                out += self._send(self.max_rows, cycle_end=False)
        self._next_ns = time_ns + len(rows) * self.period_ns
        return out

    def finish(self) -> list[SignalBatch]:
        """The capture ended: the last cycle's end never came; what is held goes out without `cycle_end`
        (the windower drops an unfinished cycle when the robot falls silent)."""
        return self._send(len(self._pending) if self._pending is not None else 0, cycle_end=False)

    def _send(self, n: int, *, cycle_end: bool) -> list[SignalBatch]:
        if self._pending is None or n == 0:
            return []
        rows, self._pending = self._pending[:n], self._pending[n:]
        batch = SignalBatch(
            robot=self.robot,
            time_ns=int(self._pending_ns),
            period_ns=self.period_ns,
            signals=np.ascontiguousarray(rows),
            cycle=self._cycle if self._cycle is not None and self._cycle >= 0 else None,
            cycle_end=cycle_end and not len(self._pending),
            seq=self.seq,
            cycle_row=self._row,
        )
        self.seq += 1
        self._row += n
        self._pending_ns += n * self.period_ns
        return [batch]
