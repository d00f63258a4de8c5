"""The voraus replay source: cycles of a voraus-AD file as an async stream, optionally paced in real
time (× speed). Reading and decoding run in a worker thread; the event loop only awaits."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ingest.source import SIGNALS, Delivery, Kind, ReplayedCycle, Sample, no_ack
from ingest.voraus.reader import Cycle, VorausReader


class VorausReplaySource:
    """A `Source` of whole cycles (`ReplayedCycle`, on a clock from `start_ns`); `cycles()` gives the bare
    cycles. Nothing to acknowledge: a file can be read again."""

    kind: Kind = SIGNALS

    def __init__(
        self,
        path: Path,
        robot: str,
        signals: Sequence[str],
        *,
        speed: float = 1.0,
        test_split_only: bool = True,
        start_ns: int = 0,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.robot = robot
        self.name = f"replay:{robot}"
        self.speed = speed
        self.test_split_only = test_split_only
        self.start_ns = start_ns  # the replay's clock: the first cycle ends at start_ns + its duration
        # small record batches: a daemon keeps a steady, low footprint (the batch size does not change speed
        # much: cycles are assembled from many batches either way)
        self.reader = VorausReader(path, signals, batch_rows=8192)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"source-{robot}")

    async def cycles(self) -> AsyncIterator[Cycle]:
        loop = asyncio.get_running_loop()
        iterator: Iterator[Cycle] = self.reader.cycles()
        start = loop.time()
        elapsed = 0.0
        sentinel = object()
        try:
            while True:
                cycle = await loop.run_in_executor(self._thread, next, iterator, sentinel)
                if cycle is sentinel:
                    return
                assert isinstance(cycle, Cycle)
                if self.test_split_only and cycle.is_train:
                    continue
                elapsed += cycle.duration_s
                if math.isfinite(self.speed):
                    delay = start + elapsed / self.speed - loop.time()
                    if delay > 0:  # real-time pacing: the cycle is complete only at its end
                        await asyncio.sleep(delay)
                yield cycle
        finally:
            with contextlib.suppress(Exception):
                iterator.close()  # type: ignore[attr-defined]

    async def start(self) -> None:
        """The file is opened at construction (its rate is checked before the daemon starts)."""

    async def deliveries(self) -> AsyncIterator[Delivery]:
        clock_ns = self.start_ns
        async for cycle in self.cycles():
            clock_ns += round(cycle.duration_s * 1e9)
            yield Delivery(ReplayedCycle(self.robot, cycle, clock_ns), no_ack)

    @property
    def rejections(self) -> dict[str, int]:
        """Cycles rejected by reason (nan, too_short, ...)."""
        return dict(self.reader.rejections.counts)

    def metric_samples(self) -> list[Sample]:
        """Damaged row groups met so far and the file's measured sampling rate (its rejected cycles
        are counted by reason in ``cellwatch_rejects_total``)."""
        labels = {"source": self.name}
        out = [
            (
                "cellwatch_replay_damaged_row_groups",
                "gauge",
                labels,
                float(self.reader.damaged_row_group_count),
            )
        ]
        measured = self.reader.measured_rate_hz  # measured once at start-up (build_sources), then cached
        if measured is not None:
            out.append(("cellwatch_replay_measured_rate_hz", "gauge", labels, measured))
        return out

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.reader.close()
