"""``cellwatch capture decode FILE --map MAP [--out OUT.parquet|OUT.csv] [--json]``: an EtherCAT capture
(pcap or pcapng, as dumpcap, tshark or Wireshark write them) as named signals in SI units.

One row per bus cycle: each occurrence of the datagram that holds the map's first signal (the returned
copy where the capture holds both copies of a frame), not resampled. Columns: ``time_ns`` (the frame's
capture time, int64 ns since the epoch), then every mapped signal in map order (float64, raw * scale +
offset; the cycle counter too; NaN until a signal's datagram was first seen), then ``stale`` (bool: a
datagram of the row came back with a short working counter, so some slave's inputs there are old).

``--out`` writes the rows to a Parquet file (``.parquet``/``.pq``, one row group per chunk of the capture:
memory stays bounded however long the capture) or a CSV file (``.csv``, with a header line). The file
appears when decoding is done (written under a temporary name next to it until then). Without ``--out``
the first bus cycles are shown as a table (time and the first few signals) under the summary.

The summary says what the capture held: records read, EtherCAT frames (each once: outgoing copies are
dropped and counted apart), datagrams by command, mailbox datagrams skipped, bus cycles, stale ones,
lost bus cycles and gaps (a capture-time step over 1.5 bus periods is a gap; the bus cycles missing
there, by the measured period, are lost), the measured bus period and its jitter, and the records
rejected by reason (by the capture reader and the frame decoder), with the map's signals and the map
entries left out. ``--json`` prints it on stdout as one JSON object and nothing else (file, format,
map, signals, map_skipped, map_skipped_entries, records, frames, datagrams {command: n},
outgoing_copies, mailbox, not_ethercat, other_frame_type, bus_cycles, stale, stale_datagrams, lost,
gaps, backwards, bus_period_ns, jitter_ns, first_ns, last_ns, rejections {reason: n}, out); a
progress bar goes to stderr for long captures.

Exit status 2, with the reason on one line: FILE is not a capture, MAP cannot be used (the message
names the entry), or the capture's datagrams do not hold the map's signals (checked on the first frames
that carry process data, the bus's start-up register traffic aside; a capture with no process data at
all cannot hold them either).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from daemon.cli_support import UsageError, console, progress
from ingest.errors import IngestError

if TYPE_CHECKING:
    from ingest.ethercat.mapping import ProcessMap
    from ingest.ethercat.types import DatagramKey

log = logging.getLogger("cellwatch.capture")

CHUNK_RECORDS: Final = 16384  # records decoded at a time: rows of a chunk are ~1 MiB per 16 signals
MAX_KEYS: Final = 4096  # datagram keys gathered for the coverage check (garbage must not grow it)
PROGRESS_BYTES: Final = 32 << 20  # captures from this size on show a progress bar on stderr
GAP_PERIODS: Final = 1.5  # a capture-time step over this many bus periods is a gap
PREVIEW_ROWS: Final = 5
PREVIEW_SIGNALS: Final = 4
SUFFIXES: Final = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
TIME_COLUMN: Final = "time_ns"
STALE_COLUMN: Final = "stale"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("capture", help="EtherCAT bus captures (pcap/pcapng): decode them into named signals")
    actions = p.add_subparsers(dest="capture_action", metavar="ACTION", required=True)
    d = actions.add_parser(
        "decode",
        help="decode a capture into one row per bus cycle of named SI signals (Parquet or CSV) and a summary",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("file", metavar="FILE", type=Path, help="the capture (pcap or pcapng)")
    d.add_argument(
        "--map", required=True, type=Path, metavar="MAP", help="the process map: a YAML map or an ENI file"
    )
    d.add_argument(
        "--out", type=Path, metavar="OUT", help="write the rows to OUT.parquet (or .pq) or OUT.csv"
    )
    d.add_argument("--json", action="store_true", help="print the summary on stdout as one JSON object")
    d.set_defaults(func=run)


# ------------------------------------------------------------------------------------------ bus clock


class BusClock:
    """The bus clock as the capture times of the bus cycles show it: the period (the median step of a
    chunk), the jitter (99th percentile of |step - period| over the steps that are not gaps), gaps (steps
    over GAP_PERIODS periods) and the bus cycles lost in them (step / period - 1, rounded), steps back in
    time (`backwards`: a merged or reordered capture). Steps are judged a chunk at a time (at least 64
    steps, all of a chunk): memory stays bounded, and a bus whose period changes is measured as it goes."""

    MIN_STEPS: Final = 64

    def __init__(self) -> None:
        self.last: int | None = None
        self.lost = 0
        self.gaps = 0
        self.backwards = 0
        self.period: float | None = None  # of the latest chunk
        self._periods: list[float] = []
        self._jitters: list[float] = []
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    def push(self, ts: np.ndarray) -> None:
        if not len(ts):
            return
        ts = np.asarray(ts, dtype=np.int64)
        steps = np.diff(ts) if self.last is None else np.diff(ts, prepend=self.last)
        self.last = int(ts[-1])
        self.backwards += int(np.count_nonzero(steps < 0))
        positive = steps[steps > 0]
        self._pending.append(positive)
        self._pending_n += len(positive)
        if self._pending_n >= self.MIN_STEPS:
            self._judge()

    def finish(self) -> None:
        if self._pending_n:
            self._judge()

    def _judge(self) -> None:
        steps = np.concatenate(self._pending).astype(np.float64)
        self._pending, self._pending_n = [], 0
        if len(steps) >= 2:
            self.period = float(np.median(steps))
            self._periods.append(self.period)
        if self.period is None:
            return  # a single step in the whole capture: no period to judge it by
        big = steps > GAP_PERIODS * self.period
        self.gaps += int(np.count_nonzero(big))
        self.lost += int(np.maximum(np.rint(steps[big] / self.period) - 1, 0).sum())
        regular = steps[~big]
        if len(regular):
            self._jitters.append(float(np.percentile(np.abs(regular - self.period), 99)))

    @property
    def period_ns(self) -> float | None:
        """The measured bus period: the median of the chunks' medians."""
        return float(np.median(self._periods)) if self._periods else None

    @property
    def jitter_ns(self) -> float | None:
        """The bus jitter: the worst chunk's 99th percentile of |step - period|."""
        return max(self._jitters) if self._jitters else None


