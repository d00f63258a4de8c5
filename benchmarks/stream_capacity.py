"""How many robots (100 Hz x 130 signals) one daemon sustains over Kafka and over MQTT, and the latency
from a window's last sample to its point in InfluxDB.

Everything runs on this machine: the broker (Tansu or Mosquitto), InfluxDB 1.6.7, the load generator
and the daemon share its cores. For each step the generator streams N robots in real time (timestamps
= wall clock, one Arrow message of 100 rows per robot per second) for --seconds; InfluxDB is polled
every 50 ms and each point's latency is (first seen in InfluxDB - the moment the generator sent the
message with the cycle's last sample; the generator sends it when that sample's timestamp comes, and
its own lag is reported apart). Robots' phases are spread over 10 s.
A step is sustained when every cycle that ended during it is stored within --deadline seconds and the
p99 latency stays under --p99-limit. The ramp stops at the first step that is not sustained.

Usage:  python benchmarks/stream_capacity.py --data FULL.parquet --model MODEL [--robots 16,64,128]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from brokers import MosquittoServer, TansuServer
from daemons import Daemon
from services import InfluxServer

from ingest.loadgen import Target, plan, publish, robot_ids

console = Console()


def poll_latencies(
    influx: InfluxServer, db: str, stop: threading.Event, seen: dict[tuple[str, int], float]
) -> None:
    while not stop.is_set():
        since = max((t for _, t in seen), default=0) - 60 * 10**9
        result = influx.query(f'SELECT "cycle", "robot" FROM "anomaly_score" WHERE time > {since}', db)
        now = time.time_ns()
        for series in result["results"][0].get("series", []):
            for t, _cycle, robot in series["values"]:
                seen.setdefault((robot, int(t)), now)
        time.sleep(0.05)


def step(
    transport: str,
    url: str,
    data: Path,
    robots: list[str],
    seconds: float,
    deadline: float,
    influx: InfluxServer,
    db: str,
    daemon: Daemon,
) -> dict[str, Any]:
    start_ns = time.time_ns()
    cycles_per_robot = max(1, int(seconds / 11) + 1)
    options: dict[str, Any] = {"rows_per_message": 100, "max_cycles": cycles_per_robot, "spread_s": 10.0}
    end_ns = start_ns + int(seconds * 1e9)
    limited = (b for b in plan(data, robots, start_ns=start_ns, **options) if b.end_ns <= end_ns)
    expected = {
        (b.robot, b.end_ns)
        for b in plan(data, robots, start_ns=start_ns, **options)
        if b.cycle_end and b.end_ns <= end_ns
    }
    sent: dict[tuple[str, int], int] = {}

    def on_message(batch: Any) -> None:
        if batch.cycle_end:
            sent[(batch.robot, batch.end_ns)] = time.time_ns()

    seen: dict[tuple[str, int], float] = {}
    stop = threading.Event()
    poller = threading.Thread(target=poll_latencies, args=(influx, db, stop, seen), daemon=True)
    poller.start()
    proc = psutil.Process(daemon.proc.pid) if daemon.proc else None
    cpu_before = proc.cpu_times() if proc else None
    rss = 0
    sampler_stop = threading.Event()

    def sample() -> None:
        nonlocal rss
        while not sampler_stop.is_set() and proc is not None:
            rss = max(rss, proc.memory_info().rss)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    stats = asyncio.run(publish(Target.parse(url), limited, fmt="arrow", live=True, on_message=on_message))
    publish_wall = time.perf_counter() - t0
    wait_until = time.time() + deadline
    while time.time() < wait_until and not expected <= set(seen):
        time.sleep(0.1)
    stop.set()
    sampler_stop.set()
    poller.join()
    sampler.join()
    cpu_after = proc.cpu_times() if proc else None
    lat = np.array([(seen[k] - sent[k]) / 1e6 for k in expected if k in seen and k in sent])
    gen_lag = np.array([(sent[k] - k[1]) / 1e6 for k in expected if k in sent])
    cpu = (
        (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / publish_wall * 100
        if cpu_before and cpu_after
        else float("nan")
    )
    return {
        "transport": transport,
        "robots": len(robots),
        "messages/s": stats.messages / publish_wall,
        "MB/s": stats.bytes / publish_wall / 1e6,
        "windows": len(expected),
        "stored": sum(k in seen for k in expected),
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "max": float(lat.max()) if len(lat) else float("nan"),
        "cpu": cpu,
        "rss": rss / 2**20,
        "generator_lag_p99": float(np.percentile(gen_lag, 99)) if len(gen_lag) else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--robots", default="16,64,128,256")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds after the step for stragglers")
    ap.add_argument("--p99-limit", type=float, default=2000.0, help="ms")
    ap.add_argument("--transports", default="kafka,mqtt")
    ap.add_argument("--bf16", action="store_true", help="score in bfloat16 (CPU: about 2x faster)")
    args = ap.parse_args()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cellwatch-stream-bench-") as tmp:
        root = Path(tmp)
        influx = InfluxServer(root / "influx")
        influx.start()
        try:
            for transport in args.transports.split(","):
                server: Any = (
                    TansuServer(root / "tansu") if transport == "kafka" else MosquittoServer(root / "mq")
                )
                server.start()
                db = f"bench_{transport}"
                influx.create_database(db)
                if transport == "kafka":
                    server.create_topic("signals", 8)
                    source: dict[str, Any] = {
                        "type": "kafka",
                        "bootstrap": [server.bootstrap],
                        "topic": "signals",
                        "group": "bench",
                        "start_from": "latest",
                    }
                    url = f"kafka://{server.bootstrap}/signals"
                else:
                    source = {
                        "type": "mqtt",
                        "host": "127.0.0.1",
                        "port": server.port,
                        "topic": "cell/+/signals",
                        "client_id": "bench",
                        "receive_maximum": 65535,
                    }
                    url = f"mqtt://127.0.0.1:{server.port}/cell/+/signals"
                config = {
                    "sources": [source],
                    "model": {"path": str(args.model.resolve())},
                    "scoring": {"batch": 32, "max_wait_ms": 20, "bf16": args.bf16},
                    "sinks": {
                        "influxdb": {
                            "url": influx.url,
                            "database": db,
                            "spool_dir": str(root / f"spool-{transport}"),
                            "flush_interval_ms": 50,
                        }
                    },
                    "state_dir": str(root),
                }
                daemon = Daemon(root, f"daemon-{transport}", config).start()
                if transport == "kafka":  # wait for the group join before the clock starts
                    deadline = time.time() + 60
                    while daemon.metric("cellwatch_kafka_assigned_partitions") < 8 and time.time() < deadline:
                        time.sleep(0.1)
                try:
                    for i, n in enumerate(int(x) for x in args.robots.split(",")):
                        robots = robot_ids(n, f"s{i}r")
                        console.print(f"{transport}: {n} robots for {args.seconds:.0f} s ...")
                        row = step(
                            transport, url, args.data, robots, args.seconds, args.deadline, influx, db, daemon
                        )
                        rows.append(row)
                        console.print(row)
                        if row["stored"] < row["windows"] or row["p99"] > args.p99_limit:
                            break
                finally:
                    daemon.stop()
                    server.stop()
        finally:
            influx.stop()

    precision = "bf16" if args.bf16 else "fp32"
    table = Table(
        title=f"robots at 100 Hz x 130 signals -> one daemon ({precision}) -> InfluxDB, all on 2 CPU cores"
    )
    for col in ("transport", "robots", "msg/s", "MB/s", "cycles stored", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    table.add_column("generator lag p99 ms", justify="right")
    table.add_column("daemon CPU %", justify="right")
    table.add_column("daemon RSS MiB", justify="right")
    for r in rows:
        table.add_row(
            r["transport"],
            str(r["robots"]),
            f"{r['messages/s']:.0f}",
            f"{r['MB/s']:.1f}",
            f"{r['stored']}/{r['windows']}",
            f"{r['p50']:.0f}",
            f"{r['p99']:.0f}",
            f"{r['max']:.0f}",
            f"{r['generator_lag_p99']:.0f}",
            f"{r['cpu']:.0f}",
            f"{r['rss']:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
