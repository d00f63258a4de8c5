"""Peak memory and speed of VorausReader on a full-size voraus-AD file.

If PATH does not exist, a fake 100 Hz file is written the way the published one was: fastparquet,
one row group, an ``index`` column, 2,122 cycles of about 1,150 rows (random-walk float64 signals,
the published mix of categories). Writing the full size needs about 3 GB of RAM and 2.7 GB of disk.
The file is written in a subprocess of its own, and each measurement runs in a fresh one, which
reports its wall time and peak RSS (VmHWM of /proc/self/status: ``ru_maxrss`` of a spawned child
would also count its parent's RSS at the time of the fork).

Usage:  python benchmarks/reader_memory.py [PATH] [--cycles 2122] [--strategy auto] [--meta] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ingest.sim.scenarios import PAPER_ANOMALY_COUNTS  # noqa: E402
from ingest.voraus import schema  # noqa: E402
from ingest.voraus.schema import Category, Variant  # noqa: E402

#: anomalies per category in the published test set (755 in all)
ANOMALY_COUNTS = PAPER_ANOMALY_COUNTS
#: a few plausible variants per category (only the numbers matter to the reader)
VARIANTS = {
    Category.AXIS_FRICTION: range(Variant.A1_A, Variant.A6_B + 1),
    Category.AXIS_WEIGHT: range(Variant.A1_115G, Variant.A6_115G + 1),
    Category.COLLISION_FOAM: range(Variant.LARGE_FULL, Variant.SMALL_HANGING_STRIPE + 1),
    Category.COLLISION_CABLE: range(Variant.CONNECTOR_TOP, Variant.LAN + 1),
    Category.COLLISION_CARTON: (Variant.STRIPE, Variant.FULL_A, Variant.FULL_B),
    Category.MISS_CAN: (Variant.NO_VACUUM, Variant.CONVEYOR),
    Category.LOSE_CAN: range(Variant.DEFECT_GRIPPER_DROP_CAN, Variant.LOSE_PLACE_100MS + 1),
    Category.CAN_WEIGHT: range(Variant.DECREASE_95G, Variant.INCREASE_407G + 1),
    Category.ENTANGLED: (Variant.CABLE,),
    Category.INVALID_POSITION: (Variant.PICK,),
    Category.MOTOR_COMMUTATION: range(Variant.A1_HIGH, Variant.A6_MEDIUM + 1),
    Category.WOBBLING_STATION: (Variant.LOW_DAMPING, Variant.MEDIUM_DAMPING, Variant.HIGH_DAMPING),
}
N_TRAIN, N_TEST_NORMAL = 948, 419


def plan_cycles(n_cycles: int, rng: np.random.Generator) -> list[tuple[bool, int, int]]:
    """(anomaly, category, setting) per cycle: training normals first, then test cycles interleaved."""
    total = N_TRAIN + N_TEST_NORMAL + sum(ANOMALY_COUNTS.values())
    scale = n_cycles / total
    n_train = round(N_TRAIN * scale)
    test: list[tuple[bool, int, int]] = [(False, int(Category.NORMAL_OPERATION), int(Variant.PRE_B))] * round(
        N_TEST_NORMAL * scale
    )
    for cat, count in ANOMALY_COUNTS.items():
        choices = list(VARIANTS[cat])
        test += [(True, int(cat), int(rng.choice(choices))) for _ in range(round(count * scale))]
    rng.shuffle(test)
    cycles = [(False, int(Category.NORMAL_OPERATION), int(Variant.PRE_A))] * n_train + test
    return cycles[:n_cycles]


def make_file(path: Path, n_cycles: int, rows: int, rate: int, compression: str | None, seed: int) -> None:
    """Write a fake voraus-AD file with fastparquet: one row group, with an ``index`` column."""
    import fastparquet
    import pandas as pd

    rng = np.random.default_rng(seed)
    plan = plan_cycles(n_cycles, rng)
    lengths = np.clip(rng.normal(rows, rows * 0.04, len(plan)).round(), 2, None).astype(np.int64)
    n = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    step = np.arange(n) - starts  # row number within the cycle
    meta = np.array(plan, dtype=object)
    cols: dict[str, np.ndarray] = {
        "time": step / rate,
        "sample": np.repeat(np.arange(len(plan), dtype=np.int64), lengths),
        "anomaly": np.repeat(meta[:, 0].astype(bool), lengths),
        "category": np.repeat(meta[:, 1].astype(np.int64), lengths),
        "setting": np.repeat(meta[:, 2].astype(np.int64), lengths),
        "action": np.minimum(step * 15 // np.repeat(lengths, lengths), 14).astype(np.uint8),
        "active": (step % 200 > 20).astype(np.int64),
    }
    for name in schema.MACHINE_SIGNALS:
        walk = np.cumsum(rng.standard_normal(n) * 0.01)
        cols[name] = np.round(walk + rng.uniform(-40, 50), 4)
    df = pd.DataFrame(cols, copy=False)
    del cols
    df.index.name = schema.OPTIONAL_INDEX_COLUMN
    fastparquet.write(str(path), df, row_group_offsets=[0], write_index=True, compression=compression)


def child_read(path: str, strategy: str, signals: str, batch_rows: int, budget_mb: int, meta: bool) -> None:
    """Stream every cycle (or read meta only); print one JSON line with the measurements."""
    from ingest.voraus.reader import VorausReader

    started = time.perf_counter()
    with VorausReader(
        path,
        signals,
        batch_rows=batch_rows,
        strategy=strategy,
        memory_budget=budget_mb * 2**20,
    ) as reader:
        result: dict[str, object] = {"strategy": "-" if meta else reader.strategy, "rate_hz": reader.rate_hz}
        if meta:
            df = reader.meta()
            result.update(
                cycles=len(df), rows=int(df["rows"].sum()), rejected=int((df["problem"] != "").sum())
            )
        else:
            cycles = rows = 0
            checksum = 0.0
            for cycle in reader.cycles():
                cycles += 1
                rows += cycle.n_rows
                checksum += float(cycle.signals[-1].sum())
            result.update(
                cycles=cycles, rows=rows, rejected=reader.rejections.total, checksum=round(checksum, 3)
            )
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """Peak resident set size of this process since its exec, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(args: argparse.Namespace, meta: bool) -> dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        str(args.path),
        "--child",
        "--strategy",
        args.strategy,
        "--signals",
        args.signals,
        "--batch-rows",
        str(args.batch_rows),
        "--budget-mb",
        str(args.budget_mb),
    ] + (["--meta"] if meta else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", type=Path, default=Path("/tmp/voraus-fake-100hz.parquet"))
    ap.add_argument("--cycles", type=int, default=2122, help="cycles in a new fake file")
    ap.add_argument("--rows-per-cycle", type=int, default=1150, help="mean rows per cycle of a new fake file")
    ap.add_argument("--rate", type=int, default=100, help="sampling rate of a new fake file")
    ap.add_argument(
        "--compression", default=None, help="fastparquet compression for a new file (e.g. SNAPPY)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", default="auto", choices=("auto", "stream", "spill"))
    ap.add_argument("--signals", default="machine", help="signal group to read")
    ap.add_argument("--batch-rows", type=int, default=65_536)
    ap.add_argument("--budget-mb", type=int, default=128, help="VorausReader memory_budget in MiB")
    ap.add_argument("--meta", action="store_true", help="also measure reader.meta()")
    ap.add_argument("--keep", action="store_true", help="keep a fake file this run created")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        make_file(args.path, args.cycles, args.rows_per_cycle, args.rate, args.compression, args.seed)
        print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
        return
    if args.child:
        child_read(str(args.path), args.strategy, args.signals, args.batch_rows, args.budget_mb, args.meta)
        return

    console = Console(width=max(Console().width, 110))
    created = not args.path.exists()
    try:
        if created:
            console.print(f"writing a fake file with {args.cycles} cycles to {args.path} ...")
            started = time.perf_counter()
            cmd = [sys.executable, __file__, str(args.path), "--make", "--cycles", str(args.cycles)]
            cmd += ["--rows-per-cycle", str(args.rows_per_cycle), "--rate", str(args.rate)]
            cmd += ["--seed", str(args.seed)]
            cmd += ["--compression", args.compression] if args.compression else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            writer_mb = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            elapsed = time.perf_counter() - started
            console.print(f"  written in {elapsed:.1f} s (writer peak RSS {writer_mb:,.0f} MB)")
        size_gb = args.path.stat().st_size / 1e9
        table = Table(title=f"VorausReader on {args.path} ({size_gb:.2f} GB)")
        for col in ("pass", "strategy", "cycles", "rows", "rejected", "wall s", "cycles/s", "peak RSS MB"):
            table.add_column(col, justify="right" if col not in ("pass", "strategy") else "left")
        passes = [("cycles", False)] + ([("meta", True)] if args.meta else [])
        for name, meta in passes:
            r = run_child(args, meta)
            wall = float(r["wall_s"])
            cycles = int(r["cycles"])
            table.add_row(
                name,
                str(r["strategy"]),
                str(cycles),
                f"{r['rows']:,}",
                str(r["rejected"]),
                f"{wall:.1f}",
                f"{cycles / wall:,.0f}",
                f"{float(r['peak_rss_mb']):,.0f}",
            )
        console.print(table)
    finally:
        if created and not args.keep and args.path.exists():
            os.unlink(args.path)


if __name__ == "__main__":
    main()
