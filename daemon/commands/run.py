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
    p = sub.add_parser(
        "run",
        help="run the monitoring pipeline described by a YAML config",
        description=(
            "The monitoring daemon: sources -> windows -> model -> sinks, with alerts and metrics. "
            "Sample configs to start from, each loaded by the tests: examples/replay-local.yaml (a "
            "file replayed into a local JSON-lines file), examples/replay-influx.yaml, "
            "examples/mqtt-local.yaml, examples/kafka-influx.yaml, examples/cell-and-camera.yaml (signals "
            "and camera frames, two models), examples/service.yaml (what install-service installs). "
            "Source types: voraus_replay, kafka, mqtt (signals); image_folder, video, mqtt_frames, "
            "kafka_frames (camera frames). Check one first with: cellwatch check --config FILE. "
            "Exit status: 0 done, 2 a config/model error, 75 a broker or database unreachable at start."
        ),
    )
    p.add_argument("--config", required=True, type=Path, help="YAML config (see examples/)")
    p.set_defaults(func=run_config)
    r = sub.add_parser(
        "replay",
        help="replay a voraus-AD file or a folder of images through the pipeline (shortcut for run)",
        description=(
            "Score recorded data through the daemon's own pipeline, as if it came live: a voraus-AD parquet "
            "file with an MVT-Flow model, or a folder of PNG/JPEG images (an MVTec-layout folder: its test "
            "split) with an AST model. Points go to a JSON-lines file (and InfluxDB with --influx-url)."
        ),
    )
    r.add_argument("file", type=Path, help="voraus-AD parquet file, or a folder of images")
    r.add_argument("--model", required=True, type=Path)
    r.add_argument("--robot", default="robot1")
    r.add_argument("--camera", default="cam1", help="images: the camera id of the frames")
    r.add_argument("--speed", type=float, default=1.0, help="x real time (e.g. 100); 'inf' for no pacing")
    r.add_argument("--out", type=Path, default=Path("scores.jsonl"), help="local JSON-lines sink")
    r.add_argument("--influx-url", help="also write to InfluxDB (v1 /write endpoint)")
    r.add_argument("--influx-db", default="cellwatch")
    r.add_argument("--all-cycles", action="store_true", help="replay training cycles too")
    r.add_argument(
        "--overlays", type=Path, default=Path("overlays"), help="images: where overlays of anomalies go"
    )
    r.set_defaults(func=run_replay)


