"""Per-robot windowing of signal streams (Kafka, MQTT): message batches in, windows out.

Two modes, following the model card:

- ``cycle``: rows are grouped by their cycle marker (voraus ``sample``); a cycle is complete when a
  message says ``cycle_end`` or the next cycle's first message arrives. Then it is downsampled to the
  model's rate and scored whole, exactly as a replayed cycle.
- ``window``: when messages mark their cycles (``cycle`` and ``cycle_row``), windows are cut within
  each cycle from its first row, as the model was trained, never across a cycle boundary. Otherwise a
  continuous sliding window, its ends aligned to the absolute sample index (timestamp / period). Either
  way a restarted daemon cuts the very same windows again.

Every accepted message carries an ``ack`` callback (commit a Kafka offset, PUBACK an MQTT message).
A message is released only with the window after which no future window needs its rows; the pipeline
calls the window's acks after the sinks (or the spool) accepted its point: at-least-once. A message
that arrives again (redelivery after a reconnect or a rebalance) while the original is still held
takes over the original's place, so nothing is acknowledged before it is written.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flows.preprocess import downsample
from ingest.messages import SignalBatch

Ack = Callable[[], None]


@dataclass
class Window:
    robot: str
    cycle: int
    time_ns: int  # timestamp of the window's last sample (from the data)
    signals: np.ndarray  # (T, S) raw, float32
    category: str = ""
    anomaly: bool | None = None
    acks: list[Ack] = field(default_factory=list)
    generation: int = 0  # the pipeline's model generation this window was cut for


class StreamRejected(ValueError):
    """A batch the windower cannot use; `reason` is the metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _Held:
    first_ns: int
    last_ns: int
    ack: Ack | None
    last_index: int | None = None  # window mode: raw index of the last row in the window frame


