"""``cellwatch publish FILE --to kafka://HOST:PORT/TOPIC|mqtt://HOST:PORT/TOPIC``: the load generator.

Streams a voraus-AD parquet file, real or simulated, as N robots' signal messages at real-time rate
or faster; tests and benchmarks use it to drive the Kafka and MQTT sources.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.cli_support import UsageError, console, progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "publish",
        help="stream a voraus-AD file to Kafka or MQTT as N robots (load generator)",
        description=(
            "Publish the file's cycles as robot signal messages (the format the Kafka and MQTT sources "
            "read). Each robot streams the cycles back to back from --start; messages carry "
            "--rows-per-message rows of one cycle. MQTT topics need one '+' level for the robot id, "
            "e.g. mqtt://127.0.0.1:1883/cell/+/signals; Kafka messages are keyed by robot id."
        ),
    )
    p.add_argument("file", type=Path, help="voraus-AD parquet file")
    p.add_argument("--to", required=True, help="kafka://HOST:PORT/TOPIC or mqtt://HOST:PORT/TOPIC")
    p.add_argument("--robots", type=int, default=1, help="number of robots (default 1)")
    p.add_argument("--robot-prefix", default="robot", help="robot ids are PREFIX1..PREFIXN")
    p.add_argument("--speed", type=float, default=1.0, help="x real time; 'inf' for as fast as possible")
    p.add_argument("--format", choices=("json", "arrow"), default="json", dest="fmt")
    p.add_argument("--rows-per-message", type=int, default=100, help="samples per message (default 100)")
    p.add_argument("--cycles", type=int, help="stop after this many cycles per robot")
    p.add_argument("--all-cycles", action="store_true", help="also send training (PRE_A) cycles")
    p.add_argument(
        "--spread",
        type=float,
        default=10.0,
        help="spread the robots' start times over this many seconds (default 10: cells not in lockstep)",
    )
    p.add_argument(
        "--start",
        help="timestamp of the first sample (ISO 8601 or ns since the epoch). Default: now at --speed 1; "
        "faster, early enough that no sample is stamped ahead of the clock (the last one is stamped as it "
        "is sent; at 'inf', the recording ends now)",
    )
    p.set_defaults(func=run)


def duration_ns(path: Path, *, test_only: bool, cycles: int | None, robots: int, spread_s: float) -> int:
    """Data time the run covers per robot (its cycles back to back) plus the robots' spread."""
    from ingest.voraus.reader import VorausReader

    with VorausReader(path) as reader:
        meta = reader.meta()
        rate = reader.rate_hz or 100
    if test_only:
        meta = meta[meta["split"] == "test"]
    if cycles is not None:
        meta = meta.head(cycles)
    spread = spread_s if robots > 1 else 0.0
    return int((int(meta["rows"].sum()) / rate + spread) * 1e9)


def default_start(now_ns: int, covered_ns: int, speed: float) -> int:
    """The first sample's stamp such that no message is stamped ahead of the clock when it is sent:
    at speed S the run lasts covered/S, and its last sample is stamped as it leaves."""
    if speed <= 1:
        return now_ns
    if math.isinf(speed):
        return now_ns - covered_ns
    return now_ns - int(covered_ns * (1 - 1 / speed))


def parse_start(text: str | None) -> int:
    if text is None:
        return time.time_ns()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--start: not an ISO 8601 time or integer ns: {text!r}") from None
    if moment.tzinfo is None:
        raise UsageError(f"--start: give a time zone, e.g. {text}+00:00")
    return int(moment.timestamp() * 1e9)


def run(args: argparse.Namespace) -> int:
    from ingest.errors import IngestError
    from ingest.loadgen import Target, plan, publish, robot_ids

    try:
        target = Target.parse(args.to)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.robots < 1:
        raise UsageError(f"--robots must be >= 1, got {args.robots}")
    if not 1 <= args.rows_per_message <= 100_000:
        raise UsageError(f"--rows-per-message must be in 1..100000, got {args.rows_per_message}")
    if not args.speed > 0:
        raise UsageError(f"--speed must be > 0, got {args.speed}")
    if not args.file.exists():
        raise UsageError(f"{args.file}: no such file")
    robots = robot_ids(args.robots, args.robot_prefix)
    start_ns = parse_start(args.start)
    if args.start is None and args.speed > 1:
        covered = duration_ns(
            args.file,
            test_only=not args.all_cycles,
            cycles=args.cycles,
            robots=len(robots),
            spread_s=args.spread,
        )
        start_ns = default_start(start_ns, covered, args.speed)
    batches = plan(
        args.file,
        robots,
        start_ns=start_ns,
        rows_per_message=args.rows_per_message,
        test_split_only=not args.all_cycles,
        max_cycles=args.cycles,
        spread_s=args.spread,
    )
    console.print(f"publishing {args.file} as {len(robots)} robot(s) to {args.to} ({args.fmt})")
    with progress() as bar:
        task = bar.add_task("messages", total=None)
        try:
            stats = asyncio.run(
                publish(
                    target, batches, fmt=args.fmt, speed=args.speed, on_message=lambda _b: bar.advance(task)
                )
            )
        except (IngestError, ValueError) as err:
            raise UsageError(str(err)) from err
        except (OSError, ConnectionError) as err:
            raise UsageError(f"{args.to}: {err}") from err
        except Exception as err:  # broker client errors (aiokafka, aiomqtt) have no common base
            if type(err).__module__.split(".")[0] in ("aiokafka", "aiomqtt", "kafka"):
                raise UsageError(f"{args.to}: {type(err).__name__}: {err}") from err
            raise
    rate = stats.messages / stats.seconds if stats.seconds > 0 else float("inf")
    console.print(
        f"sent {stats.messages} messages ({stats.rows} rows, {stats.bytes / 2**20:.1f} MiB, "
        f"{stats.cycles} cycles) in {stats.seconds:.1f} s: {rate:.0f} messages/s"
    )
    first = datetime.fromtimestamp(start_ns / 1e9, tz=UTC).isoformat(timespec="seconds")
    console.print(
        f"samples stamped from {first}: a daemon drops rows of these robots older than the newest it has "
        f"seen (counted as 'duplicate'); for another run over the same time, use --start or --robot-prefix"
    )
    return 0
