"""Bus cycles onto the model's grid: a jittering 1 kHz bus averaged back into its 100 Hz samples, stale and
lost bus cycles counted (never averaged in, never filled), and grid samples cut into per-cycle messages as
the stream sources send them."""

from __future__ import annotations

import numpy as np

from ingest.ethercat.resample import CycleCutter, Resampler

PERIOD = 10_000_000  # 100 Hz
BUS = 1_000_000  # 1 kHz


def bus(
    samples: np.ndarray, *, start_ns: int = 1_700_000_000_000_000_000, jitter: int = 30_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample held for 10 bus cycles, captured mid-period with jitter."""
    rng = np.random.default_rng(seed)
    n = len(samples) * 10
    k = np.arange(n)
    ts = start_ns + k * BUS + BUS // 2 + rng.integers(-jitter, jitter + 1, n)
    return ts.astype(np.int64), np.repeat(samples, 10, axis=0)


def run(resampler: Resampler, ts: np.ndarray, values: np.ndarray, stale: np.ndarray, chunk: int) -> list:
    blocks = []
    for a in range(0, len(ts), chunk):
        blocks += list(resampler.push(ts[a : a + chunk], values[a : a + chunk], stale[a : a + chunk]))
    blocks += list(resampler.flush())
    return blocks


def runs(blocks: list) -> list[tuple[int, np.ndarray]]:
    """Blocks that follow each other without a hole, joined: (start, means) per stretch of the grid."""
    out: list[tuple[int, np.ndarray]] = []
    for start, means, _ in blocks:
        if out and out[-1][0] + len(out[-1][1]) * PERIOD == start:
            out[-1] = (out[-1][0], np.concatenate([out[-1][1], means]))
        else:
            out.append((start, means))
    return out


def test_a_jittering_bus_averages_back_into_its_samples_whatever_the_chunking() -> None:
    rng = np.random.default_rng(1)
    samples = np.column_stack([rng.normal(size=300), np.repeat(np.arange(3), 100)])  # value, cycle counter
    ts, values = bus(samples)
    for chunk in (7, 1000, len(ts)):
        resampler = Resampler(PERIOD, cycle_column=1)
        blocks = run(resampler, ts, values, np.zeros(len(ts), bool), chunk)
        starts = [b[0] for b in blocks]
        assert starts[0] == ts[0] // PERIOD * PERIOD
        # blocks follow each other without a hole (a block ends where a push ended)
        assert starts[1:] == [b[0] + len(b[1]) * PERIOD for b in blocks[:-1]]
        means = np.concatenate([b[1] for b in blocks])
        np.testing.assert_allclose(means, samples, rtol=0, atol=1e-12)
        cycles = np.concatenate([b[2] for b in blocks if b[2] is not None])
        assert cycles.tolist() == samples[:, 1].astype(int).tolist()
        stats = resampler.stats
        assert (stats.bus_cycles, stats.samples, stats.gaps, stats.lost, stats.stale) == (3000, 300, 0, 0, 0)
        assert stats.period_ns is not None
        assert abs(stats.period_ns - BUS) < 5_000
        assert stats.jitter_ns is not None
        assert stats.jitter_ns <= 60_000


def test_stale_and_lost_bus_cycles_are_counted_not_averaged_and_not_filled() -> None:
    samples = np.arange(50, dtype=float)[:, None]
    ts, values = bus(samples, jitter=0)
    stale = np.zeros(len(ts), bool)
    stale[0:3] = True  # three stale bus cycles in the first sample: the other seven carry it
    values = values.copy()
    values[0:3] = 1e9  # what a stale slave's inputs would hold: must not reach the mean
    keep = np.ones(len(ts), bool)
    keep[200:230] = False  # 30 bus cycles lost: samples 20, 21, 22 have none
    resampler = Resampler(PERIOD)
    blocks = runs(run(resampler, ts[keep], values[keep], stale[keep], 64))
    assert [len(b[1]) for b in blocks] == [20, 27]  # cut at the gap
    assert blocks[0][1][0, 0] == 0.0
    assert blocks[1][0] == blocks[0][0] + 23 * PERIOD
    np.testing.assert_array_equal(
        np.concatenate([b[1][:, 0] for b in blocks]), np.delete(samples[:, 0], [20, 21, 22])
    )
    assert (resampler.stats.stale, resampler.stats.lost, resampler.stats.gaps) == (3, 30, 1)


def test_capture_times_that_go_back_are_dropped_and_counted() -> None:
    ts, values = bus(np.arange(5, dtype=float)[:, None], jitter=0)
    ts = ts.copy()
    ts[12] = ts[3]  # a record stamped far back (a clock step on the capture host)
    resampler = Resampler(PERIOD)
    blocks = run(resampler, ts, values, np.zeros(len(ts), bool), 100)
    assert resampler.stats.backwards == 1
    np.testing.assert_array_equal(np.concatenate([b[1][:, 0] for b in blocks]), np.arange(5.0))


def test_grid_samples_become_per_cycle_messages_with_their_position_in_the_cycle() -> None:
    cycles = np.repeat([7, 8, 9], [250, 130, 40])
    values = np.column_stack(
        [np.arange(len(cycles), dtype=float), -np.arange(len(cycles), dtype=float), cycles]
    )
    cutter = CycleCutter("r1", PERIOD, np.array([1, 0]), max_rows=100)
    t0 = 1_000 * PERIOD
    batches = cutter.push(t0, values[:300], cycles[:300]) + cutter.push(
        t0 + 300 * PERIOD, values[300:], cycles[300:]
    )
    batches += cutter.finish()
    ends = [(b.cycle, b.cycle_end) for b in batches if b.cycle_end]
    assert ends == [(7, True), (8, True)]  # cycle 9 never ended: no end marker
    for cycle in (7, 8, 9):
        mine = [b for b in batches if b.cycle == cycle]
        rows = np.concatenate([b.signals for b in mine])
        expected = values[cycles == cycle][:, [1, 0]].astype(np.float32)
        np.testing.assert_array_equal(rows, expected)  # the model's columns, in its order
        assert [b.cycle_row for b in mine] == np.cumsum([0] + [len(b.signals) for b in mine[:-1]]).tolist()
        first = int(np.flatnonzero(cycles == cycle)[0])
        assert mine[0].time_ns == t0 + first * PERIOD
        assert all(len(b.signals) <= 100 for b in mine)
    assert [b.seq for b in batches] == list(range(len(batches)))


def test_a_gap_inside_a_cycle_moves_the_cycle_row_on_by_the_missing_rows() -> None:
    cutter = CycleCutter("r1", PERIOD, np.array([0]), max_rows=1000)
    one = np.ones((10, 1))
    batches = cutter.push(0, one, np.full(10, 3)) + cutter.push(15 * PERIOD, one, np.full(10, 3))
    batches += cutter.push(25 * PERIOD, one, np.full(10, 4))
    assert [(b.cycle, b.cycle_row, len(b.signals), b.cycle_end) for b in batches] == [
        (3, 0, 10, False),
        (3, 15, 10, True),
    ]
