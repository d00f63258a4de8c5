"""``cellwatch demo``: the main job on embedded defaults, needing no data and no infrastructure.

Today it simulates a small cell and inspects the recording; as the daemon grows it will also train a
model, replay the test split through the daemon and write the report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from daemon.cli_support import UsageError, console, progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="main job on embedded defaults: simulate a small cell and inspect it",
        description="Simulate a small pick-and-place cell (all 12 anomaly categories) and inspect it.",
    )
    p.add_argument("--dir", type=Path, default=Path("cellwatch-demo"), help="working directory")
    p.add_argument("--scale", type=float, default=0.05, help="fraction of the paper-sized recording")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from daemon.commands.inspect import print_summary, summarize
    from ingest.sim.dataset import write_recording
    from ingest.sim.scenarios import plan_recording

    if not args.scale > 0:
        raise UsageError(f"--scale must be > 0, got {args.scale}")
    args.dir.mkdir(parents=True, exist_ok=True)
    data = args.dir / "cell.parquet"
    specs = plan_recording(scale=args.scale, seed=args.seed)
    console.rule("[bold]1. simulate the cell")
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"simulating {len(specs)} cycles", total=len(specs))
        write_recording(data, specs, seed=args.seed, on_cycle=lambda _s: bar.advance(task))
    console.print(f"wrote {data} in {time.perf_counter() - started:.1f} s")
    console.rule("[bold]2. inspect and validate the recording")
    print_summary(summarize(data, validate=True))
    console.print(f"\nnext: [bold]cellwatch inspect {data} --json[/]")
    return 0
