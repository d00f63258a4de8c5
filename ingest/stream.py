"""What the broker adapters (Kafka, MQTT) share: rejection counting, once-only acks, start-up errors.

Every source has the shape of `ingest.source.Source`::

    await source.start()                      # connect; raises SourceUnavailable with the reason
    async for delivery in source.deliveries():
        ...                                   # delivery.item: SignalBatch or Frame, delivery.ack(): release
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

from ingest.errors import IngestError
from ingest.source import Delivery as Delivery  # the one shape of every source (ingest/source.py)


class SourceUnavailable(IngestError):
    """The broker cannot be reached or refused us at start-up."""


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
