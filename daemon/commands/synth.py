"""``cellwatch synth``: simulate a pick-and-place cell recording in the voraus-AD layout."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

from daemon.cli_support import UsageError, console, progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "synth",
        help="simulate a cell recording (voraus-AD layout, all 12 anomaly categories)",
        description=(
            "Simulate a 6-axis pick-and-place cell with rigid-body dynamics (pinocchio) and write it "
            "as a voraus-AD parquet file. By default the paper's size: 948 training normals, "
            "419 test normals, 755 anomalies."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="parquet file to write")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--cycles", type=int, help="total number of cycles (paper proportions kept)")
    size.add_argument("--scale", type=float, help="fraction of the paper's counts, e.g. 0.05")
    p.add_argument("--rate", type=int, choices=(100, 500), default=100, help="sampling rate in Hz")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same file")
    p.add_argument(
        "--categories",
        nargs="+",
        metavar="CAT",
        help="anomaly categories to include (names such as AXIS_FRICTION or numbers 0-11); default all",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ingest.sim.dataset import write_recording
    from ingest.sim.scenarios import parse_categories, plan_recording

    if args.scale is not None and not args.scale > 0:
        raise UsageError(f"--scale must be > 0, got {args.scale}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    try:
        categories = parse_categories(args.categories)
        specs = plan_recording(
            scale=1.0 if args.scale is None else args.scale,
            cycles=args.cycles,
            categories=categories,
            seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"simulating {len(specs)} cycles at {args.rate} Hz", total=len(specs))
        rows = write_recording(
            args.out,
            specs,
            rate_hz=args.rate,
            seed=args.seed,
            workers=args.workers,
            on_cycle=lambda _spec: bar.advance(task),
        )
    elapsed = time.perf_counter() - started
    counts = Counter(s.category.name for s in specs)
    train = sum(1 for s in specs if s.variant.name == "PRE_A")
    console.print(
        f"wrote [bold]{args.out}[/]: {len(specs)} cycles ({train} train, {len(specs) - train} test), "
        f"{rows} rows, {args.rate} Hz, in {elapsed:.1f} s"
    )
    console.print(", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    return 0
