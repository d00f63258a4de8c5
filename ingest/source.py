"""The one shape every source has, whatever it reads (a voraus file, Kafka, MQTT, a camera).

    source = SomeSource(...)                  # built from its config block (see daemon/sources.py)
    source.kind                               # "signals" or "frames": which model scores it
    await source.start()                      # connect / open; raises SourceUnavailable with the reason
    async for delivery in source.deliveries():
        delivery.item                         # SignalBatch | ReplayedCycle (signals) or Frame (frames)
        delivery.ack()                        # release: once its points are durable (at-least-once)
    source.rejections                         # reason -> inputs rejected (cellwatch_rejects_total)
    source.metric_samples()                   # the source's own gauges and counters
    await source.aclose()                     # after start(); close() releases an unstarted source

A source rejects what it cannot decode itself (counted by reason, acknowledged, never yielded); the
pipeline acks what it accepted once the points made from it are written to the sinks or their spool.
Decoding that costs CPU (images, video) runs off the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, TypeAlias, runtime_checkable

import numpy as np

from ingest.messages import SignalBatch
from ingest.voraus.reader import Cycle

SIGNALS: Final = "signals"
FRAMES: Final = "frames"
Kind: TypeAlias = Literal["signals", "frames"]
Sample: TypeAlias = tuple[str, str, dict[str, str], float]  # (metric, type, labels, value)

MAX_FRAME_PIXELS: Final = 40_000_000
"""A camera frame with more pixels than this is rejected (before decoding, where the format allows)."""
MAX_FRAME_BYTES: Final = 32 * 2**20
"""An encoded frame (a file, a message payload) larger than this is rejected unread."""


@dataclass(frozen=True)
class ReplayedCycle:
    """A whole voraus cycle from a replayed file, ending at `end_ns` on the replay's clock."""

    robot: str
    cycle: Cycle
    end_ns: int


@dataclass(frozen=True)
class Frame:
    """One camera frame: uint8 RGB (H, W, 3), from `camera` of `robot`, taken at `time_ns`.

    `ref` names the frame for people (the file name, or `stream#frame-number`); `seq` is its number in
    its source; `cycle` is the voraus cycle it belongs to when the sender says so (the camera looks at the
    can in the scan pause), which joins it to that cycle's signal score. `label` is the MVTec folder
    ("good" or the defect type) when a data set is replayed, for evaluation; None for live frames."""

    robot: str
    camera: str
    time_ns: int
    image: np.ndarray = field(repr=False)
    ref: str
    seq: int = 0
    cycle: int | None = None
    label: str | None = None


Item: TypeAlias = SignalBatch | ReplayedCycle | Frame


def no_ack() -> None:
    """The ack of an input that needs none (a file replayed: nothing to commit)."""


@dataclass(frozen=True)
class Delivery:
    item: Item
    ack: Callable[[], None] = no_ack

    @property
    def batch(self) -> SignalBatch:
        """The item of a signal stream (Kafka, MQTT)."""
        assert isinstance(self.item, SignalBatch), type(self.item)
        return self.item


@runtime_checkable
class Source(Protocol):
    name: str  # unique per daemon: the `source` label of its metrics
    kind: Kind

    @property
    def rejections(self) -> Mapping[str, int]: ...

    async def start(self) -> None: ...

    def deliveries(self) -> AsyncIterator[Delivery]: ...

    def metric_samples(self) -> list[Sample]: ...

    async def aclose(self) -> None: ...

    def close(self) -> None: ...
