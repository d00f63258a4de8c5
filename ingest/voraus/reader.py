"""Stream a voraus-AD parquet file cycle by cycle, with bounded memory.

The file holds one row per time step with all cycles (column ``sample``) stacked. Real files were
written by fastparquet as one row group whose column chunks are each a single page (about 20 MB per
column at 100 Hz, 100 MB at 500 Hz). pyarrow decodes a page whole, so reading all 137 columns side
by side holds the whole file in memory (measured: 3.2 GB peak RSS for a 2.7 GB file at 100 Hz),
whatever the batch size. The reader therefore sums the column-chunk sizes from the footer: within
``memory_budget`` it streams record batches directly (``strategy="stream"``); above it, it first
copies the wanted columns, a budget-sized group at a time, into an anonymous column-major temporary
file and assembles cycles from that (``strategy="spill"``; disk: 8 bytes per row and column, in
``spill_dir``: by default $TMPDIR, else /var/tmp, which unlike /tmp is rarely RAM-backed).

Per-cycle data problems never raise: the cycle is rejected with a reason code and counted in
:attr:`VorausReader.rejections`, and the iteration goes on. So does a damaged row group (a column
chunk that cannot be decoded or fails its page checksum, while the footer is intact): the cycles with
rows in it are rejected whole (``damaged_row_group``), those of the other row groups come out. Only a
file whose footer or schema cannot be read raises :class:`VorausFormatError`.

The sampling rate is measured (1 / median time step) and reported as a nominal rate: within
``schema.RATE_TOLERANCE`` (±2 %) of a published rate (100, 500 Hz) it is that rate.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
import time as _time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest.errors import VorausFormatError
from ingest.voraus import schema

# Reason codes, in order of precedence (a cycle with several problems gets the first that applies).
DAMAGED_ROW_GROUP: Final = "damaged_row_group"
SPLIT_CYCLE: Final = "split_cycle"
TOO_LONG: Final = "too_long"
TOO_SHORT: Final = "too_short"
NULL: Final = "null"
INCONSISTENT_META: Final = "inconsistent_meta"
UNKNOWN_CATEGORY: Final = "unknown_category"
NAN: Final = "nan"
INF: Final = "inf"
NON_MONOTONIC_TIME: Final = "non_monotonic_time"
REASONS: Final = (
    DAMAGED_ROW_GROUP,
    SPLIT_CYCLE,
    TOO_LONG,
    TOO_SHORT,
    NULL,
    INCONSISTENT_META,
    UNKNOWN_CATEGORY,
    NAN,
    INF,
    NON_MONOTONIC_TIME,
)

Strategy = Literal["auto", "stream", "spill"]

#: meta columns a Cycle needs besides ``sample`` (cycle boundaries come from a pre-scan of ``sample``)
_CYCLE_META: Final = ("time", "anomaly", "category", "setting", "action", "active")
_CONSTANT_META: Final = ("anomaly", "category", "setting")
_KNOWN_CATEGORIES: Final = frozenset(int(c) for c in schema.Category)
_MACHINE_SET: Final = frozenset(schema.MACHINE_SIGNALS)
_ALL_SET: Final = frozenset(schema.ALL_COLUMNS)
_MAX_NAMES: Final = 5
# why _assemble skips a run without reading it (0: read it)
_SKIP_SPLIT: Final = 1  # first run of a split sample id: reported
_SKIP_SPLIT_LATER: Final = 2  # later runs of a split sample id: counted with the first
_SKIP_LONG: Final = 3
_SKIP_SHORT: Final = 4
_SKIP_DAMAGED: Final = 5  # has rows in a row group whose ``sample`` column could not be read (reported)
_SKIP_DAMAGED_LATER: Final = 6  # later runs of such a sample id: counted with the first
#: sample id given to the rows of a damaged ``sample`` chunk (their ids are unknown), plus a counter
_UNKNOWN_ID: Final = np.iinfo(np.int64).min
#: default spill directory; safe to share: the spill file is created unlinked (tempfile.TemporaryFile)
_DISK_TMP: Final = "/var/tmp"  # noqa: S108


# --------------------------------------------------------------------------------------------------
# public records


@dataclass(frozen=True, eq=False)
class Cycle:
    """One pick-and-place cycle: meta scalars, per-row meta arrays and a (T, S) signal matrix."""

    sample: int
    anomaly: bool
    category: int
    setting: int
    time: np.ndarray
    action: np.ndarray
    active: np.ndarray
    signals: np.ndarray
    signal_names: tuple[str, ...]

    @property
    def category_name(self) -> str:
        return schema.category_name(self.category)

    @property
    def variant_name(self) -> str:
        return schema.variant_name(self.setting)

    @property
    def is_train(self) -> bool:
        return schema.is_train_cycle(self.anomaly, self.setting)

    @property
    def n_rows(self) -> int:
        return int(self.time.shape[0])

    @property
    def duration_s(self) -> float:
        """Span of the time stamps, last minus first (s)."""
        return float(self.time[-1] - self.time[0]) if self.n_rows else 0.0


@dataclass(frozen=True)
class Rejection:
    """A cycle left out of the stream: its sample id, a reason code (see ``REASONS``) and details."""

    sample: int | None
    reason: str
    detail: str


@dataclass
class RejectStats:
    """Rejections of one pass: a count per reason code and the first ``max_examples`` rejections."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[Rejection] = field(default_factory=list)
    max_examples: int = 100

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, rejection: Rejection) -> None:
        self.counts[rejection.reason] = self.counts.get(rejection.reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(rejection)


# --------------------------------------------------------------------------------------------------
# internals: runs of equal ``sample`` values, row blocks, the spill file


@dataclass(frozen=True)
class _Runs:
    """Contiguous runs of one ``sample`` value over the whole file (a cycle, unless split)."""

    sample: np.ndarray  # int64, per run
    start: np.ndarray  # int64, global first row
    length: np.ndarray  # int64
    sample_nulls: np.ndarray  # int64, null ``sample`` values within the run (forward-filled)
    split: np.ndarray  # bool, the run's sample id occurs in more than one run
    first_of_id: np.ndarray  # bool, first run of its sample id
    id_index: np.ndarray  # int64, index of the run's sample id among the distinct ids
    id_offsets: np.ndarray  # int64, per distinct id: where its runs start in ``id_order``
    id_order: np.ndarray  # int64, run indices grouped by sample id, in file order within an id
    damaged: np.ndarray  # object (str), per run: why its cycle is lost to a damaged row group, or ""
    unknown_id: np.ndarray  # bool, per run: rows of a damaged ``sample`` chunk (id unknown)

    @property
    def end(self) -> np.ndarray:
        return self.start + self.length

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def runs_of_id(self, r: int) -> np.ndarray:
        """Indices of all runs with the sample id of run ``r``, in file order."""
        u = self.id_index[r]
        return self.id_order[self.id_offsets[u] : self.id_offsets[u + 1]]

    def segments(self, g0: int, n: int) -> tuple[int, int, np.ndarray]:
        """Runs overlapping rows [g0, g0+n): first index, end index, local start of each piece."""
        r0 = int(np.searchsorted(self.start, g0, side="right")) - 1
        r1 = int(np.searchsorted(self.start, g0 + n, side="left"))
        return r0, r1, np.maximum(self.start[r0:r1] - g0, 0)


@dataclass(frozen=True)
class _Block:
    """Consecutive rows of the file: meta arrays, signals (n, S) and null masks of columns with nulls."""

    start: int
    meta: dict[str, np.ndarray]
    signals: np.ndarray
    nulls: dict[str, np.ndarray]
    damaged: str = ""  # not "": rows that could not be decoded (no data; signals has 0 columns)

    @property
    def n(self) -> int:
        return int(self.signals.shape[0])

    @classmethod
    def lost(cls, start: int, n: int, detail: str) -> _Block:
        return cls(start, {}, np.empty((n, 0), np.float64), {}, detail)

    def slice(self, a: int, b: int) -> _Block:
        return _Block(
            self.start + a,
            {k: v[a:b] for k, v in self.meta.items()},
            self.signals[a:b],
            {k: v[a:b] for k, v in self.nulls.items()},
            self.damaged,
        )


@dataclass(frozen=True)
class _Damage:
    """Rows [start, stop) of row group ``row_group`` whose columns could not be decoded."""

    start: int
    stop: int
    row_group: int
    detail: str

    @property
    def n(self) -> int:
        return self.stop - self.start


class _RowCountMismatch(Exception):
    """A row group decodes to another number of rows than its footer entry says."""


def _merge_damage(ranges: list[_Damage]) -> list[_Damage]:
    """Sorted, non-overlapping damage ranges (where two overlap, the first one's detail is kept)."""
    out: list[_Damage] = []
    for d in sorted(ranges, key=lambda d: (d.start, d.stop)):
        if out and d.start < out[-1].stop:
            last = out[-1]
            out[-1] = _Damage(last.start, max(last.stop, d.stop), last.row_group, last.detail)
        else:
            out.append(d)
    return out


def _cut(g0: int, g1: int, damage: list[_Damage]) -> Iterator[tuple[int, int, str]]:
    """Rows [g0, g1) as pieces (a, b, detail): detail is "" for intact rows, else the damage's."""
    pos = g0
    for d in damage:
        if d.stop <= pos or d.start >= g1:
            continue
        if d.start > pos:
            yield pos, d.start, ""
        b = min(d.stop, g1)
        yield max(pos, d.start), b, d.detail
        pos = b
    if pos < g1:
        yield pos, g1, ""


class _SpillFile:
    """An anonymous temporary file holding columns one after another (column-major)."""

    def __init__(self, columns: dict[str, np.dtype], n_rows: int, directory: str | None) -> None:
        self._n = n_rows
        self._dtypes = dict(columns)
        self._offsets: dict[str, int] = {}
        pos = 0
        for name, dtype in self._dtypes.items():
            self._offsets[name] = pos
            pos += n_rows * dtype.itemsize
        self._end = pos
        self._null_offsets: dict[str, int] = {}
        self._f: IO[bytes] = tempfile.TemporaryFile(dir=directory, buffering=0)  # noqa: SIM115
        self._f.truncate(pos)

    def close(self) -> None:
        self._f.close()

    def _write(self, offset: int, values: np.ndarray) -> None:
        view = np.ascontiguousarray(values).data.cast("B")
        self._f.seek(offset)
        done = 0
        while done < len(view):
            done += self._f.write(view[done:]) or 0

    def _read(self, offset: int, out: np.ndarray) -> np.ndarray:
        view = out.data.cast("B")
        self._f.seek(offset)
        done = 0
        while done < len(view):
            got = self._f.readinto(view[done:])  # type: ignore[attr-defined]
            if not got:  # a hole past the end of the file reads as zeros
                view[done:] = bytes(len(view) - done)
                break
            done += got
        return out

    def write(self, name: str, row: int, values: np.ndarray) -> None:
        self._write(self._offsets[name] + row * self._dtypes[name].itemsize, values)

    def write_nulls(self, name: str, row: int, mask: np.ndarray) -> None:
        if name not in self._null_offsets:  # allocated on first use; unwritten parts read as False
            self._null_offsets[name] = self._end
            self._end += self._n
        self._write(self._null_offsets[name] + row, mask.astype(np.bool_))

    def read(self, name: str, row: int, n: int) -> np.ndarray:
        dtype = self._dtypes[name]
        return self._read(self._offsets[name] + row * dtype.itemsize, np.empty(n, dtype))

    def read_nulls(self, row: int, n: int) -> dict[str, np.ndarray]:
        out = {}
        for name, offset in self._null_offsets.items():
            mask = self._read(offset + row, np.empty(n, np.bool_))
            if mask.any():
                out[name] = mask
        return out


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _quote_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return np.dtype(t.to_pandas_dtype()).name
    return str(t)


def _fill_nulls(arr: pa.Array, name: str, nulls: dict[str, np.ndarray]) -> np.ndarray:
    """Numpy values of an arrow array; nulls are recorded in ``nulls`` and filled with zero."""
    if arr.null_count:
        nulls[name] = arr.is_null().to_numpy(zero_copy_only=False)
        arr = pc.fill_null(arr, pa.scalar(0, arr.type) if not pa.types.is_boolean(arr.type) else False)
    return arr.to_numpy(zero_copy_only=False)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate row pieces into a fresh C-contiguous array (never a view of a block)."""
    return np.ascontiguousarray(parts[0]).copy() if len(parts) == 1 else np.concatenate(parts)


def _to_matrix(columns: Sequence[pa.Array | np.ndarray], names: Sequence[str], n: int) -> np.ndarray:
    """Float64 (n, S) row-major matrix of S columns, via arrow's tensor conversion (nulls -> NaN)."""
    if not names:
        return np.empty((n, 0), np.float64)
    arrays = [c if isinstance(c, pa.Array) else pa.array(c) for c in columns]
    batch = pa.RecordBatch.from_arrays(arrays, names=list(names))
    return np.asarray(batch.to_tensor(null_to_nan=True, row_major=True))


# --------------------------------------------------------------------------------------------------
# the reader


class VorausReader:
    """Read a voraus-AD parquet file cycle by cycle (see the module docstring).

    ``signals`` is a sequence of machine signal names (kept in the given order) or the name of a
    signal group (``schema.SIGNAL_GROUPS``). ``memory_budget`` bounds the bytes of parquet column
    chunks decoded at once; ``strategy`` forces streaming or spilling instead of choosing by it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        signals: Sequence[str] | str = schema.MACHINE_SIGNALS,
        *,
        batch_rows: int = 65_536,
        max_cycle_rows: int = 120_000,
        min_cycle_rows: int = 2,
        strategy: Strategy = "auto",
        memory_budget: int = 128 * 2**20,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._signals = _check_signals(signals)
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        if min_cycle_rows < 1 or max_cycle_rows < min_cycle_rows:
            raise ValueError(
                f"need 1 <= min_cycle_rows <= max_cycle_rows, got {min_cycle_rows} and {max_cycle_rows}"
            )
        if strategy not in ("auto", "stream", "spill"):
            raise ValueError(f"strategy must be 'auto', 'stream' or 'spill', got {strategy!r}")
        self._path = Path(path)
        self._batch_rows = batch_rows
        self._max_rows = max_cycle_rows
        self._min_rows = min_cycle_rows
        self._strategy: Strategy = strategy
        self._budget = memory_budget
        self._spill_dir = _default_spill_dir() if spill_dir is None else os.fspath(spill_dir)
        self._runs_cache: _Runs | None = None
        self._rate: float | None = None
        self._rate_known = False
        self._damage: dict[int, str] = {}
        self._bad_columns: dict[tuple[int, str], str] = {}  # (row group, column) -> decode error or ""
        self._col_bytes_cache: dict[str, int] | None = None
        self._rejections = RejectStats()
        self._closed = False
        self._pf = _open_parquet(self._path)
        try:
            _check_layout(self._path, self._pf)
        except (
            pa.ArrowException,
            OSError,
            UnicodeDecodeError,
        ) as err:  # a footer that does not hold together
            self._pf.close()
            raise VorausFormatError(f"{self._path}: unreadable footer ({_one_line(err)})") from err
        except BaseException:
            self._pf.close()
            raise

    # -- properties -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def num_rows(self) -> int:
        return int(self._pf.metadata.num_rows)

    @property
    def row_groups(self) -> int:
        return int(self._pf.metadata.num_row_groups)

    @property
    def signal_names(self) -> tuple[str, ...]:
        return self._signals

    @property
    def rejections(self) -> RejectStats:
        """Rejections of the latest (or running) :meth:`cycles` pass."""
        return self._rejections

    @property
    def rate_hz(self) -> int | None:
        """Nominal sampling rate: the measured rate snapped to a published rate (100, 500 Hz) within
        ``schema.RATE_TOLERANCE``, else rounded to whole Hz; None if undeterminable."""
        measured = self.measured_rate_hz
        return None if measured is None else schema.nominal_rate(measured)

    @property
    def measured_rate_hz(self) -> float | None:
        """1 / median time step within the first cycles (e.g. 99.3 for a published 100 Hz file)."""
        if not self._rate_known:
            self._rate = self._estimate_rate()
            self._rate_known = True
        return self._rate

    @property
    def damaged_row_group_count(self) -> int:
        """How many row groups were found damaged so far (safe to read from another thread)."""
        return len(self._damage)

    @property
    def damaged_row_groups(self) -> dict[int, str]:
        """Row groups found damaged by any read so far (row group index -> what failed)."""
        return dict(sorted(self._damage.items()))

    @property
    def strategy(self) -> Literal["stream", "spill"]:
        """How :meth:`cycles` reads: directly or through a temporary column-major copy."""
        if self._strategy != "auto":
            return self._strategy
        columns = [*_CYCLE_META, *self._signals]
        return "stream" if self._group_bytes(columns) <= self._budget else "spill"

    # -- context manager --------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        self._pf.close()

    def __enter__(self) -> VorausReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------------

    def cycles(self) -> Iterator[Cycle]:
        """Yield every valid cycle in file order; reject the others into :attr:`rejections`.

        Each call starts a fresh pass and resets :attr:`rejections`.
        """
        self._rejections = RejectStats()
        runs = self._runs()
        columns = [*_CYCLE_META, *self._signals]
        blocks = self._stream_blocks(columns) if self.strategy == "stream" else self._spill_blocks(columns)
        try:
            yield from self._assemble(blocks, runs)
        finally:
            blocks.close()

    def replay(
        self,
        speed: float = 1.0,
        *,
        clock: Callable[[], float] = _time.monotonic,
        sleep: Callable[[float], None] = _time.sleep,
    ) -> Iterator[Cycle]:
        """Yield cycles paced in real time: each when it would have finished recording.

        Cycle k is due at (duration_0 + ... + duration_k) / speed after the start; ``speed=math.inf``
        disables pacing.
        """
        if not speed > 0:  # also catches NaN
            raise ValueError(f"speed must be > 0, got {speed}")
        return self._paced(speed, clock, sleep)

    def _paced(
        self, speed: float, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> Iterator[Cycle]:
        start = clock()
        due = 0.0
        for cycle in self.cycles():
            due += cycle.duration_s
            if math.isfinite(speed):
                wait = start + due / speed - clock()
                if wait > 0:
                    sleep(wait)
            yield cycle

    def meta(self) -> pd.DataFrame:
        """One row per contiguous run of a ``sample`` id (a cycle), from the meta columns only.

        Columns: sample, anomaly, category, setting, rows, t_start, t_end, category_name,
        variant_name, split ('train'/'test') and problem (a reason code from meta-level checks, or '').
        A split cycle gives one row per run, each with problem 'split_cycle'.
        """
        runs = self._runs()
        nr = len(runs)
        t_first = np.full(nr, np.nan)
        t_last = np.full(nr, np.nan)
        n_nan = np.zeros(nr, np.int64)
        n_inf = np.zeros(nr, np.int64)
        n_back = np.zeros(nr, np.int64)
        n_null = runs.sample_nulls.copy()
        first = {c: np.zeros(nr, np.int64) for c in _CONSTANT_META}
        lo = {c: np.full(nr, np.iinfo(np.int64).max) for c in _CONSTANT_META}
        hi = {c: np.full(nr, np.iinfo(np.int64).min) for c in _CONSTANT_META}
        ends = runs.end
        lost = runs.damaged != ""
        for group in self._column_groups(_CYCLE_META):
            g0 = 0
            prev_time: float | None = None
            for batch in self._batches(group):
                if isinstance(batch, _Damage):
                    r0, r1, _ = runs.segments(batch.start, batch.n)
                    lost[r0:r1] = True
                    g0 = batch.stop
                    prev_time = None
                    continue
                n = batch.num_rows
                if n == 0:
                    continue
                r0, r1, seg = runs.segments(g0, n)
                starts_here = runs.start[r0:r1] >= g0
                ends_here = ends[r0:r1] <= g0 + n
                for name in group:
                    nulls: dict[str, np.ndarray] = {}
                    x = _fill_nulls(batch.column(name), name, nulls)
                    if nulls:
                        n_null[r0:r1] += np.add.reduceat(nulls[name], seg, dtype=np.int64)
                    if name == "time":
                        t_first[r0:r1][starts_here] = x[seg[starts_here]]
                        t_last[r0:r1][ends_here] = x[ends[r0:r1][ends_here] - 1 - g0]
                        n_nan[r0:r1] += np.add.reduceat(np.isnan(x), seg, dtype=np.int64)
                        n_inf[r0:r1] += np.add.reduceat(np.isinf(x), seg, dtype=np.int64)
                        back = np.diff(x, prepend=x[0] if prev_time is None else prev_time) <= 0
                        back[seg[starts_here]] = False
                        n_back[r0:r1] += np.add.reduceat(back, seg, dtype=np.int64)
                        prev_time = float(x[-1])
                    elif name in _CONSTANT_META:
                        xi = x.astype(np.int64, copy=False)
                        first[name][r0:r1][starts_here] = xi[seg[starts_here]]
                        lo[name][r0:r1] = np.minimum(lo[name][r0:r1], np.minimum.reduceat(xi, seg))
                        hi[name][r0:r1] = np.maximum(hi[name][r0:r1], np.maximum.reduceat(xi, seg))
                g0 += n

        inconsistent = np.zeros(nr, bool)
        for c in _CONSTANT_META:
            inconsistent |= lo[c] != hi[c]
        category = first["category"]
        unknown = ~np.isin(category, np.fromiter(_KNOWN_CATEGORIES, np.int64))
        checks = [
            (DAMAGED_ROW_GROUP, lost),
            (SPLIT_CYCLE, runs.split),
            (TOO_LONG, runs.length > self._max_rows),
            (TOO_SHORT, runs.length < self._min_rows),
            (NULL, n_null > 0),
            (INCONSISTENT_META, inconsistent),
            (UNKNOWN_CATEGORY, unknown),
            (NAN, n_nan > 0),
            (INF, n_inf > 0),
            (NON_MONOTONIC_TIME, n_back > 0),
        ]
        problem = np.full(nr, "", dtype=object)
        for reason, mask in reversed(checks):  # the first applicable reason wins
            problem[mask] = reason
        anomaly = first["anomaly"].astype(bool)
        setting = first["setting"]
        train = ~anomaly & (setting == int(schema.TRAIN_VARIANT))
        cat_names = {int(v): schema.category_name(int(v)) for v in np.unique(category)}
        var_names = {int(v): schema.variant_name(int(v)) for v in np.unique(setting)}
        return pd.DataFrame(
            {
                "sample": runs.sample,
                "anomaly": anomaly,
                "category": category,
                "setting": setting,
                "rows": runs.length,
                "t_start": t_first,
                "t_end": t_last,
                "category_name": [cat_names[int(v)] for v in category],
                "variant_name": [var_names[int(v)] for v in setting],
                "split": np.where(train, "train", "test").astype(object),
                "problem": problem,
            }
        )

    # -- internals: file access -------------------------------------------------------------------

    def _batches(
        self, columns: Sequence[str], batch_rows: int | None = None
    ) -> Iterator[pa.RecordBatch | _Damage]:
        """Record batches of some columns, row group by row group, in file order. The rows of a row
        group that cannot be decoded (from the first failing batch on) come as one :class:`_Damage`."""
        if self._closed:
            raise ValueError(f"{self._path}: the reader is closed")
        md = self._pf.metadata
        g = 0
        for i in range(md.num_row_groups):
            expected = md.row_group(i).num_rows
            done = 0
            try:
                for batch in self._pf.iter_batches(
                    batch_size=batch_rows or self._batch_rows,
                    row_groups=[i],
                    columns=list(columns),
                    use_threads=True,
                ):
                    if done + batch.num_rows > expected:
                        raise _RowCountMismatch(f"more rows than the {expected} of the footer")
                    done += batch.num_rows
                    yield batch
                if done != expected:
                    raise _RowCountMismatch(f"{done} rows, the footer says {expected}")
            except (pa.ArrowException, OSError, _RowCountMismatch) as err:
                where = f"rows {g}..{g + expected - 1}" if expected else "no rows"
                bad = self._failing_columns(i, columns)
                what = _names_detail(list(bad or columns))
                why = self._bad_columns[(i, bad[0])] if bad else _one_line(err)
                detail = f"row group {i} ({where}): cannot decode {what}: {why}"
                self._damage.setdefault(i, detail)
                if done < expected:
                    yield _Damage(g + done, g + expected, i, detail)
            g += expected

    def _failing_columns(self, i: int, columns: Sequence[str]) -> list[str]:
        """Which of ``columns`` cannot be decoded in row group ``i`` (each tried alone, once)."""
        for c in columns:
            if (i, c) in self._bad_columns:
                continue
            try:
                for _ in self._pf.iter_batches(batch_size=self._batch_rows, row_groups=[i], columns=[c]):
                    pass
                self._bad_columns[(i, c)] = ""
            except (pa.ArrowException, OSError) as err:
                self._bad_columns[(i, c)] = _one_line(err)
        return [c for c in columns if self._bad_columns[(i, c)]]

    def _col_bytes(self) -> dict[str, int]:
        """Largest uncompressed column chunk of each column over row groups (bytes)."""
        if self._col_bytes_cache is None:
            md = self._pf.metadata
            names = [md.schema.column(j).name for j in range(md.num_columns)]
            sizes = dict.fromkeys(names, 0)
            for i in range(md.num_row_groups):
                rg = md.row_group(i)
                for j, name in enumerate(names):
                    sizes[name] = max(sizes[name], rg.column(j).total_uncompressed_size)
            self._col_bytes_cache = sizes
        return self._col_bytes_cache

    def _group_bytes(self, columns: Sequence[str]) -> int:
        sizes = self._col_bytes()
        return sum(sizes.get(c, 0) for c in columns)

    def _column_groups(self, columns: Sequence[str]) -> list[list[str]]:
        """Split columns into groups whose column chunks fit the memory budget together."""
        sizes = self._col_bytes()
        groups: list[list[str]] = [[]]
        used = 0
        for c in columns:
            if groups[-1] and used + sizes.get(c, 0) > self._budget:
                groups.append([])
                used = 0
            groups[-1].append(c)
            used += sizes.get(c, 0)
        return groups

    def _runs(self) -> _Runs:
        """Pre-scan of ``sample``: contiguous runs, split ids (cached; the column is small)."""
        if self._runs_cache is not None:
            return self._runs_cache
        starts: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        null_rows: list[np.ndarray] = []
        lost: list[_Damage] = []  # rows whose sample ids are unknown
        prev: int | None = None
        g = 0
        for batch in self._batches(["sample"]):
            if isinstance(batch, _Damage):  # one run of unknown id; the next batch starts a new run
                starts.append(np.array([batch.start], np.int64))
                ids.append(np.array([_UNKNOWN_ID + len(lost)], np.int64))
                lost.append(batch)
                prev = None
                g += batch.n
                continue
            arr = batch.column(0)
            if len(arr) == 0:
                continue
            if arr.null_count:
                null_rows.append(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)) + g)
                arr = pc.fill_null_forward(arr)
                if arr.null_count:  # leading nulls: take the previous batch's last id, or the next one
                    arr = pc.fill_null(arr, prev) if prev is not None else pc.fill_null_backward(arr)
                if arr.null_count:  # the whole batch is null at the start of the file
                    arr = pc.fill_null(arr, -1)
            s = arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            local = np.flatnonzero(np.diff(s)) + 1
            if prev is None or s[0] != prev:
                local = np.concatenate(([0], local))
            starts.append(local + g)
            ids.append(s[local])
            prev = int(s[-1])
            g += len(s)
        start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        sample = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        length = np.diff(np.append(start, g))
        nr = len(start)
        if null_rows:
            idx = np.searchsorted(start, np.concatenate(null_rows), side="right") - 1
            sample_nulls = np.bincount(idx, minlength=nr).astype(np.int64)
        else:
            sample_nulls = np.zeros(nr, np.int64)
        _, first_idx, inverse, counts = np.unique(
            sample, return_index=True, return_inverse=True, return_counts=True
        )
        first_of_id = np.zeros(nr, bool)
        first_of_id[first_idx] = True
        inverse = inverse.reshape(-1).astype(np.int64)
        unknown_id, damaged = _lost_runs(start, inverse, lost)
        self._runs_cache = _Runs(
            sample=sample,
            start=start,
            length=length,
            sample_nulls=sample_nulls,
            split=counts[inverse] > 1,
            first_of_id=first_of_id,
            id_index=inverse,
            id_offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            id_order=np.argsort(inverse, kind="stable").astype(np.int64),
            damaged=damaged,
            unknown_id=unknown_id,
        )
        return self._runs_cache

    def _estimate_rate(self) -> float | None:
        steps: list[np.ndarray] = []
        have = 0
        prev_s: int | None = None
        prev_t = math.nan
        for batch in self._batches(["sample", "time"], batch_rows=max(self._batch_rows, 4096)):
            if isinstance(batch, _Damage):
                prev_s = None
                continue
            s = pc.fill_null(batch.column(0), -1).to_numpy(zero_copy_only=False)
            t = pc.fill_null(batch.column(1), math.nan).to_numpy(zero_copy_only=False)
            if len(s) == 0:
                continue
            if prev_s is not None:
                s = np.concatenate(([prev_s], s))
                t = np.concatenate(([prev_t], t))
            prev_s, prev_t = int(s[-1]), float(t[-1])
            d = np.diff(t)[(s[1:] == s[:-1]) & (s[1:] >= 0)]
            d = d[np.isfinite(d) & (d > 0)]
            steps.append(d)
            have += d.size
            if have >= 2_000:
                break
        if not have:
            return None
        rate = 1.0 / float(np.median(np.concatenate(steps)))
        return rate if math.isfinite(rate) else None

    def _stream_blocks(self, columns: Sequence[str]) -> Generator[_Block, None, None]:
        g = 0
        for batch in self._batches(columns):
            if isinstance(batch, _Damage):
                yield _Block.lost(batch.start, batch.n, batch.detail)
                g = batch.stop
                continue
            n = batch.num_rows
            nulls: dict[str, np.ndarray] = {}
            meta = {c: _fill_nulls(batch.column(c), c, nulls) for c in _CYCLE_META}
            sig_cols = [batch.column(c) for c in self._signals]
            for name, arr in zip(self._signals, sig_cols, strict=True):
                if arr.null_count:
                    nulls[name] = arr.is_null().to_numpy(zero_copy_only=False)
            yield _Block(g, meta, _to_matrix(sig_cols, self._signals, n), nulls)
            g += n

    def _spill_blocks(self, columns: Sequence[str]) -> Generator[_Block, None, None]:
        """Copy the columns a budget-sized group at a time into a temporary file, then read blocks."""
        dtypes = {c: schema.META_DTYPES.get(c, schema.SIGNAL_DTYPE) for c in columns}
        spill = _SpillFile(dtypes, self.num_rows, self._spill_dir)
        damage: list[_Damage] = []
        try:
            for group in self._column_groups(columns):
                g = 0
                for batch in self._batches(group):
                    if isinstance(batch, _Damage):  # its rows stay zeros in the spill file
                        damage.append(batch)
                        g = batch.stop
                        continue
                    for name in group:
                        nulls: dict[str, np.ndarray] = {}
                        values = _fill_nulls(batch.column(name), name, nulls)
                        if nulls:
                            spill.write_nulls(name, g, nulls[name])
                        spill.write(name, g, values.astype(dtypes[name], copy=False))
                    g += batch.num_rows
            damage = _merge_damage(damage)
            for g0 in range(0, self.num_rows, self._batch_rows):
                for g, g1, detail in _cut(g0, min(g0 + self._batch_rows, self.num_rows), damage):
                    n = g1 - g
                    if detail:
                        yield _Block.lost(g, n, detail)
                        continue
                    meta = {c: spill.read(c, g, n) for c in _CYCLE_META}
                    sig_cols = [spill.read(c, g, n) for c in self._signals]
                    yield _Block(g, meta, _to_matrix(sig_cols, self._signals, n), spill.read_nulls(g, n))
        finally:
            spill.close()

    # -- internals: cycles ------------------------------------------------------------------------

    def _assemble(self, blocks: Iterator[_Block], runs: _Runs) -> Iterator[Cycle]:
        """Cut blocks into runs, check each complete run and yield it as a Cycle or reject it."""
        # Runs rejected from the pre-scan alone are never buffered (codes: 0 read, see _skipped()).
        skip = np.zeros(len(runs), np.int8)
        skip[runs.length < self._min_rows] = _SKIP_SHORT
        skip[runs.length > self._max_rows] = _SKIP_LONG
        skip[runs.split] = _SKIP_SPLIT_LATER
        skip[runs.split & runs.first_of_id] = _SKIP_SPLIT
        lost = runs.damaged != ""
        skip[lost] = _SKIP_DAMAGED_LATER
        skip[lost & runs.first_of_id] = _SKIP_DAMAGED
        nr = len(runs)
        r = 0
        pieces: list[_Block] = []
        for blk in blocks:
            g0, g1 = blk.start, blk.start + blk.n
            while r < nr and runs.start[r] < g1:
                start, end = int(runs.start[r]), int(runs.start[r] + runs.length[r])
                if not skip[r]:
                    pieces.append(blk.slice(max(start, g0) - g0, min(end, g1) - g0))
                if end > g1:
                    break
                if skip[r]:
                    rejection = self._skipped(runs, r, int(skip[r]))
                    if rejection is not None:
                        self._rejections.add(rejection)
                else:
                    result = self._build(int(runs.sample[r]), pieces, int(runs.sample_nulls[r]))
                    if isinstance(result, Rejection):
                        self._rejections.add(result)
                    else:
                        yield result
                pieces = []
                r += 1

    def _skipped(self, runs: _Runs, r: int, code: int) -> Rejection | None:
        """The rejection of a run refused from the pre-scan (None for later runs of a split id)."""
        sid, length = int(runs.sample[r]), int(runs.length[r])
        if code == _SKIP_DAMAGED:
            return Rejection(None if runs.unknown_id[r] else sid, DAMAGED_ROW_GROUP, str(runs.damaged[r]))
        if code == _SKIP_SPLIT:
            where = runs.runs_of_id(r)
            shown = ", ".join(f"{runs.start[k]}..{runs.start[k] + runs.length[k] - 1}" for k in where[:5])
            return Rejection(
                sid, SPLIT_CYCLE, f"sample {sid} occurs in {len(where)} separate runs (rows {shown})"
            )
        if code == _SKIP_LONG:
            return Rejection(sid, TOO_LONG, f"{length} rows, more than max_cycle_rows={self._max_rows}")
        if code == _SKIP_SHORT:
            return Rejection(sid, TOO_SHORT, f"{length} row(s), fewer than min_cycle_rows={self._min_rows}")
        return None

    def _build(self, sample: int, pieces: list[_Block], sample_nulls: int) -> Cycle | Rejection:
        """Check the rows of one cycle; return the Cycle or why it is rejected."""
        lost = next((p.damaged for p in pieces if p.damaged), "")
        if lost:
            return Rejection(sample, DAMAGED_ROW_GROUP, lost)
        meta = {c: _cat([p.meta[c] for p in pieces]) for c in _CYCLE_META}
        signals = _cat([p.signals for p in pieces])
        time = meta["time"]
        n = time.shape[0]

        null_cols = {c for p in pieces for c, mask in p.nulls.items() if mask.any()}
        if null_cols or sample_nulls:
            any_null = np.zeros(n, bool)
            named = ["sample"] if sample_nulls else []
            for c in (*_CYCLE_META, *self._signals):
                if c in null_cols:
                    any_null |= np.concatenate([p.nulls.get(c, np.zeros(p.n, bool)) for p in pieces])
                    named.append(c)
            rows = max(int(any_null.sum()), sample_nulls)
            return Rejection(sample, NULL, f"nulls in {_names_detail(named)} ({rows} row(s))")

        varying = []
        for c in _CONSTANT_META:
            values = meta[c]
            if (values != values[0]).any():
                found = np.unique(values)
                shown = ", ".join(str(v) for v in found[:_MAX_NAMES].tolist())
                varying.append(f"{c} takes {len(found)} values ({shown})")
        if varying:
            return Rejection(sample, INCONSISTENT_META, "; ".join(varying))

        category = int(meta["category"][0])
        if category not in _KNOWN_CATEGORIES:
            return Rejection(
                sample,
                UNKNOWN_CATEGORY,
                f"category {category} is not a published category "
                f"({min(_KNOWN_CATEGORIES)}..{max(_KNOWN_CATEGORIES)})",
            )

        if not (np.isfinite(signals).all() and np.isfinite(time).all()):
            for reason, test in ((NAN, np.isnan), (INF, np.isinf)):
                bad_sig = test(signals)
                bad_time = test(time)
                if bad_sig.any() or bad_time.any():
                    named = (["time"] if bad_time.any() else []) + [
                        self._signals[j] for j in np.flatnonzero(bad_sig.any(axis=0))
                    ]
                    rows = int((bad_sig.any(axis=1) | bad_time).sum())
                    return Rejection(sample, reason, f"{reason} in {_names_detail(named)} ({rows} row(s))")

        back = np.flatnonzero(np.diff(time) <= 0)
        if back.size:
            i = int(back[0])
            return Rejection(
                sample,
                NON_MONOTONIC_TIME,
                f"time does not increase at {back.size} row(s); first at row {i + 1} of the cycle: "
                f"{time[i]:.6g} then {time[i + 1]:.6g}",
            )

        return Cycle(
            sample=sample,
            anomaly=bool(meta["anomaly"][0]),
            category=category,
            setting=int(meta["setting"][0]),
            time=time,
            action=meta["action"],
            active=meta["active"],
            signals=signals,
            signal_names=self._signals,
        )


def _names_detail(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    more = f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
    return f"{len(names)} column(s): {shown}{more}"


def _lost_runs(start: np.ndarray, id_index: np.ndarray, lost: list[_Damage]) -> tuple[np.ndarray, np.ndarray]:
    """Runs lost to unreadable ``sample`` chunks: (unknown_id, damaged detail) per run.

    The rows of each unreadable chunk are one run of unknown id. The runs just before and after it
    may continue into those rows, so their cycles are lost too, and so is every run of a lost id.
    """
    nr = len(start)
    unknown = np.zeros(nr, bool)
    damaged = np.full(nr, "", dtype=object)
    if not lost:
        return unknown, damaged
    at = [int(np.searchsorted(start, d.start)) for d in lost]
    for r, d in zip(at, lost, strict=True):
        unknown[r] = True
        damaged[r] = f"{d.detail} (sample ids unknown)"
    for r, d in zip(at, lost, strict=True):
        for k in (r - 1, r + 1):
            if 0 <= k < nr and not damaged[k]:
                damaged[k] = f"may continue into {d.detail}"
    first_detail: dict[int, str] = {}
    for j in np.flatnonzero(damaged != "").tolist():
        first_detail.setdefault(int(id_index[j]), str(damaged[j]))
    same_id = np.isin(id_index, np.fromiter(first_detail, np.int64)) & (damaged == "")
    for j in np.flatnonzero(same_id).tolist():
        damaged[j] = first_detail[int(id_index[j])]
    return unknown, damaged


# --------------------------------------------------------------------------------------------------
# opening and validating


def _default_spill_dir() -> str | None:
    """$TMPDIR if set, else /var/tmp (on disk, where /tmp may be RAM-backed tmpfs), else the default."""
    if os.environ.get("TMPDIR"):
        return None
    if os.path.isdir(_DISK_TMP) and os.access(_DISK_TMP, os.W_OK):
        return _DISK_TMP
    return None


def _check_signals(signals: Sequence[str] | str) -> tuple[str, ...]:
    names = schema.signal_group(signals) if isinstance(signals, str) else tuple(signals)
    unknown = [s for s in names if s not in _MACHINE_SET]
    if unknown:
        hints = []
        for s in unknown[:_MAX_NAMES]:
            close = difflib.get_close_matches(s, schema.MACHINE_SIGNALS, n=1)
            hints.append(f"{s!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        more = f" and {len(unknown) - _MAX_NAMES} more" if len(unknown) > _MAX_NAMES else ""
        raise ValueError(f"unknown machine signal(s): {', '.join(hints)}{more}")
    dups = sorted({s for s in names if names.count(s) > 1})
    if dups:
        raise ValueError(f"signal(s) requested more than once: {_quote_list(dups)}")
    return names


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise VorausFormatError(f"{path}: no such file")
    if path.is_dir():
        raise VorausFormatError(f"{path}: is a directory, expected a parquet file")
    try:
        # pre_buffer=False: never read a whole row group ahead. buffer_size=0: each column chunk is read
        # in one piece (the budget is counted in chunk bytes); a buffered stream would add a copy of
        # every page, and fastparquet's pages are whole chunks. Page checksums, where the writer
        # stored them, are verified: a damaged page then fails its row group instead of giving wrong values.
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=0, page_checksum_verification=True)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:  # found by fuzzing: non-UTF-8 names
        raise VorausFormatError(f"{path}: not a parquet file ({_one_line(err)})") from err


def _index_columns(arrow_schema: pa.Schema) -> set[str]:
    """Columns that only hold a pandas index: ``index`` and any declared in the pandas metadata."""
    names = {schema.OPTIONAL_INDEX_COLUMN}
    raw = (arrow_schema.metadata or {}).get(b"pandas")
    if raw:
        try:
            declared = json.loads(raw).get("index_columns", [])
        except (ValueError, AttributeError):
            declared = []
        names.update(c for c in declared if isinstance(c, str))
    return names


def _check_layout(path: Path, pf: pq.ParquetFile) -> None:
    """Raise VorausFormatError unless columns and dtypes are the voraus-AD layout and rows exist."""
    arrow_schema = pf.schema_arrow
    names = list(arrow_schema.names)
    problems = []
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        problems.append(f"duplicate column(s): {_quote_list(dups)}")
    present = set(names)
    missing = [c for c in schema.ALL_COLUMNS if c not in present]
    extra = [c for c in names if c not in _ALL_SET and c not in _index_columns(arrow_schema)]
    if missing:
        problems.append(f"missing column(s): {_quote_list(missing)}")
    for c in extra[:_MAX_NAMES]:
        close = difflib.get_close_matches(c, missing, n=1)
        problems.append(f"unexpected column {c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if len(extra) > _MAX_NAMES:
        problems.append(f"{len(extra) - _MAX_NAMES} more unexpected column(s)")
    wrong = []
    for c in schema.ALL_COLUMNS:
        if c not in present or c in dups:
            continue
        expected = schema.META_DTYPES.get(c, schema.SIGNAL_DTYPE)
        found = arrow_schema.field(c).type
        if found != pa.from_numpy_dtype(expected):
            wrong.append(f"column {c!r} has dtype {_type_name(found)}, expected {expected.name}")
    problems.extend(wrong[:_MAX_NAMES])
    if len(wrong) > _MAX_NAMES:
        problems.append(f"{len(wrong) - _MAX_NAMES} more column(s) with a wrong dtype")
    if problems:
        raise VorausFormatError(f"{path}: not in the voraus-AD layout: {'; '.join(problems)}")
    md = pf.metadata
    if md.num_rows == 0:
        raise VorausFormatError(f"{path}: the file has no rows (expected stacked cycles)")
    in_groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    if md.num_rows < 0 or min(in_groups, default=0) < 0 or sum(in_groups) != md.num_rows:
        raise VorausFormatError(
            f"{path}: damaged footer: {md.num_rows} rows in all but {sum(in_groups)} "
            f"in its {md.num_row_groups} row group(s)"
        )
