"""Full-size simulation benchmark: generate the paper-sized 100 Hz recording (2,122 cycles) and report
wall time, peak memory (summed over the main process and its workers) and file size.

Goal (issue 2): under 10 minutes on 2 cores, bounded memory.

Usage:  python benchmarks/synth_full.py [--out /var/tmp/cell-full.parquet] [--scale 1.0] [--rate 100]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/var/tmp/cellwatch-full.parquet"))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--keep", action="store_true", help="keep the file (default: delete it)")
    args = ap.parse_args()
    cmd = [
        sys.executable,
        "-m",
        "daemon.cli",
        "synth",
        "--out",
        str(args.out),
        "--scale",
        str(args.scale),
        "--rate",
        str(args.rate),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)  # progress bar shows on this terminal
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"synth failed with exit code {proc.returncode}")
    size = args.out.stat().st_size
    table = Table(title=f"cellwatch synth --scale {args.scale} --rate {args.rate}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("cores", str(os.cpu_count()))
    table.add_row("wall time", f"{elapsed:.1f} s")
    table.add_row("peak RSS (all processes)", f"{peak / 2**20:.0f} MiB")
    table.add_row("file size", f"{size / 2**20:.0f} MiB")
    Console().print(table)
    if not args.keep:
        args.out.unlink()


if __name__ == "__main__":
    main()