class StreamWindower:
    """Windows of one robot's stream. Not thread-safe: one per robot, driven from the event loop."""

    def __init__(
        self,
        robot: str,
        *,
        mode: str,
        period_ns: int,
        divider: int = 1,
        window: int | None = None,
        hop: int | None = None,
        max_cycle_rows: int = 200_000,
    ) -> None:
        _check_spec(mode, window, hop)
        self.robot = robot
        self.mode = mode
        self.period_ns = period_ns  # raw stream period (model period / divider)
        self.divider = divider
        self.window = window or 0
        self.hop = hop or 0
        self.max_cycle_rows = max_cycle_rows
        self.held: deque[_Held] = deque()  # accepted messages not yet released, in stream order
        self.last_ns: int | None = None  # timestamp of the newest accepted row
        self._carry: list[Ack] = []  # acks of duplicates, released with the next window
        self._ready: list[Window] = []  # complete cycles not returned yet (their batch was rejected)
        self._forget_rows()

    def _forget_rows(self) -> None:
        """No rows collected: no cycle open (cycle mode), no window history (window mode)."""
        self._cycle: int | None = None
        self._parts: list[np.ndarray] = []
        self._rows = 0
        self._skipping: int | None = None  # a cycle whose rows are dropped (start missing, too long)
        # window mode: the last window-1 model-rate rows and the absolute index of the next one
        self._history: np.ndarray | None = None
        self._next_index: int | None = None
        self._window_cycle: int | None = None  # the cycle of cycle-aligned windows being cut

    def push(self, batch: SignalBatch, ack: Ack | None) -> list[Window]:
        """Add one message's rows; returns the windows it completes. Raises StreamRejected."""
        if abs(batch.period_ns - self.period_ns) > self.period_ns // 100:
            _ack_now(ack)  # never scored: holding it would block the commits behind it for good
            raise StreamRejected(
                "wrong_rate",
                f"{self.robot}: sample period {batch.period_ns} ns, the model expects {self.period_ns} ns",
            )
        time_ns, rows = batch.time_ns, batch.rows
        end_ns = time_ns + (rows - 1) * self.period_ns
        if self.last_ns is not None and time_ns <= self.last_ns:
            return self._redelivered(time_ns, end_ns, ack)
        if self.mode == "cycle":
            return self._push_cycle(batch, end_ns, ack)
        if batch.cycle is not None and batch.cycle_row is not None:
            return self._push_cycle_windows(batch, end_ns, ack)
        return self._push_window(time_ns, end_ns, batch.signals, batch.cycle, ack)

    def _redelivered(self, time_ns: int, end_ns: int, ack: Ack | None) -> list[Window]:
        for held in self.held:
            if held.first_ns == time_ns and held.last_ns == end_ns:
                held.ack = ack  # the original's ack belongs to a dead connection or a lost partition
                return []
        if self.held and time_ns >= self.held[0].first_ns:
            _ack_now(ack)  # never scored (its rows overlap rows held)
            raise StreamRejected(
                "out_of_order",
                f"{self.robot}: rows from {time_ns} overlap rows already received (up to {self.last_ns})",
            )
        if ack is not None:
            # older than anything held: scored already, but its window may still be on its way to the
            # sinks. Released with this robot's next window, which is written after it.
            self._carry.append(ack)
        raise StreamRejected("duplicate", f"{self.robot}: rows from {time_ns} were already scored")

    # -- cycle mode ---------------------------------------------------------------------------------
    def _push_cycle(self, batch: SignalBatch, end_ns: int, ack: Ack | None) -> list[Window]:
        cycle = batch.cycle
        if cycle is None:
            _ack_now(ack)  # never scored
            raise StreamRejected("missing_cycle", f"{self.robot}: a cycle-mode model needs a 'cycle' marker")
        if self._cycle is not None and cycle != self._cycle:
            if self._parts:
                # the next cycle began: the previous one is complete. Kept until a push returns (or
                # flush): this batch may still be rejected below, and the window must not be lost
                self._ready.append(self._emit_cycle())
            self._cycle = None
        if self._skipping is not None and self._skipping != cycle:
            self._skipping = None
        if self._skipping == cycle:
            self._skip(cycle, batch, end_ns, ack)
            raise StreamRejected("skipped_cycle", f"{self.robot}: rest of unusable cycle {cycle}")
        if batch.cycle_row is not None and batch.cycle_row != self._rows:
            # the start of this cycle is missing (a daemon resuming from a committed offset that lies
            # inside it: that cycle's point was written before): scoring the rest would overwrite it
            self._skip(cycle, batch, end_ns, ack)
            raise StreamRejected(
                "partial_cycle",
                f"{self.robot}: cycle {cycle} rows start at {batch.cycle_row}, expected {self._rows}",
            )
        if self._rows + batch.rows > self.max_cycle_rows:
            self._skip(cycle, batch, end_ns, ack)
            raise StreamRejected(
                "cycle_too_long", f"{self.robot}: cycle {cycle} exceeds {self.max_cycle_rows} rows"
            )
        self._cycle = cycle
        self._parts.append(np.asarray(batch.signals, dtype=np.float32))
        self._rows += batch.rows
        self.held.append(_Held(batch.time_ns, end_ns, ack))
        self.last_ns = end_ns
        out, self._ready = self._ready, []
        if batch.cycle_end:
            out.append(self._emit_cycle())
        return out

    def _skip(self, cycle: int, batch: SignalBatch, end_ns: int, ack: Ack | None) -> None:
        """Drop the rest of a cycle that cannot be scored; its messages are released with the next
        window (acknowledging them now could overtake windows still on their way to the sinks)."""
        self._parts, self._rows, self._cycle = [], 0, None
        self._skipping = cycle
        self.held.append(_Held(batch.time_ns, end_ns, ack))
        self.last_ns = end_ns

    def _emit_cycle(self) -> Window:
        assert self._cycle is not None
        assert self.last_ns is not None
        raw = self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)
        signals = np.ascontiguousarray(downsample(raw, self.divider), dtype=np.float32)
        window = Window(
            self.robot, self._cycle, self.last_ns, signals, acks=self._release_all() + self._carried()
        )
        self._parts, self._rows, self._cycle = [], 0, None
        return window

    def _carried(self) -> list[Ack]:
        carried, self._carry = self._carry, []
        return carried

    def _release_all(self) -> list[Ack]:
        acks = [h.ack for h in self.held if h.ack is not None]
        self.held.clear()
        return acks

    # -- window mode --------------------------------------------------------------------------------
    def _push_window(
        self, time_ns: int, end_ns: int, signals: np.ndarray, cycle: int | None, ack: Ack | None
    ) -> list[Window]:
        """A continuous stream: window ends where (absolute model-rate index + 1) % hop == 0, so every
        daemon cuts the same windows from the same stream, wherever it starts reading."""
        first = self._raw_index(time_ns)  # absolute raw index of the first row
        return self._cut(signals, first, time_ns, end_ns, ack, phase=0, origin_ns=0, cycle=cycle)

    def _push_cycle_windows(self, batch: SignalBatch, end_ns: int, ack: Ack | None) -> list[Window]:
        """Window mode on a stream that marks its cycles: windows are cut within each cycle from its
        first row (start = k * hop), as the model was trained (`flows.preprocess.window_starts`),
        never across a cycle boundary, and the same after a restart (`cycle_row` places every row)."""
        assert batch.cycle is not None
        assert batch.cycle_row is not None
        if batch.cycle != self._window_cycle:
            # a new cycle: the previous cycle's windows are all out; its messages are needed no more
            # and ride with the next window (after those windows, in order)
            self._carry += [h.ack for h in self.held if h.ack is not None]
            self.held.clear()
            self._history = None
            self._window_cycle = batch.cycle
        first = batch.cycle_row  # raw index of row 0 within the cycle
        cycle_start_ns = batch.time_ns - first * self.period_ns
        return self._cut(
            batch.signals,
            first,
            batch.time_ns,
            end_ns,
            ack,
            phase=self.window,
            origin_ns=cycle_start_ns,
            cycle=batch.cycle,
        )

    def _cut(
        self,
        signals: np.ndarray,
        first: int,
        time_ns: int,
        end_ns: int,
        ack: Ack | None,
        *,
        phase: int,
        origin_ns: int,
        cycle: int | None,
    ) -> list[Window]:
        """Add rows whose first has raw index `first` in a frame starting at `origin_ns` (the epoch, or
        the cycle's first row); emit every full window ending at a model-rate index e with
        (e + 1 - phase) % hop == 0. Windows never span a gap in the rows."""
        # keep the rows on the model's rate grid (raw index divisible by the divider)
        offset = (-first) % self.divider
        kept = np.asarray(signals[offset :: self.divider], dtype=np.float32)
        index = (first + offset) // self.divider  # model-rate index of kept[0]
        if self._history is None or self._next_index != index:
            # the first rows, or rows missing: windows never span a gap
            self._history = np.zeros((0, signals.shape[1]), dtype=np.float32)
        self.held.append(_Held(time_ns, end_ns, ack, first + len(signals) - 1))
        self.last_ns = end_ns
        rows = np.concatenate([self._history, kept]) if len(self._history) else kept
        rows_first = index - len(self._history)  # model-rate index of rows[0]
        stop = index + len(kept)  # one past the last index now available
        first_end = max(self.window - 1, index)
        first_end += (phase - 1 - first_end) % self.hop
        out: list[Window] = []
        for e in range(first_end, stop, self.hop):
            begin = e - self.window + 1
            if begin < rows_first:
                continue
            window = rows[begin - rows_first : e - rows_first + 1].copy()
            out.append(self._emit_window(e, window, origin_ns, cycle))
        self._history = rows[-(self.window - 1) :] if self.window > 1 else rows[:0]
        self._next_index = stop
        return out

    def _raw_index(self, ns: int) -> int:
        """Absolute raw index of a timestamp, rounded half up in integers (a float division loses the
        nanoseconds of an epoch timestamp and round() goes half to even: rows half a period off the
        grid would alternate between two indices, and every message would look like a gap)."""
        return (ns + self.period_ns // 2) // self.period_ns

    def _emit_window(self, end: int, signals: np.ndarray, origin_ns: int, cycle: int | None) -> Window:
        # stamped on the frame's sample grid: the same window gets the same time after a restart
        end_ns = origin_ns + end * self.divider * self.period_ns
        # messages whose rows all lie before the next window's first row are needed no more
        # (compared as raw indices: timestamps may lie off the period grid)
        next_first = (end + self.hop - self.window + 1) * self.divider
        acks: list[Ack] = []
        while self.held and (self.held[0].last_index or 0) < next_first:
            held = self.held.popleft()
            if held.ack is not None:
                acks.append(held.ack)
        label = cycle if cycle is not None else end // self.hop
        return Window(self.robot, label, end_ns, signals, acks=acks + self._carried())

    def reconfigure(
        self,
        *,
        mode: str,
        period_ns: int,
        divider: int = 1,
        window: int | None = None,
        hop: int | None = None,
        max_cycle_rows: int = 200_000,
    ) -> bool:
        """Follow a new model (config reload). A cycle being collected at the same stream rate is kept
        (its raw rows are downsampled by the new divider when it completes); otherwise the rows held
        cannot be cut the new way: they are let go, their acks ride with the next window (never lost
        in the acks' order), and True is returned so the caller can say so."""
        _check_spec(mode, window, hop)
        keeps = mode == self.mode == "cycle" and period_ns == self.period_ns
        self.period_ns, self.divider, self.max_cycle_rows = period_ns, divider, max_cycle_rows
        self.window, self.hop = window or 0, hop or 0
        changed = mode != self.mode
        self.mode = mode
        if keeps:
            return False
        discarded = bool(self._parts) or (self._history is not None and len(self._history) > 0)
        self._carry += self._release_all()
        self._forget_rows()
        return discarded or changed

    def expire(self) -> tuple[list[Window], list[Ack], int | None]:
        """The robot fell silent: complete cycles not handed out yet (to be scored), every ack held or
        carried, and the cycle left unfinished (if any), whose rows are dropped (its end never came)."""
        unfinished = self._cycle if self.mode == "cycle" and self._parts else None
        ready, self._ready = self._ready, []
        acks = self._release_all() + self._carried()
        self._forget_rows()
        return ready, acks, unfinished

    def flush(self) -> list[Window]:
        """End of stream: a cycle still open is scored as it is (replay sources end cleanly)."""
        out, self._ready = self._ready, []
        if self.mode == "cycle" and self._parts:
            out.append(self._emit_cycle())
        return out


def _check_spec(mode: str, window: int | None, hop: int | None) -> None:
    if mode not in ("cycle", "window"):
        raise ValueError(f"mode must be 'cycle' or 'window', got {mode!r}")
    if mode == "window" and (not window or not hop):
        raise ValueError("window mode needs window and hop")


def _ack_now(ack: Ack | None) -> None:
    if ack is not None:
        ack()
