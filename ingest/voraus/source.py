"""The voraus replay source: cycles of a voraus-AD file as an async stream, optionally paced in real
time (× speed). Reading and decoding run in a worker thread; the event loop only awaits."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from ingest.voraus.reader import Cycle, VorausReader


class VorausReplaySource:
    """`async for cycle in source.cycles()`; `close()` when done."""

    def __init__(
        self,
        path: Path,
        robot: str,
        signals: Sequence[str],
        *,
        speed: float = 1.0,
        test_split_only: bool = True,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.robot = robot
        self.speed = speed
        self.test_split_only = test_split_only
        self.reader = VorausReader(path, signals)

    async def cycles(self) -> AsyncIterator[Cycle]:
        loop = asyncio.get_running_loop()
        iterator: Iterator[Cycle] = self.reader.cycles()
        start = loop.time()
        elapsed = 0.0
        sentinel = object()
        try:
            while True:
                cycle = await asyncio.to_thread(next, iterator, sentinel)
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

    def close(self) -> None:
        self.reader.close()
