"""``cellwatch run --config FILE`` and its shortcut ``cellwatch replay FILE --model MODEL``."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from daemon.cli_support import UsageError, console

log = logging.getLogger("cellwatch.run")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run the monitoring pipeline described by a YAML config")
    p.add_argument("--config", required=True, type=Path)
    p.set_defaults(func=run_config)
    r = sub.add_parser("replay", help="replay a voraus-AD file through the pipeline (shortcut for run)")
    r.add_argument("file", type=Path, help="voraus-AD parquet file")
    r.add_argument("--model", required=True, type=Path)
    r.add_argument("--robot", default="robot1")
    r.add_argument("--speed", type=float, default=1.0, help="x real time (e.g. 100); 'inf' for no pacing")
    r.add_argument("--out", type=Path, default=Path("scores.jsonl"), help="local JSON-lines sink")
    r.add_argument("--influx-url", help="also write to InfluxDB (v1 /write endpoint)")
    r.add_argument("--influx-db", default="cellwatch")
    r.add_argument("--all-cycles", action="store_true", help="replay training cycles too")
    r.set_defaults(func=run_replay)


def run_config(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:
        raise UsageError(str(err)) from err
    return execute(config)


def run_replay(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError, parse_config

    data: dict[str, Any] = {
        "sources": [
            {
                "type": "voraus_replay",
                "robot": args.robot,
                "path": str(args.file),
                "speed": args.speed,
                "test_split_only": not args.all_cycles,
            }
        ],
        "model": {"path": str(args.model)},
        "sinks": {"file": {"path": str(args.out)}},
    }
    if args.influx_url:
        data["sinks"]["influxdb"] = {"url": args.influx_url, "database": args.influx_db, "spool_dir": "spool"}
    try:
        config = parse_config(data, origin="replay")
    except ConfigError as err:
        raise UsageError(str(err)) from err
    return execute(config)


def execute(config: Any) -> int:
    from daemon.config import ConfigError, resolve_secrets
    from daemon.metrics import MetricsServer
    from daemon.pipeline import FileSink, Pipeline, Sink
    from daemon.sinks.influx import InfluxSink, InfluxTarget
    from flows.artifact import ModelFormatError, load_model
    from flows.scorer import Scorer
    from ingest.errors import IngestError
    from ingest.voraus.source import VorausReplaySource

    try:
        model = load_model(config.model.path)
        scorer = Scorer(model, device=config.scoring.device, bf16=config.scoring.bf16)
    except (ModelFormatError, ValueError) as err:
        raise UsageError(str(err)) from err
    sources = []
    start_ns = {}
    try:
        for src in config.sources:
            source = VorausReplaySource(
                src.path, src.robot, model.card.signals, speed=src.speed, test_split_only=src.test_split_only
            )
            rate = source.reader.rate_hz
            divider = int(model.card.training.get("rate_divider", 1))
            if rate is None or abs(rate / divider - model.card.rate_hz) > 1e-6:
                raise UsageError(
                    f"{src.path}: sampling rate {rate} Hz / divider {divider} does not match the model's "
                    f"{model.card.rate_hz:g} Hz"
                )
            sources.append(source)
            start = src.start.timestamp() if src.start else int(src.path.stat().st_mtime)
            start_ns[src.robot] = int(start * 1e9)
    except (IngestError, OSError) as err:
        raise UsageError(str(err)) from err
    sinks: list[Sink] = []
    if config.sinks.file is not None:
        sinks.append(FileSink(config.sinks.file.path))
    if config.sinks.influxdb is not None:
        influx = config.sinks.influxdb
        try:
            password, token = resolve_secrets(influx)
        except ConfigError as err:
            raise UsageError(str(err)) from err
        target = InfluxTarget(
            url=influx.url,
            api=influx.api,
            database=influx.database,
            retention_policy=influx.retention_policy,
            username=influx.username,
            password=password.get_secret_value() if password else None,
            org=influx.org,
            bucket=influx.bucket,
            token=token.get_secret_value() if token else None,
            timeout_s=influx.timeout_s,
        )
        sinks.append(
            InfluxSink(
                target,
                influx.spool_dir,
                batch_points=influx.batch_points,
                spool_max_bytes=influx.spool_max_mb * 2**20,
            )
        )
    pipeline = Pipeline(
        sources,
        scorer,
        sinks,
        model_name=Path(config.model.path).name,
        start_ns=start_ns,
        batch=config.scoring.batch,
        max_wait_ms=config.scoring.max_wait_ms,
        alerts=config.alerts.model_dump(),
    )

    async def main() -> Any:
        import signal

        from daemon.notify import Notifier

        notifier = Notifier()
        loop = asyncio.get_running_loop()
        for sink in sinks:
            if isinstance(sink, InfluxSink):
                await sink.start()
        run_task = asyncio.create_task(pipeline.run(drain_timeout_s=config.stop_drain_s), name="pipeline")

        stopping = False

        def stop() -> None:
            nonlocal stopping
            log.info("stopping: draining queued windows and the spool (up to %s s)", config.stop_drain_s)
            if not stopping:
                stopping = True
                notifier.stopping()
            pipeline.request_stop()

        def reload() -> None:
            notifier.reloading()
            try:
                fresh = load_model(config.model.path, expect_signals=model.card.signals)
                pipeline.scorer = Scorer(fresh, device=config.scoring.device, bf16=config.scoring.bf16)
                log.info("reloaded model %s", config.model.path)
            except (ModelFormatError, ValueError) as err:
                log.error("reload failed, keeping the running model: %s", err)
            notifier.ready()

        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, stop)
        loop.add_signal_handler(signal.SIGHUP, reload)
        notifier.ready(status=f"scoring {len(sources)} source(s) with {Path(config.model.path).name}")

        async def watchdog() -> None:
            assert notifier.watchdog_interval_s is not None
            last = -1
            while True:
                if pipeline.moving(last):
                    notifier.watchdog()
                last = pipeline.stats.windows_scored
                await asyncio.sleep(notifier.watchdog_interval_s)

        dog = asyncio.create_task(watchdog()) if notifier.watchdog_interval_s else None
        metrics = None
        if config.metrics.listen:
            metrics = MetricsServer(config.metrics.listen, lambda: collect_metrics(pipeline, sources, sinks))
            try:
                await metrics.start()
            except OSError as err:
                log.error("metrics endpoint %s unavailable: %s", config.metrics.listen, err)
                metrics = None
        try:
            return await run_task
        finally:
            if metrics is not None:
                await metrics.close()
            if dog is not None:
                dog.cancel()
            if not stopping:
                notifier.stopping()
            notifier.close()

    stats = asyncio.run(main())
    console.print(
        f"scored {stats.windows_scored} windows from {stats.cycles_in} cycles of {len(sources)} robot(s): "
        f"{stats.anomalies} over the threshold; inference {stats.inference_seconds:.1f} s "
        f"in {stats.batches} batches; {len(stats.alerts)} alerts"
    )
    if stats.alerts:
        from rich.table import Table

        table = Table(title="alerts (first 10)")
        for col in (
            "robot",
            "cycles",
            "peak (threshold = 1)",
            "event (peak cycle, time in it)",
            "top signals",
        ):
            table.add_column(col)
        for alert in stats.alerts[:10]:
            offset = f"{alert.event_in_window_s:.2f} s" if alert.event_in_window_s is not None else "?"
            table.add_row(
                alert.robot,
                ",".join(map(str, alert.cycles[:5])),
                f"{alert.peak_score:.2f}",
                f"cycle {alert.peak_cycle} at {offset}",
                ", ".join(f"{n} {s:.0%}" for n, s in alert.top_signals),
            )
        console.print(table)
    return 0


def collect_metrics(
    pipeline: Any, sources: list[Any], sinks: list[Any]
) -> list[tuple[str, str, dict[str, str], float]]:
    """Samples for the Prometheus endpoint, read from the live objects at scrape time."""
    from daemon.sinks.influx import InfluxSink

    stats = pipeline.stats
    out: list[tuple[str, str, dict[str, str], float]] = [
        ("cellwatch_cycles_in_total", "counter", {}, stats.cycles_in),
        ("cellwatch_windows_scored_total", "counter", {}, stats.windows_scored),
        ("cellwatch_anomalous_windows_total", "counter", {}, stats.anomalies),
        ("cellwatch_alerts_total", "counter", {}, len(stats.alerts)),
        ("cellwatch_queue_depth", "gauge", {}, pipeline.queue.qsize()),
        ("cellwatch_inference_seconds_total", "counter", {}, stats.inference_seconds),
        ("cellwatch_inference_batches_total", "counter", {}, stats.batches),
    ]
    for source in sources:
        for reason, count in source.reader.rejections.counts.items():
            out.append(
                ("cellwatch_rejects_total", "counter", {"source": source.robot, "reason": reason}, count)
            )
    for sink in sinks:
        if isinstance(sink, InfluxSink):
            out.append(("cellwatch_spool_bytes", "gauge", {}, sink.pending_bytes))
            out.append(("cellwatch_sink_retries_total", "counter", {}, sink.stats.retries))
    return out