# ------------------------------------------------------------------------------------------ output


class RowWriter(Protocol):
    def write(self, ts: np.ndarray, values: np.ndarray, stale: np.ndarray) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class TableWriter:
    """Rows to a Parquet or CSV file, a chunk at a time, under a temporary name until `close()` (then
    renamed onto `path`); `abort()` removes the temporary file."""

    def __init__(self, path: Path, kind: str, names: tuple[str, ...], metadata: dict[str, str]) -> None:
        import pyarrow as pa

        self.path = path
        self.kind = kind
        self.rows = 0
        fields = [pa.field(TIME_COLUMN, pa.int64()), *(pa.field(n, pa.float64()) for n in names)]
        self.schema = pa.schema([*fields, pa.field(STALE_COLUMN, pa.bool_())], metadata=metadata)
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            if kind == "parquet":
                import pyarrow.parquet as pq

                self._writer: Any = pq.ParquetWriter(self.tmp, self.schema)
            else:
                import pyarrow.csv as pacsv

                self._writer = pacsv.CSVWriter(self.tmp, self.schema)
        except OSError as err:
            raise UsageError(f"--out {path}: cannot be written: {err.strerror or err}") from err

    def write(self, ts: np.ndarray, values: np.ndarray, stale: np.ndarray) -> None:
        import pyarrow as pa

        if not len(ts):
            return
        columns = np.ascontiguousarray(values.T)  # each signal's column contiguous: arrays without copies
        arrays = [pa.array(ts, pa.int64()), *(pa.array(c, pa.float64()) for c in columns)]
        arrays.append(pa.array(stale, pa.bool_()))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += len(ts)

    def close(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


# ------------------------------------------------------------------------------------------ decoding


def output_kind(out: Path) -> str:
    kind = SUFFIXES.get(out.suffix.lower())
    if kind is None:
        shown = out.suffix or "no suffix"
        raise UsageError(f"--out {out}: {shown} is not an output format: name it .parquet (or .pq) or .csv")
    return kind


def _check_names(pmap: ProcessMap) -> None:
    for name in (TIME_COLUMN, STALE_COLUMN):
        if name in pmap.names:
            raise UsageError(
                f"{pmap.source}: signal {name!r}: the output has a column of that name already: rename it"
            )


def decode(
    capture: Path,
    pmap: ProcessMap,
    *,
    writer: RowWriter | None = None,
    preview: int = 0,
    on_progress: Callable[[int], None] | None = None,
    chunk_records: int | None = None,
) -> tuple[dict[str, Any], list[tuple[int, np.ndarray, bool]]]:
    """Decode `capture` with `pmap`: the rows to `writer`, returns the summary and the first `preview`
    rows (time_ns, values, stale). `on_progress(bytes)`: about how far into the file it got. Raises
    UsageError when the capture is not one or does not carry the map's signals."""
    from ingest.ethercat.frames import FrameDecoder
    from ingest.ethercat.mapping import MapError, SignalExtractor, check_coverage
    from ingest.ethercat.pcap import CaptureReader
    from ingest.ethercat.types import LOGICAL

    try:
        reader = CaptureReader(capture, chunk_records=chunk_records or CHUNK_RECORDS)
    except IngestError as err:  # CaptureError: not a capture at all, naming the file and why
        raise UsageError(str(err)) from err
    decoder = FrameDecoder(dict(pmap.expected_wkc.items()))
    extractor = SignalExtractor(pmap)
    clock = BusClock()
    header = 16 if reader.format == "pcap" else 32  # bytes before each record (progress estimate)
    seen_bytes = 0
    checked = False
    first_ns: int | None = None
    last_ns: int | None = None
    shown: list[tuple[int, np.ndarray, bool]] = []
    seen: set[DatagramKey] = set()
    missing: MapError | None = None
    try:
        for records in reader.batches():
            frames = decoder.decode(records)
            if not checked and frames.datagrams:
                # the datagrams seen so far must hold the map's signals; until a logical (cyclic process
                # data) datagram came, the capture may still be in the bus's start-up (register reads)
                if len(seen) < MAX_KEYS:
                    seen.update(frames.datagrams)
                try:
                    check_coverage(pmap, seen)
                    checked = True
                except MapError as err:
                    missing = err
                    if any(k.command in LOGICAL for k in seen) or len(seen) >= MAX_KEYS:
                        raise UsageError(
                            f"{capture}: the capture does not carry the map's signals: {err}"
                        ) from err
            if checked:
                rows = extractor.extract(frames)
                if len(rows):
                    if first_ns is None:
                        first_ns = int(rows.ts_ns[0])
                    last_ns = int(rows.ts_ns[-1])
                    clock.push(rows.ts_ns)
                    if writer is not None:
                        writer.write(rows.ts_ns, rows.values, rows.stale)
                    for i in range(min(preview - len(shown), len(rows))):
                        shown.append((int(rows.ts_ns[i]), rows.values[i].copy(), bool(rows.stale[i])))
            if on_progress is not None:
                seen_bytes += int(np.sum(records.lengths, dtype=np.int64)) + header * len(records)
                on_progress(seen_bytes)
    except OSError as err:
        raise UsageError(f"{capture}: cannot be read: {err.strerror or err}") from err
    finally:
        reader.close()
    clock.finish()
    counts = decoder.counts
    rejections = Counter(reader.rejections)
    rejections.update(decoder.rejections)
    if not checked and missing is not None:  # start-up traffic only, never the map's datagrams
        raise UsageError(f"{capture}: the capture does not carry the map's signals: {missing}")
    if not checked:
        what = (
            "it holds no records"
            if not reader.counts["records"]
            else f"none of its {reader.counts['records']:,} records carries process data "
            f"(frames {counts['frames']:,}, mailbox {counts['mailbox']:,}, not EtherCAT "
            f"{counts['not_ethercat']:,}, rejected {rejections.total():,})"
        )
        raise UsageError(f"{capture}: the capture does not carry the map's signals: {what}")
    datagrams = {
        name.removeprefix("datagrams_"): n
        for name, n in sorted(counts.items())
        if name.startswith("datagrams_")
    }
    summary: dict[str, Any] = {
        "file": str(capture),
        "format": reader.format,
        "map": pmap.source,
        "signals": len(pmap.signals),
        "map_skipped": len(pmap.skipped),
        "map_skipped_entries": list(pmap.skipped),
        "records": reader.counts["records"],
        "frames": counts["frames"],
        "datagrams": datagrams,
        "outgoing_copies": counts["outgoing_copy"],
        "mailbox": counts["mailbox"],
        "not_ethercat": counts["not_ethercat"],
        "other_frame_type": counts["other_frame_type"],
        "bus_cycles": extractor.counts["rows"],
        "stale": extractor.counts["stale_rows"],
        "stale_datagrams": counts["stale"],
        "lost": clock.lost,
        "gaps": clock.gaps,
        "backwards": clock.backwards,
        "bus_period_ns": clock.period_ns,
        "jitter_ns": clock.jitter_ns,
        "first_ns": first_ns,
        "last_ns": last_ns,
        "rejections": dict(sorted(rejections.items())),
    }
    return summary, shown


def run(args: argparse.Namespace) -> int:
    from ingest.ethercat.source import load_map

    capture, out = Path(args.file), args.out
    kind = output_kind(out) if out is not None else None
    if out is not None and out.exists() and capture.exists() and out.resolve() == capture.resolve():
        raise UsageError(f"--out {out} is the capture itself: choose another file")
    try:
        pmap = load_map(args.map)
    except OSError as err:
        raise UsageError(f"--map {args.map}: cannot be read: {err.strerror or err}") from err
    except IngestError as err:  # MapError: names the file, the entry and the field
        raise UsageError(str(err)) from err
    _check_names(pmap)
    for warning in pmap.warnings:
        log.warning("%s: %s", pmap.source, warning)
    writer = None
    if out is not None and kind is not None:
        metadata = {"cellwatch.capture": str(capture), "cellwatch.map": str(pmap.source)}
        writer = TableWriter(out, kind, pmap.names, metadata)
    try:
        size = capture.stat().st_size if capture.is_file() else 0
        preview = PREVIEW_ROWS if out is None and not args.json else 0
        if size >= PROGRESS_BYTES:
            mib = max(1, round(size / 2**20))
            with progress() as bar:
                task = bar.add_task(f"decoding {capture.name} (MiB)", total=mib)
                summary, shown = decode(
                    capture,
                    pmap,
                    writer=writer,
                    preview=preview,
                    on_progress=lambda done: bar.update(task, completed=min(done, size) * mib / size),
                )
                bar.update(task, completed=mib)
        else:
            summary, shown = decode(capture, pmap, writer=writer, preview=preview)
        if writer is not None:
            try:
                writer.close()
            except OSError as err:
                raise UsageError(f"--out {out}: cannot be written: {err.strerror or err}") from err
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    summary["out"] = str(out) if out is not None else None
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary, shown, pmap.names)
    return 0


