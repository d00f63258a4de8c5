"""Replay a full-size voraus-AD file through the daemon into a real InfluxDB.

1. Throughput: every cycle (2,122 for the full simulated set) at full speed, whole-cycle scoring,
   into InfluxDB 1.6.7 started here on private ports. Reports wall time, peak RSS of the daemon
   and the number of points stored. Goal (issue 4): under 3 minutes and 1 GB on 2 cores.
2. Latency: the test split paced at --latency-speed x real time; each cycle becomes available at its
   due time (recording start + its end / speed); InfluxDB is polled every 5 ms for its point. Reports
   p50/p95/max of (point visible in InfluxDB − cycle's last sample due).

Usage:  python benchmarks/replay_influx.py --data FILE --model MODEL [--latency-cycles 40]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from services import InfluxServer

from ingest.voraus.reader import VorausReader

CELLWATCH = Path(sys.executable).parent / "cellwatch"


def count(server: InfluxServer, db: str) -> int:
    rows = server.series('SELECT count("score") FROM "anomaly_score"', db)
    return int(rows[0][1]) if rows else 0


def write_config(
    path: Path,
    args: argparse.Namespace,
    influx: InfluxServer,
    database: str,
    *,
    speed: float,
    test_split_only: bool = True,
    max_wait_ms: int = 50,
    flush_interval_ms: int = 1000,
) -> Path:
    """A daemon config: one robot replaying --data with --model into `database`, on the CPU."""
    source = {
        "type": "voraus_replay",
        "robot": "arm-1",
        "path": str(args.data.resolve()),
        "speed": speed,
        "test_split_only": test_split_only,
        "start": "2026-01-01T00:00:00Z",
    }
    influxdb = {
        "url": influx.url,
        "database": database,
        "spool_dir": str(path.parent / f"spool-{database}"),
        "flush_interval_ms": flush_interval_ms,
    }
    config = {
        "sources": [source],
        "model": {"path": str(args.model.resolve())},
        "scoring": {"batch": 32, "max_wait_ms": max_wait_ms, "device": "cpu"},
        "sinks": {"influxdb": influxdb},
        "metrics": {"listen": None},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_daemon(
    config: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    proc = subprocess.Popen(
        [str(CELLWATCH), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    return proc, psutil.Process(proc.pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--latency-speed", type=float, default=20.0)
    ap.add_argument("--latency-cycles", type=int, default=40)
    args = ap.parse_args()
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="cw-bench-"))
    influx = InfluxServer(root / "influx")
    influx.start()
    try:
        # --- throughput -----------------------------------------------------------------------------
        influx.create_database("bench")
        config = write_config(
            root / "throughput.yaml", args, influx, "bench", speed=1e12, test_split_only=False
        )
        with VorausReader(args.data) as reader:
            cycles = len(reader.meta())
        t0 = time.perf_counter()
        proc, ps = run_daemon(config)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.returncode != 0:
            sys.exit(f"daemon failed: {err[-2000:]}")
        stored = count(influx, "bench")

        # --- latency ----------------------------------------------------------------------------------
        influx.create_database("latency")
        config = write_config(
            root / "latency.yaml",
            args,
            influx,
            "latency",
            speed=args.latency_speed,
            max_wait_ms=20,
            flush_interval_ms=20,  # points leave memory for the spool within 20 ms
        )
        with VorausReader(args.data) as reader:
            meta = reader.meta()
        test = meta[meta["split"] == "test"]
        durations = (test["t_end"] - test["t_start"]).to_numpy()[: args.latency_cycles]
        sock_path = root / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(120)
        proc, _ = run_daemon(config, env={**os.environ, "NOTIFY_SOCKET": str(sock_path)})
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.time()
        due = ready + np.cumsum(durations) / args.latency_speed
        seen: dict[int, float] = {}
        deadline = due[-1] + 30
        while len(seen) < len(due) and time.time() < deadline:
            rows = influx.series('SELECT "cycle" FROM "anomaly_score"', "latency")
            now = time.time()
            for i in range(len(seen), min(len(rows), len(due))):
                seen[i] = now
            time.sleep(0.005)
        proc.terminate()
        proc.wait(timeout=60)
        sock.close()
        lat = np.array([seen[i] - due[i] for i in sorted(seen)]) * 1000
    finally:
        influx.stop()

    table = Table(
        title="cellwatch run: voraus replay -> MVT-Flow (cycle mode) -> InfluxDB 1.6.7, 2 CPU cores"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("cycles replayed", f"{cycles}")
    table.add_row("points in InfluxDB", f"{stored}")
    table.add_row("wall time (start to exit)", f"{wall:.1f} s")
    table.add_row("peak RSS of the daemon", f"{peak / 2**20:.0f} MiB")
    table.add_row(
        f"latency, {len(lat)} cycles at {args.latency_speed:g}x: p50", f"{np.percentile(lat, 50):.0f} ms"
    )
    table.add_row("latency p95", f"{np.percentile(lat, 95):.0f} ms")
    table.add_row("latency max", f"{lat.max():.0f} ms")
    console.print(table)
    console.print(
        "latency = point visible in InfluxDB (polled every 5 ms) - the cycle's last sample due; "
        "includes the 5 ms polling and the daemon's start-up jitter"
    )


if __name__ == "__main__":
    main()
