"""``cellwatch inspect``: summarize a voraus-AD parquet file (cycles, categories, split, rate)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from daemon.cli_support import UsageError, progress
from ingest.errors import VorausFormatError
from ingest.voraus.reader import VorausReader

#: rejection examples shown (table) or listed (--json) with --validate
_EXAMPLES = 10


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarize a voraus-AD parquet file",
        description=(
            "Summarize a voraus-AD parquet file: cycles, rows, signals, sampling rate, counts per "
            "category and variant, the train/test split, time range and cycle durations. Reads only "
            "the meta columns unless --validate is given."
        ),
    )
    p.add_argument("file", metavar="FILE", type=Path, help="parquet file in the voraus-AD layout")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument(
        "--validate",
        action="store_true",
        help="stream every cycle with all signals and count rejected cycles (NaN, inf, ...)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        summary = summarize(args.file, validate=args.validate)
    except VorausFormatError as err:
        raise UsageError(str(err)) from err
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0


def summarize(path: Path, *, validate: bool = False) -> dict[str, Any]:
    """The facts ``inspect`` prints, as a JSON-ready dict."""
    with VorausReader(path) as reader:
        meta = reader.meta()
        per_cycle = meta.drop_duplicates("sample")  # a split cycle has one meta row per run
        summary: dict[str, Any] = {
            "file": str(path),
            "rows": reader.num_rows,
            "cycles": len(per_cycle),
            "signals": len(reader.signal_names),
            "rate_hz": reader.rate_hz,
            "measured_rate_hz": _rounded(reader.measured_rate_hz),
            "categories": _counts(per_cycle, "category", "category_name"),
            "variants": _counts(per_cycle, "setting", "variant_name"),
            "split": {k: int((per_cycle["split"] == k).sum()) for k in ("train", "test")},
            "time_range": [_num(meta["t_start"].min()), _num(meta["t_end"].max())],
            "duration_s": _durations(meta[meta["problem"] == ""]),
            "validated": validate,
        }
        if validate:
            summary["rejections"], summary["rejection_examples"] = _validate(reader, len(per_cycle))
        else:
            bad = per_cycle[per_cycle["problem"] != ""]
            summary["rejections"] = {str(k): int(v) for k, v in bad["problem"].value_counts().items()}
        summary["row_groups"] = reader.row_groups
        summary["damaged_row_groups"] = {str(k): v for k, v in reader.damaged_row_groups.items()}
    return summary


def _rounded(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 2)


def _validate(reader: VorausReader, total: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
    with progress() as bar:
        task = bar.add_task(f"validating {reader.path.name}", total=total)
        for good, _ in enumerate(reader.cycles(), start=1):
            bar.update(task, completed=good + reader.rejections.total)
        bar.update(task, completed=total)
    stats = reader.rejections
    examples = [
        {"sample": r.sample, "reason": r.reason, "detail": r.detail} for r in stats.examples[:_EXAMPLES]
    ]
    return dict(stats.counts), examples


def _counts(per_cycle: pd.DataFrame, value: str, name: str) -> dict[str, int]:
    """Cycles per name, in the order of the numeric value."""
    ordered = per_cycle.sort_values(value, kind="stable")
    return {str(k): int(v) for k, v in ordered[name].value_counts(sort=False).items()}


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _durations(valid: pd.DataFrame) -> dict[str, float | None]:
    d = valid["t_end"] - valid["t_start"]
    if d.empty:
        return {"min": None, "mean": None, "max": None}
    return {"min": _num(d.min()), "mean": _num(d.mean()), "max": _num(d.max())}


def _fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    return "?" if x is None else f"{x:.{digits}f}{unit}"


def print_summary(s: dict[str, Any]) -> None:
    """Print a :func:`summarize` result as rich tables on stdout."""
    console = Console()
    overview = Table(title=s["file"], show_header=False)
    overview.add_column("", style="bold")
    overview.add_column("")
    d = s["duration_s"]
    t0, t1 = s["time_range"]
    rate = "?" if s["rate_hz"] is None else f"{s['rate_hz']} Hz (measured {s['measured_rate_hz']:.2f} Hz)"
    damaged = s.get("damaged_row_groups", {})
    for key, value in (
        ("cycles", f"{s['cycles']:,}"),
        ("rows", f"{s['rows']:,}"),
        ("signals", str(s["signals"])),
        ("sampling rate", rate),
        ("row groups", f"{s['row_groups']:,}" + (f", {len(damaged)} damaged" if damaged else "")),
        ("split", f"{s['split']['train']:,} train / {s['split']['test']:,} test"),
        ("time range", f"{_fmt(t0, ' s')} .. {_fmt(t1, ' s')}"),
        ("cycle duration", f"min {_fmt(d['min'])} / mean {_fmt(d['mean'])} / max {_fmt(d['max'])} s"),
    ):
        overview.add_row(key, value)
    console.print(overview)

    for title, counts in (("category", s["categories"]), ("variant", s["variants"])):
        table = Table()
        table.add_column(title)
        table.add_column("cycles", justify="right")
        for name, n in counts.items():
            table.add_row(name, f"{n:,}")
        console.print(table)

    for detail in damaged.values():
        console.print(f"damaged: {detail}", markup=False, highlight=False)
    rejections = s["rejections"]
    how = "streaming every cycle" if s["validated"] else "meta-level checks; --validate checks signals too"
    if not rejections:
        console.print(f"no rejected cycles ({how})")
        return
    table = Table(title=f"rejected cycles ({how})")
    table.add_column("reason")
    table.add_column("cycles", justify="right")
    for reason, n in rejections.items():
        table.add_row(reason, f"{n:,}")
    console.print(table)
    for ex in s.get("rejection_examples", []):
        console.print(
            f"  sample {ex['sample']}: {ex['reason']}: {ex['detail']}", markup=False, highlight=False
        )
