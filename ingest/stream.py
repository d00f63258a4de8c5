"""What every streaming adapter (Kafka, MQTT) hands the pipeline: decoded batches with an ack.

Adapters share one shape::

    source = KafkaSource(...) | MqttSource(...)
    await source.start()                      # connect; raises SourceUnavailable with the reason
    async for delivery in source.deliveries():
        ...                                   # delivery.batch: SignalBatch, delivery.ack(): release
    source.rejections                         # Counter: reason -> malformed messages dropped
    await source.aclose()

`ack()` is called by the pipeline once the window(s) holding the message's rows are written to the
sinks or their spool (at-least-once). Malformed messages are counted, optionally dead-lettered, and
acknowledged by the adapter itself: they can never be scored, and holding them would block commits.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ingest.errors import IngestError
from ingest.messages import SignalBatch


class SourceUnavailable(IngestError):
    """The broker cannot be reached or refused us at start-up."""


@dataclass(frozen=True)
class Delivery:
    batch: SignalBatch
    ack: Callable[[], None]


class Rejections(Counter[str]):
    """Messages rejected by reason (the `cellwatch_rejects_total` metric).

    `add` counts and logs; the log is rate-limited per reason (the first one, then at most one line
    every `every_s` seconds with the number since), so a flood of garbage cannot flood the journal.
    """

    every_s = 10.0

    def __init__(self) -> None:
        super().__init__()
        self._logged: dict[str, tuple[float, int]] = {}

    def add(self, reason: str, text: str, logger: logging.Logger) -> None:
        self[reason] += 1
        now = time.monotonic()
        last = self._logged.get(reason)
        if last is None or now - last[0] >= self.every_s:
            since = self[reason] - last[1] if last is not None else 1
            more = f" ({since} {reason} rejections in the last {now - last[0]:.0f} s)" if last else ""
            logger.warning("rejected (%s): %s%s", reason, text, more)
            self._logged[reason] = (now, self[reason])


class _Acked:
    """Run `callback` at most once (redeliveries and revocations can make an ack redundant)."""

    __slots__ = ("callback", "done")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.callback()


def once(callback: Callable[[], None]) -> Callable[[], None]:
    return _Acked(callback)