def run_config(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:
        raise UsageError(str(err)) from err
    return execute(config, config_path=args.config)


def run_replay(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError, parse_config

    source: dict[str, Any]
    if args.file.is_dir():
        source = {"type": "image_folder", "mode": "replay", "robot": args.robot, "camera": args.camera}
        source["path"] = str(args.file)
    else:
        source = {
            "type": "voraus_replay",
            "robot": args.robot,
            "path": str(args.file),
            "speed": args.speed,
            "test_split_only": not args.all_cycles,
        }
    data: dict[str, Any] = {
        "sources": [source],
        "model": {"path": str(args.model)},
        "sinks": {"file": {"path": str(args.out)}},
        "overlays": {"dir": str(args.overlays)},
    }
    if args.influx_url:
        data["sinks"]["influxdb"] = {"url": args.influx_url, "database": args.influx_db, "spool_dir": "spool"}
    try:
        config = parse_config(data, origin="replay")
    except ConfigError as err:
        raise UsageError(str(err)) from err
    return execute(config)


def build_sources(config: Any, models: Any) -> list[Any]:
    """The configured sources (not started yet), each built by its `type:` (daemon/sources.py). A source
    whose kind of data has no model, or a replayed file at another rate than the signal model's, is a
    start-up error naming the source."""
    from daemon.config import ConfigError
    from daemon.sources import BuildContext, build_source, kind_of, secret
    from ingest.errors import IngestError
    from ingest.voraus.schema import RATE_TOLERANCE, rate_matches

    card = models.signals.card if models.signals is not None else None
    ctx = BuildContext(
        signals=list(card.signals) if card is not None else None,
        secret=secret,
        rate_hz=card.rate_hz * int(card.training.get("rate_divider", 1)) if card is not None else None,
    )
    sources: list[Any] = []
    try:
        for i, src in enumerate(config.sources):
            kind = kind_of(src)
            if (kind == "signals" and models.signals is None) or (kind == "frames" and models.frames is None):
                wanted = "an MVT-Flow (signals)" if kind == "signals" else "an AST (camera frames)"
                raise ValueError(
                    f"sources[{i}] ({src.type}) needs {wanted} model in `models`; none is configured"
                )
            source = build_source(src, ctx)
            sources.append(source)
            reader = getattr(source, "reader", None)
            if src.type == "voraus_replay" and reader is not None and card is not None:
                # real files are not exactly on the nominal clock (voraus-AD 100 Hz: 99.3 Hz measured)
                divider = int(card.training.get("rate_divider", 1))
                measured = reader.measured_rate_hz
                wanted_hz = card.rate_hz * divider
                if measured is None or not rate_matches(measured, wanted_hz):
                    shown = "unknown" if measured is None else f"{measured:.4g} Hz"
                    raise ValueError(
                        f"{src.path}: sampling rate {shown} (nominal {reader.rate_hz} Hz) is not within "
                        f"±{RATE_TOLERANCE:.0%} of the model's {card.rate_hz:g} Hz × divider {divider} = "
                        f"{wanted_hz:g} Hz"
                    )
    except (IngestError, OSError, ConfigError, ValueError) as err:
        close_unstarted(sources)
        raise UsageError(str(err)) from err
    return sources


def close_unstarted(sources: list[Any]) -> None:
    """Start-up failed: release what the sources opened before `start()` (replay readers)."""
    for source in sources:
        source.close()


def build_feeds(config: Any) -> list[Any]:
    """The optional publish-back sinks (MQTT, Kafka): scores and alerts as a live feed."""
    from daemon.sinks.kafka import KafkaPublishSink
    from daemon.sinks.mqtt import MqttPublishSink
    from daemon.sources import kafka_security, mqtt_tls, secret

    feeds: list[Any] = []
    mqtt, kafka = config.sinks.mqtt, config.sinks.kafka
    if mqtt is not None:
        feeds.append(
            MqttPublishSink(
                mqtt.host,
                mqtt.port,
                client_id=mqtt.client_id,
                score_topic=mqtt.score_topic,
                alert_topic=mqtt.alert_topic,
                qos=mqtt.qos,
                retain=mqtt.retain,
                username=mqtt.username,
                password=secret(mqtt.password),
                tls_context=tls.context() if (tls := mqtt_tls(mqtt.tls)) else None,
                queue_points=mqtt.queue_points,
            )
        )
    if kafka is not None:
        feeds.append(
            KafkaPublishSink(
                kafka.bootstrap,
                score_topic=kafka.score_topic,
                alert_topic=kafka.alert_topic,
                client_id=kafka.client_id,
                security_options=kafka_security(kafka.security).options(),
                queue_points=kafka.queue_points,
            )
        )
    return feeds


EXIT_UNAVAILABLE = 75  # EX_TEMPFAIL: a broker or database is unreachable at start-up; worth a restart


def alert_options(config: Any) -> Any:
    from daemon.alerts import AlertOptions

    a = config.alerts
    return AlertOptions(
        k=a.k,
        n=a.n,
        min_duration_s=a.min_duration_s,
        cooldown_s=a.cooldown_s,
        update_interval_s=a.update_interval_s,
    )


def robot_limits(config: Any) -> Any:
    from daemon.pipeline import RobotLimits

    robots = config.robots
    return RobotLimits(
        max_robots=robots.max_robots,
        allow=frozenset(robots.allow) if robots.allow is not None else None,
        idle_timeout_s=robots.idle_timeout_s,
    )


def prepare_reload(
    config: Any, config_path: Path | None, running: Any, sources: list[Any]
) -> tuple[Any, Any]:
    """The reload's slow part, on a worker thread: read and check the config, load the models and build
    their scorers (weights on the device). Returns (config, (models, batches)); raises ConfigError,
    ModelFormatError or ValueError, and then nothing changes. The kinds of models must stay as they are
    (the sources were built for them), a signal model must read the same signals."""
    from daemon.config import load_config
    from daemon.models import load_models
    from ingest.voraus.schema import rate_matches

    fresh_config = load_config(config_path) if config_path is not None else config
    expect = list(running.signals.card.signals) if running.signals is not None else None
    models, batches = load_models(fresh_config, expect_signals=expect)
    for kind in ("signals", "frames"):
        if (getattr(models, kind) is None) != (getattr(running, kind) is None):
            raise ValueError(
                f"the reloaded config changes which kinds of models run ({kind}); restart instead"
            )
    if models.signals is not None:
        card = models.signals.card
        divider = int(card.training.get("rate_divider", 1))
        for source in sources:  # replayed files keep their rate: the new model must fit it (as at start)
            measured = getattr(getattr(source, "reader", None), "measured_rate_hz", None)
            if measured is not None and not rate_matches(measured, card.rate_hz * divider):
                raise ValueError(
                    f"the new model scores {card.rate_hz:g} Hz, but {source.name} replays "
                    f"{measured:.4g} Hz / divider {divider}"
                )
    return fresh_config, (models, batches)


def apply_reload(pipeline: Any, old_config: Any, fresh_config: Any, loaded: Any) -> None:
    """On the event loop, between batches: models (scaler and weights together), model tags, scoring
    batches and wait, alert settings and robot limits apply at once; changed sources, sinks or metrics
    need a restart (said in the log)."""
    models, batches = loaded
    if models.signals is not None:
        pipeline.swap_model(models.signals.scorer, models.signals.name)
    if models.frames is not None:
        pipeline.swap_frame_model(models.frames)
    pipeline.batch = batches["signals"]
    pipeline.frame_batch = batches["frames"]
    scoring = fresh_config.scoring
    pipeline.max_wait_s = scoring.max_wait_ms / 1000
    frame_wait = scoring.frame_max_wait_ms if scoring.frame_max_wait_ms is not None else scoring.max_wait_ms
    pipeline.frame_max_wait_s = frame_wait / 1000
    pipeline.alert_options = alert_options(fresh_config)
    pipeline.limits = robot_limits(fresh_config)
    for tracker in [*pipeline.trackers.values(), *pipeline.camera_trackers.values()]:
        tracker.reconfigure(**pipeline.alert_options)
    restart = [
        name
        for name in ("sources", "sinks", "metrics", "state_dir", "overlays")
        if getattr(fresh_config, name) != getattr(old_config, name)
    ]
    if restart:
        log.warning("reloaded; changes to %s take effect on restart", ", ".join(restart))
    for model in (models.signals, models.frames):
        if model is not None:
            log.info("reloaded config and model %s (threshold %.4g)", model.name, model.card.threshold.value)


def execute(config: Any, config_path: Path | None = None) -> int:
    from daemon.config import ConfigError
    from daemon.metrics import MetricsServer
    from daemon.models import load_models
    from daemon.pipeline import FileSink, Pipeline, Sink
    from daemon.sinks.influx import InfluxSink, target_from_config
    from flows.artifact import ModelFormatError
    from ingest.stream import SourceUnavailable

    try:
        models, batches = load_models(config)
    except (ModelFormatError, ValueError) as err:
        raise UsageError(str(err)) from err
    sources = build_sources(config, models)
    overlays = None
    if models.frames is not None:
        from daemon.overlays import OverlayStore

        try:
            overlays = OverlayStore(
                config.overlays.dir,
                max_files=config.overlays.max_files,
                max_bytes=max(int(config.overlays.max_mb * 2**20), 1),
            )
        except OSError as err:
            close_unstarted(sources)
            raise UsageError(f"overlays.dir: {config.overlays.dir}: {err}") from err
    names = ", ".join(m.name for m in (models.signals, models.frames) if m is not None)
    sinks: list[Sink] = []
    if config.sinks.file is not None:
        file = config.sinks.file
        sinks.append(FileSink(file.path, max_bytes=max(int(file.max_mb * 2**20), 1), keep=file.keep))
    if config.sinks.influxdb is not None:
        influx = config.sinks.influxdb
        try:
            target = target_from_config(influx)  # secrets resolved and redacted from the logs
        except ConfigError as err:
            raise UsageError(str(err)) from err
        try:
            sinks.append(
                InfluxSink(
                    target,
                    influx.spool_dir,
                    batch_points=influx.batch_points,
                    flush_interval_s=influx.flush_interval_ms / 1000,
                    spool_max_bytes=max(int(influx.spool_max_mb * 2**20), 1),
                    create_database=influx.create_database,
                )
            )
        except OSError as err:  # e.g. the spool directory is in use by another daemon
            close_unstarted(sources)
            raise UsageError(f"sinks.influxdb.spool_dir: {err}") from err
    pipeline = Pipeline(
        sources,
        models,
        sinks,
        batch=batches["signals"],
        frame_batch=batches["frames"],
        max_wait_ms=config.scoring.max_wait_ms,
        frame_max_wait_ms=config.scoring.frame_max_wait_ms,
        alerts=alert_options(config),
        limits=robot_limits(config),
        overlays=overlays,
    )

    async def main() -> Any:
        import signal

        from daemon.notify import Notifier

        notifier = Notifier()
        loop = asyncio.get_running_loop()
        for sink in sinks:
            if isinstance(sink, InfluxSink):
                await sink.start()
        for feed in build_feeds(config):  # these need the running loop
            await feed.start()  # never fails: a broker that is down is retried in the background
            sinks.append(feed)
            pipeline.sinks.append(feed)
        started = []
        try:
            for source in sources:
                await source.start()
                started.append(source)
        except BaseException:  # unavailable, or a source that cannot work as configured: release all
            for source in started:
                await source.aclose()
            for source in sources:
                if source not in started:
                    source.close()
            for sink in sinks:
                await sink.close(drain_timeout_s=config.stop_drain_s)
            raise
        run_task = asyncio.create_task(pipeline.run(drain_timeout_s=config.stop_drain_s), name="pipeline")

        stopping = False

        def stop() -> None:
            nonlocal stopping
            log.info("stopping: draining queued windows and the spool (up to %s s)", config.stop_drain_s)
            if not stopping:
                stopping = True
                notifier.stopping()
            pipeline.request_stop()
            for sink in sinks:  # a full spool must not hold the drain hostage to an InfluxDB outage
                if isinstance(sink, InfluxSink):
                    sink.request_stop()

        reloading: asyncio.Task[None] | None = None

        def reload() -> None:
            """SIGHUP: re-read the config file and the model off the event loop, then swap them in
            between two batches (see `apply_reload`)."""
            nonlocal reloading
            if reloading is not None and not reloading.done():
                log.warning("reload already in progress; this SIGHUP is ignored")
                return
            notifier.reloading()
            reloading = loop.create_task(reload_async(), name="reload")

        async def reload_async() -> None:
            nonlocal config
            try:
                fresh, loaded = await asyncio.to_thread(prepare_reload, config, config_path, models, sources)
                apply_reload(pipeline, config, fresh, loaded)
                config = fresh
            except (ConfigError, ModelFormatError, ValueError, OSError) as err:
                log.error("reload failed, keeping the running config and model: %s", err)
            finally:
                notifier.ready()

        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, stop)
        loop.add_signal_handler(signal.SIGHUP, reload)
        notifier.ready(status=f"scoring {len(sources)} source(s) with {names}")

        async def watchdog() -> None:
            """WATCHDOG=1 while the pipeline moves, or while it waits on a sink whose delivery loop is
            alive and retrying (an outage: backpressure, not a hang); STATUS= whenever that changes."""
            interval = notifier.watchdog_interval_s or 1.0
            last = -1
            shown = f"scoring {len(sources)} source(s) with {names}"  # READY's
            while True:
                health = [sink.status() for sink in sinks if isinstance(sink, InfluxSink)]
                waiting = any(h.waiting for h in health)
                if notifier.watchdog_interval_s and (pipeline.moving(last) or waiting):
                    notifier.watchdog()
                troubles = [h.text for h in health if h.state != "ok"]
                status = "; ".join(troubles) or f"scoring {len(sources)} source(s) with {pipeline.model_name}"
                if status != shown:
                    notifier.status(status)
                    shown = status
                last = pipeline.scored()
                await asyncio.sleep(interval)

        dog = asyncio.create_task(watchdog()) if notifier.enabled else None
        metrics = None
        if config.metrics.listen:
            metrics = MetricsServer(
                config.metrics.listen,
                lambda: collect_metrics(pipeline, sources, sinks),
                overlays=config.overlays.dir if models.frames is not None else None,
            )
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

    from ingest.errors import ConfigurationError
    from ingest.mqtt import BrokerRefused

    try:
        stats = asyncio.run(main())
    except (BrokerRefused, ConfigurationError) as err:  # refused, or a map that does not fit: a restart
        raise UsageError(str(err)) from err  # would not help
    except SourceUnavailable as err:
        # not a config error: the broker may come back; exit 75 (EX_TEMPFAIL), which the unit restarts on
        log.error("a source is unavailable at start-up: %s", err)
        if not console.is_terminal:
            console.print(f"cellwatch: source unavailable: {err}")
        return EXIT_UNAVAILABLE
    capped = f"; {stats.capped} non-finite scores capped" if stats.capped else ""
    if models.signals is not None:
        console.print(
            f"scored {stats.windows_scored} windows from {stats.cycles_in} cycles of {len(stats.robots)} "
            f"robot(s): {stats.anomalies} over the threshold{capped}; inference "
            f"{stats.inference_seconds:.1f} s in {stats.batches} batches; "
            f"{stats.alerts - stats.camera_alerts} alerts"
        )
    if models.frames is not None:
        console.print(
            f"scored {stats.frames_scored} frames from {len(stats.cameras)} camera(s): "
            f"{stats.frame_anomalies} over the threshold ({stats.overlays} overlays saved in "
            f"{config.overlays.dir}); inference {stats.frame_inference_seconds:.1f} s in "
            f"{stats.frame_batches} batches; {stats.camera_alerts} alerts"
        )
    if stats.recent_alerts:
        from rich.table import Table

        table = Table(title=f"alerts (latest {min(10, len(stats.recent_alerts))})")
        for col in (
            "robot",
            "cycles",
            "peak (threshold = 1)",
            "event (peak cycle, time in it / frame)",
            "top signals / overlay",
        ):
            table.add_column(col)
        for alert in list(stats.recent_alerts)[-10:]:
            offset = f"{alert.event_in_window_s:.2f} s" if alert.event_in_window_s is not None else "?"
            peak = alert.peak_window
            camera = getattr(peak, "frame", None)  # a camera alert: its peak is a scored frame
            if camera is not None:
                event = f"frame {camera.ref}" + (
                    f" (cycle {camera.cycle})" if camera.cycle is not None else ""
                )
                detail = f"overlay {peak.overlay}" if peak.overlay else ""
            else:
                event = f"cycle {alert.peak_cycle} at {offset}"
                detail = ", ".join(f"{n} {s:.0%}" for n, s in alert.top_signals)
            table.add_row(
                alert.robot,
                ",".join(str(c) for c in alert.cycles[:5] if c >= 0),
                f"{alert.peak_score:.2f}",
                event,
                detail,
            )
        console.print(table)
    return 0


def collect_metrics(
    pipeline: Any, sources: list[Any], sinks: list[Any]
) -> list[tuple[str, str, dict[str, str], float]]:
    """Samples for the Prometheus endpoint, read from the live objects at scrape time."""

    stats = pipeline.stats
    out: list[tuple[str, str, dict[str, str], float]] = [
        ("cellwatch_cycles_in_total", "counter", {}, stats.cycles_in),
        ("cellwatch_windows_scored_total", "counter", {}, stats.windows_scored),
        ("cellwatch_anomalous_windows_total", "counter", {}, stats.anomalies),
        ("cellwatch_alerts_total", "counter", {}, stats.alerts),
        ("cellwatch_alerts_firing", "gauge", {}, sum(t.open is not None for t in pipeline.trackers.values())),
        ("cellwatch_alert_updates_total", "counter", {}, stats.alert_updates),
        ("cellwatch_alerts_resolved_total", "counter", {}, stats.alerts_resolved),
        ("cellwatch_scores_capped_total", "counter", {}, stats.capped),
        ("cellwatch_inputs_clipped_total", "counter", {}, stats.inputs_clipped),
        ("cellwatch_robots", "gauge", {}, len(set(pipeline.windowers) | set(pipeline.trackers))),
        ("cellwatch_robots_retired_total", "counter", {}, stats.robots_retired),
        ("cellwatch_reloads_total", "counter", {}, stats.reloads),
        ("cellwatch_queue_depth", "gauge", {}, pipeline.queue.qsize()),
        ("cellwatch_inference_seconds_total", "counter", {}, stats.inference_seconds),
        ("cellwatch_inference_batches_total", "counter", {}, stats.batches),
        ("cellwatch_frames_in_total", "counter", {}, stats.frames_in),
        ("cellwatch_frames_scored_total", "counter", {}, stats.frames_scored),
        ("cellwatch_anomalous_frames_total", "counter", {}, stats.frame_anomalies),
        ("cellwatch_frame_inference_seconds_total", "counter", {}, stats.frame_inference_seconds),
        ("cellwatch_frame_batches_total", "counter", {}, stats.frame_batches),
        ("cellwatch_camera_alerts_total", "counter", {}, stats.camera_alerts),
        ("cellwatch_cycles_fused_total", "counter", {}, pipeline.fusion.fused),
        ("cellwatch_frame_queue_depth", "gauge", {}, pipeline.frame_queue.qsize()),
        ("cellwatch_cameras", "gauge", {}, len(pipeline.camera_trackers)),
    ]
    if pipeline.overlays is not None:
        out.extend(pipeline.overlays.metric_samples())
    out.append(("cellwatch_messages_in_total", "counter", {}, stats.messages_in))
    names = {source.name for source in sources}
    for name, rejected in pipeline.stream_rejections.items():
        if name not in names:  # the pipeline's own (idle robots): labelled with what it says
            out += [
                ("cellwatch_rejects_total", "counter", {"source": name, "reason": reason}, count)
                for reason, count in rejected.items()
            ]
    for source in sources:
        counts = dict(source.rejections)
        for reason, count in pipeline.stream_rejections.get(source.name, {}).items():
            counts[reason] = counts.get(reason, 0) + count
        for reason, count in counts.items():
            out.append(
                ("cellwatch_rejects_total", "counter", {"source": source.name, "reason": reason}, count)
            )
        out.extend(source.metric_samples())  # the source's own gauges and counters
    for sink in sinks:
        feed: Any = getattr(sink, "stats", None)
        if feed is not None and hasattr(feed, "dropped"):  # publish-back feeds
            name = type(sink).__name__
            out.append(("cellwatch_feed_published_total", "counter", {"sink": name}, feed.published))
            out.append(("cellwatch_feed_dropped_total", "counter", {"sink": name}, feed.dropped))
        samples = getattr(sink, "metric_samples", None)
        if samples is not None:  # the sink's own (InfluxDB spool and delivery, file sink)
            out.extend(samples())
    return out