# ------------------------------------------------------------------------------------------ printing


def _time(ns: int | None) -> str:
    if ns is None:
        return "?"
    stamp = dt.datetime.fromtimestamp(ns // 1_000_000_000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp}.{ns % 1_000_000_000:09d}Z"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counts.items()) or "none"


def print_summary(
    s: dict[str, Any], shown: list[tuple[int, np.ndarray, bool]], names: tuple[str, ...]
) -> None:
    """A `decode` summary (and the first rows) as rich tables on stdout."""
    from rich.table import Table

    overview = Table(title=f"{s['file']} ({s['format']})", show_header=False)
    overview.add_column("", style="bold")
    overview.add_column("")
    period, jitter = s["bus_period_ns"], s["jitter_ns"]
    bus = "?" if period is None else f"{period / 1e6:.4g} ms ({1e9 / period:.5g} Hz)"
    skipped = {
        "outgoing copies": s["outgoing_copies"],
        "mailbox": s["mailbox"],
        "not EtherCAT": s["not_ethercat"],
        "other frame types": s["other_frame_type"],
    }
    map_line = f"{s['signals']:,} signals from {s['map']}"
    if s["map_skipped"]:
        map_line += f"; {s['map_skipped']:,} entries left out"
    for key, value in (
        ("records", f"{s['records']:,}"),
        ("frames", f"{s['frames']:,}"),
        ("datagrams", _counts(s["datagrams"])),
        ("skipped", _counts({k: v for k, v in skipped.items() if v})),
        ("bus cycles", f"{s['bus_cycles']:,}, {s['stale']:,} stale"),
        ("lost bus cycles", f"{s['lost']:,} in {s['gaps']:,} gaps"),
        ("bus period", bus),
        ("jitter (p99)", "?" if jitter is None else f"{jitter / 1e3:.1f} µs"),
        ("time range", f"{_time(s['first_ns'])} .. {_time(s['last_ns'])}"),
        ("map", map_line),
        ("rejected records", _counts(s["rejections"])),
    ):
        overview.add_row(key, value)
    if s["backwards"]:
        overview.add_row("steps back in time", f"{s['backwards']:,}")
    console.print(overview)
    if s["out"] is not None:
        console.print(
            f"wrote {s['out']}: {s['bus_cycles']:,} rows, {len(names) + 2} columns",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    for entry in s["map_skipped_entries"][:5]:
        console.print(f"left out of the map: {entry}", markup=False, highlight=False)
    if len(s["map_skipped_entries"]) > 5:
        console.print(f"... and {len(s['map_skipped_entries']) - 5} more (--json lists them all)")
    if not shown:
        return
    rows = Table(title=f"the first {len(shown)} bus cycles")
    rows.add_column(TIME_COLUMN, justify="right", no_wrap=True, min_width=19)
    for name in names[:PREVIEW_SIGNALS]:
        rows.add_column(name, justify="right", overflow="fold")
    rows.add_column(STALE_COLUMN)
    for ts, values, stale in shown:
        rows.add_row(str(ts), *(f"{v:.6g}" for v in values[:PREVIEW_SIGNALS]), "yes" if stale else "")
    console.print(rows)
    if len(names) > PREVIEW_SIGNALS:
        console.print(
            f"... and {len(names) - PREVIEW_SIGNALS} more signals: --out FILE.csv writes every column"
        )
