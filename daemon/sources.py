"""The source registry: a config block's `type:` picks the adapter that builds it.

Every adapter has the shape of `ingest.source.Source`; the pipeline knows nothing else about it. Each
entry carries a sample config block (the README and `cellwatch run --help` point at them; a test loads
every one).
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ingest.source import FRAMES, SIGNALS, Kind, Source


@dataclass(frozen=True)
class BuildContext:
    """What a builder may need besides its own block: the signal model's signal names (None without a
    signal model) and how to read a secret (registered for redaction from the logs)."""

    signals: list[str] | None
    secret: Callable[[Any], str | None]
    rate_hz: float | None = None  # the signal model's input rate (its rate x rate divider)


@dataclass(frozen=True)
class SourceType:
    type: str
    kind: Kind
    build: Callable[[Any, BuildContext], Source]
    sample: str  # a YAML block for `sources:`

    def sample_block(self) -> dict[str, Any]:
        import yaml

        block = yaml.safe_load(self.sample)
        assert isinstance(block, dict)
        return block


def _signals(ctx: BuildContext, type_: str) -> list[str]:
    if ctx.signals is None:
        raise ValueError(f"a {type_} source carries robot signals, but no MVT-Flow model is configured")
    return ctx.signals


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _start_ns(start: datetime | None, default_s: float | None = None) -> int:
    """A configured start time in ns since the epoch, exact (no float on the way); naive times are UTC."""
    if start is not None:
        aware = start if start.tzinfo is not None else start.replace(tzinfo=UTC)
        return (aware - EPOCH) // timedelta(microseconds=1) * 1000
    if default_s is not None:
        return int(default_s * 1e9)
    return time.time_ns()


def _voraus(src: Any, ctx: BuildContext) -> Source:
    from ingest.voraus.source import VorausReplaySource

    return VorausReplaySource(
        src.path,
        src.robot,
        _signals(ctx, src.type),
        speed=src.speed,
        test_split_only=src.test_split_only,
        start_ns=_start_ns(src.start, int(Path(src.path).stat().st_mtime)),
    )


def _kafka(src: Any, ctx: BuildContext) -> Source:
    from ingest.kafka import KafkaSource

    return KafkaSource(
        bootstrap=src.bootstrap,
        topic=src.topic,
        group=src.group,
        signals=_signals(ctx, src.type),
        client_id=src.client_id,
        security=kafka_security(src.security),
        dead_letter_topic=src.dead_letter_topic,
        dead_letter_queue=src.dead_letter_queue,
        max_message_bytes=src.max_message_bytes,
        start_from=src.start_from,
        queue_messages=src.queue_messages,
        session_timeout_ms=src.session_timeout_ms,
    )


def _mqtt(src: Any, ctx: BuildContext) -> Source:
    from ingest.mqtt import MqttSource

    return MqttSource(
        host=src.host,
        port=src.port,
        topic=src.topic,
        client_id=src.client_id,
        signals=_signals(ctx, src.type),
        username=src.username,
        password=ctx.secret(src.password),
        tls=mqtt_tls(src.tls),
        session_expiry_s=src.session_expiry_s,
        receive_maximum=src.receive_maximum,
        max_message_bytes=src.max_message_bytes,
        reconnect_min_s=src.reconnect_min_s,
        reconnect_max_s=src.reconnect_max_s,
        connect_retry_s=src.connect_retry_s,
        max_queued_qos0=src.max_queued_qos0,
    )


def _image_folder(src: Any, ctx: BuildContext) -> Source:
    from ingest.camera.folder import ImageFolderSource

    return ImageFolderSource(
        src.path,
        robot=src.robot,
        camera=src.camera,
        mode=src.mode,
        poll_s=src.poll_s,
        settle_s=src.settle_s,
        interval_s=src.interval_s,
        start_ns=_start_ns(src.start),
        cycle_pattern=src.cycle_pattern,
        max_bytes=int(src.max_frame_mb * 2**20),
        max_pixels=src.max_pixels,
    )


def _video(src: Any, ctx: BuildContext) -> Source:
    from ingest.camera.video import VideoSource

    is_file = "://" not in src.url
    mtime = Path(src.url).stat().st_mtime if is_file and Path(src.url).exists() else None
    return VideoSource(
        src.url,
        robot=src.robot,
        camera=src.camera,
        max_fps=src.max_fps,
        rtsp_transport=src.rtsp_transport,
        open_timeout_s=src.open_timeout_s,
        reconnect_min_s=src.reconnect_min_s,
        reconnect_max_s=src.reconnect_max_s,
        start_ns=_start_ns(src.start, mtime) if is_file else None,
        max_pixels=src.max_pixels,
    )


def _mqtt_frames(src: Any, ctx: BuildContext) -> Source:
    from ingest.camera.brokers import MqttFrameSource

    return MqttFrameSource(
        host=src.host,
        port=src.port,
        topic=src.topic,
        client_id=src.client_id,
        username=src.username,
        password=ctx.secret(src.password),
        tls=mqtt_tls(src.tls),
        session_expiry_s=src.session_expiry_s,
        receive_maximum=src.receive_maximum,
        reconnect_min_s=src.reconnect_min_s,
        reconnect_max_s=src.reconnect_max_s,
        connect_retry_s=src.connect_retry_s,
        max_bytes=int(src.max_frame_mb * 2**20),
        max_pixels=src.max_pixels,
    )


def _kafka_frames(src: Any, ctx: BuildContext) -> Source:
    from ingest.camera.brokers import KafkaFrameSource

    return KafkaFrameSource(
        bootstrap=src.bootstrap,
        topic=src.topic,
        group=src.group,
        client_id=src.client_id,
        security=kafka_security(src.security),
        start_from=src.start_from,
        queue_messages=src.queue_messages,
        session_timeout_ms=src.session_timeout_ms,
        max_bytes=int(src.max_frame_mb * 2**20),
        max_pixels=src.max_pixels,
    )


def mqtt_tls(tls: Any) -> Any:
    from ingest.mqtt import MqttTls

    if tls is None:
        return None
    return MqttTls(
        ca_file=str(tls.ca_file) if tls.ca_file else None,
        cert_file=str(tls.cert_file) if tls.cert_file else None,
        key_file=str(tls.key_file) if tls.key_file else None,
    )


def kafka_security(sec: Any) -> Any:
    from ingest.kafka import KafkaSecurity

    return KafkaSecurity(
        protocol=sec.protocol,
        ca_file=str(sec.ca_file) if sec.ca_file else None,
        cert_file=str(sec.cert_file) if sec.cert_file else None,
        key_file=str(sec.key_file) if sec.key_file else None,
        sasl_mechanism=sec.sasl_mechanism,
        username=sec.username,
        password=secret(sec.password),
    )


def secret(ref: Any) -> str | None:
    from daemon.logs import register_secret

    if ref is None:
        return None
    value = ref.resolve()
    register_secret(value)  # never in a log line, whatever a library prints
    return str(value.get_secret_value())


def _ethercat(src: Any, ctx: BuildContext) -> Source:
    from ingest.ethercat.source import EthercatSource

    if ctx.rate_hz is None:
        raise ValueError("an ethercat source carries robot signals, but no MVT-Flow model is configured")
    return EthercatSource(
        robot=src.robot,
        map_path=src.map,
        signals=_signals(ctx, src.type),
        rate_hz=ctx.rate_hz,
        capture=src.capture,
        interface=src.interface,
        speed=src.speed,
        max_rows=src.max_rows,
    )


def _block(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


REGISTRY: dict[str, SourceType] = {
    t.type: t
    for t in (
        SourceType(
            "voraus_replay",
            SIGNALS,
            _voraus,
            _block("""
                type: voraus_replay      # a voraus-AD parquet file replayed as a robot's live signals
                robot: robot1
                path: data/voraus-ad-100hz.parquet
                speed: 100               # x real time; .inf for no pacing
                test_split_only: true
            """),
        ),
        SourceType(
            "kafka",
            SIGNALS,
            _kafka,
            _block("""
                type: kafka              # signal messages (ingest/messages.py), key = robot id
                bootstrap: ["localhost:9092"]
                topic: cell.signals
                group: cellwatch
            """),
        ),
        SourceType(
            "mqtt",
            SIGNALS,
            _mqtt,
            _block("""
                type: mqtt               # signal messages over MQTT 5, QoS 1; '+' is the robot id
                host: localhost
                port: 1883
                topic: cell/+/signals
            """),
        ),
        SourceType(
            "image_folder",
            FRAMES,
            _image_folder,
            _block("""
                type: image_folder       # PNG/JPEG files dropped into a folder by the camera software
                path: camera/incoming
                robot: robot1
                camera: cam1
                mode: watch              # or replay: every file once (an MVTec-layout folder: its test split)
                cycle_pattern: 'cycle(?P<cycle>\\d+)'
            """),
        ),
        SourceType(
            "video",
            FRAMES,
            _video,
            _block("""
                type: video              # a video file, or rtsp:// / http:// from an IP camera
                url: rtsp://192.168.0.20:554/stream1
                robot: robot1
                camera: cam1
                max_fps: 5               # score at most 5 frames a second, skip the rest
            """),
        ),
        SourceType(
            "mqtt_frames",
            FRAMES,
            _mqtt_frames,
            _block("""
                type: mqtt_frames        # JPEG/PNG payloads; user properties time_ns, cycle, frame
                host: localhost
                port: 1883
                topic: cell/{robot}/camera/{camera}
            """),
        ),
        SourceType(
            "kafka_frames",
            FRAMES,
            _kafka_frames,
            _block("""
                type: kafka_frames       # JPEG/PNG values, key robot/camera; headers time_ns, cycle, frame
                bootstrap: ["localhost:9092"]
                topic: cell.camera
            """),
        ),
        SourceType(
            "ethercat",
            SIGNALS,
            _ethercat,
            _block("""
                type: ethercat           # the field bus: a capture replayed, or `interface: eth1` live
                capture: captures/bus.pcapng
                map: maps/cell.eni.xml   # or a YAML map (signals: name, address, type, scale)
                robot: robot1
                speed: 1                 # x the capture's own pace
            """),
        ),
    )
}


def build_source(src: Any, ctx: BuildContext) -> Source:
    """The adapter for one validated config block (raises ValueError, OSError or IngestError)."""
    return REGISTRY[src.type].build(src, ctx)


def kind_of(src: Any) -> Kind:
    return REGISTRY[src.type].kind
