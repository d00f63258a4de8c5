"""The daemon's configuration: one YAML file, validated at start-up with typed models.

A bad config fails before anything starts, with the field path and the bad value, e.g.
``sources[0].speed: must be greater than 0 (got -1)``. Secrets (InfluxDB password or token, broker
passwords) are never written in the file itself: they come from a file (``*_file``, e.g. a systemd
credential under $CREDENTIALS_DIRECTORY) or an environment variable (``*_env``), and are kept as
``SecretStr`` so they never show in logs or error messages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_CONFIG_BYTES = 1 * 2**20
MAX_SECRET_BYTES = 64 * 2**10


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Strict):
    """Where a secret comes from: a file (e.g. a systemd credential) or an environment variable."""

    file: Path | None = None
    env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of 'file' or 'env'")
        return self

    def resolve(self) -> SecretStr:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"environment variable {self.env} (a secret) is not set")
            return SecretStr(value)
        assert self.file is not None
        path = self.file
        if not path.is_absolute() and "CREDENTIALS_DIRECTORY" in os.environ:
            path = Path(os.environ["CREDENTIALS_DIRECTORY"]) / path  # systemd LoadCredential=
        try:
            if path.stat().st_size > MAX_SECRET_BYTES:
                raise ConfigError(f"secret file {path} is larger than {MAX_SECRET_BYTES} bytes")
            return SecretStr(path.read_text().strip())
        except OSError as err:
            raise ConfigError(f"cannot read secret file {path}: {err.strerror}") from None


class VorausReplaySource(_Strict):
    type: Literal["voraus_replay"]
    robot: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path
    speed: float = Field(
        default=1.0, gt=0, description="real-time factor; a large number replays at full speed"
    )
    test_split_only: bool = Field(
        default=True, description="replay only test cycles (not PRE_A training cycles)"
    )
    start: datetime | None = Field(
        default=None, description="timestamp of the recording's start; default: the file's modification time"
    )


class KafkaSecurityConfig(_Strict):
    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    username: str | None = None
    password: SecretRef | None = None

    @model_validator(mode="after")
    def _sasl_needs(self) -> KafkaSecurityConfig:
        if self.protocol.startswith("SASL") and not (self.username and self.password):
            raise ValueError(f"protocol {self.protocol} needs username and password")
        return self


class KafkaSource(_Strict):
    """Robot signals from a Kafka topic; message key = robot id; shared by a consumer group."""

    type: Literal["kafka"]
    bootstrap: list[Annotated[str, Field(pattern=r"^[^:\s]+:\d{1,5}$")]] = Field(min_length=1)
    topic: str = Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
    group: str = Field(default="cellwatch", min_length=1)
    client_id: str = "cellwatch"
    security: KafkaSecurityConfig = KafkaSecurityConfig()
    dead_letter_topic: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    dead_letter_queue: int = Field(
        default=100, ge=1, le=100_000, description="dead letters waiting to be written before pausing"
    )
    max_message_bytes: int = Field(default=4 * 2**20, ge=1024, le=64 * 2**20)
    start_from: Literal["earliest", "latest"] = Field(
        default="earliest", description="where a group without committed offsets starts"
    )
    queue_messages: int = Field(default=2000, ge=10, le=1_000_000)
    session_timeout_ms: int = Field(default=10_000, ge=1000, le=300_000)


class MqttTlsConfig(_Strict):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class MqttSource(_Strict):
    """Robot signals over MQTT 5, QoS 1, persistent session; the '+' level of the topic is the robot id."""

    type: Literal["mqtt"]
    host: str = Field(min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    topic: str = Field(default="cell/+/signals", pattern=r"^[^#]*\+[^#]*$")
    client_id: str = Field(default="cellwatch", min_length=1, max_length=128)
    username: str | None = None
    password: SecretRef | None = None
    tls: MqttTlsConfig | None = None
    session_expiry_s: int = Field(default=86_400, ge=0, le=2**32 - 1)
    receive_maximum: int = Field(default=4096, ge=1, le=65535)
    max_message_bytes: int = Field(default=4 * 2**20, ge=1024, le=64 * 2**20)
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    connect_retry_s: float = Field(
        default=60.0, ge=0, le=86_400, description="at start-up, retry a broker that is down this long"
    )
    max_queued_qos0: int = Field(
        default=1000, ge=1, le=1_000_000, description="QoS 0 messages queued at most (more are dropped)"
    )

    @model_validator(mode="after")
    def _one_plus(self) -> MqttSource:
        if self.topic.split("/").count("+") != 1:
            raise ValueError(f"topic needs exactly one '+' level, the robot id (got {self.topic!r})")
        return self


ROBOT_ID = r"^[A-Za-z0-9_.-]{1,64}$"


class _Camera(_Strict):
    """What every camera source shares: whose frames they are and the bounds a frame must keep."""

    max_frame_mb: float = Field(
        default=32, gt=0, le=512, description="an encoded frame (file, payload) larger than this is rejected"
    )
    max_pixels: int = Field(
        default=40_000_000, ge=1, le=400_000_000, description="a frame with more pixels is rejected"
    )


class ImageFolderSource(_Camera):
    """Camera frames as PNG/JPEG files: a folder watched for new files, or a replay of a folder (a plain
    folder or the test split of an MVTec-layout data set) that ends when every file was scored once."""

    type: Literal["image_folder"]
    path: Path
    robot: str = Field(min_length=1, max_length=64, pattern=ROBOT_ID)
    camera: str = Field(default="cam1", min_length=1, max_length=64, pattern=ROBOT_ID)
    mode: Literal["watch", "replay"] = "watch"
    poll_s: float = Field(default=0.5, gt=0, le=60, description="watch: how often the folder is listed")
    settle_s: float = Field(
        default=0.5,
        ge=0,
        le=60,
        description="watch: a file is read once its size and modification time are unchanged this long",
    )
    interval_s: float = Field(
        default=1.0, gt=0, le=86_400, description="replay: data time between frames (their timestamps)"
    )
    start: datetime | None = Field(
        default=None, description="replay: the first frame's timestamp (default: now)"
    )
    cycle_pattern: str | None = Field(
        default=None,
        description="a regular expression with a group named 'cycle' read from the file name "
        r"(e.g. 'cycle(?P<cycle>\d+)'): the voraus cycle the frame belongs to",
    )

    @field_validator("cycle_pattern")
    @classmethod
    def _pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                compiled = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
            if "cycle" not in compiled.groupindex:
                raise ValueError("needs a group named 'cycle', e.g. (?P<cycle>\\d+)")
        return pattern


class VideoSource(_Camera):
    """Camera frames from a video file or a network stream (rtsp://, http://) decoded by PyAV (FFmpeg).
    A file ends at its last frame; a stream that drops is reopened with backoff."""

    type: Literal["video"]
    url: str = Field(min_length=1, max_length=2048, description="a file path, rtsp://, rtsps://, http(s)://")
    robot: str = Field(min_length=1, max_length=64, pattern=ROBOT_ID)
    camera: str = Field(default="cam1", min_length=1, max_length=64, pattern=ROBOT_ID)
    max_fps: float | None = Field(
        default=None, gt=0, le=1000, description="frames above this rate are skipped (counted), not scored"
    )
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: float = Field(default=10.0, gt=0, le=300)
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    start: datetime | None = Field(
        default=None,
        description="a file: the first frame's timestamp (default: the file's modification time)",
    )


class MqttFramesSource(_Camera):
    """JPEG/PNG frames over MQTT 5 (QoS 1, acknowledged once scored and written). The topic template
    names the robot and the camera; user properties `time_ns`, `cycle`, `frame` carry the timestamp, the
    voraus cycle and the frame number (each optional)."""

    type: Literal["mqtt_frames"]
    host: str = Field(min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    topic: str = Field(default="cell/{robot}/camera/{camera}")
    client_id: str = Field(default="cellwatch-camera", min_length=1, max_length=128)
    username: str | None = None
    password: SecretRef | None = None
    tls: MqttTlsConfig | None = None
    session_expiry_s: int = Field(default=86_400, ge=0, le=2**32 - 1)
    receive_maximum: int = Field(default=64, ge=1, le=65535)
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    connect_retry_s: float = Field(default=60.0, ge=0, le=86_400)

    @field_validator("topic")
    @classmethod
    def _template(cls, topic: str) -> str:
        levels = topic.split("/")
        if levels.count("{robot}") != 1 or levels.count("{camera}") != 1:
            raise ValueError(f"topic needs the levels {{robot}} and {{camera}}, once each (got {topic!r})")
        if any(c in topic for c in "+#"):
            raise ValueError(
                f"topic is a template with {{robot}} and {{camera}}, not a filter (got {topic!r})"
            )
        return topic


class KafkaFramesSource(_Strict):
    """JPEG/PNG frames from a Kafka topic (offsets committed once scored and written). The message key is
    `robot/camera`; headers `time_ns`, `cycle`, `frame` carry the timestamp, the voraus cycle and the
    frame number (each optional; the record's timestamp is the default time)."""

    type: Literal["kafka_frames"]
    bootstrap: list[Annotated[str, Field(pattern=r"^[^:\s]+:\d{1,5}$")]] = Field(min_length=1)
    topic: str = Field(default="cell.camera", min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
    group: str = Field(default="cellwatch-camera", min_length=1)
    client_id: str = "cellwatch-camera"
    security: KafkaSecurityConfig = KafkaSecurityConfig()
    start_from: Literal["earliest", "latest"] = "earliest"
    queue_messages: int = Field(default=64, ge=4, le=100_000)
    session_timeout_ms: int = Field(default=10_000, ge=1000, le=300_000)
    max_frame_mb: float = Field(default=8, gt=0, le=64, description="a larger message is rejected")
    max_pixels: int = Field(default=40_000_000, ge=1, le=400_000_000)


class EthercatSource(_Strict):
    """Robot signals off the EtherCAT bus: a capture file (pcap/pcapng) replayed at its own pace, or live
    capture on a network interface (needs CAP_NET_RAW: the unit's capture drop-in), mapped to named
    signals by an ENI file or a YAML map."""

    type: Literal["ethercat"]
    map: Path = Field(description="an ENI (XML) or a YAML map of the process image")
    capture: Path | None = Field(default=None, description="a pcap/pcapng capture to replay")
    interface: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.:@-]{1,15}$", description="live capture on this interface"
    )
    robot: str | None = Field(
        default=None, pattern=ROBOT_ID, description="the robot id (default: the map's `robot`, else robot1)"
    )
    speed: float = Field(
        default=1.0, gt=0, description="capture replay: x its own pace; a large number: full speed"
    )
    max_rows: int = Field(default=100, ge=1, le=100_000, description="rows per signal message at most")

    @model_validator(mode="after")
    def _one_input(self) -> EthercatSource:
        if (self.capture is None) == (self.interface is None):
            raise ValueError("give `capture` (a file) or `interface` (live), not both")
        return self


Source = Annotated[
    VorausReplaySource
    | KafkaSource
    | MqttSource
    | ImageFolderSource
    | VideoSource
    | MqttFramesSource
    | KafkaFramesSource
    | EthercatSource,
    Field(discriminator="type"),
]
SOURCE_TYPES: tuple[str, ...] = (
    "voraus_replay",
    "kafka",
    "mqtt",
    "image_folder",
    "video",
    "mqtt_frames",
    "kafka_frames",
    "ethercat",
)


class ModelConfig(_Strict):
    path: Path
    batch: int | None = Field(
        default=None, ge=1, le=4096, description="micro-batch of this model (default: scoring.batch)"
    )


class ScoringConfig(_Strict):
    mode: Literal["cycle", "window"] = "cycle"
    batch: int = Field(default=32, ge=1, le=4096, description="micro-batch of the signal model")
    frame_batch: int = Field(default=8, ge=1, le=1024, description="micro-batch of the image model")
    max_wait_ms: int = Field(default=50, ge=0, le=60_000, description="longest a batch waits to fill")
    frame_max_wait_ms: int | None = Field(
        default=None,
        ge=0,
        le=60_000,
        description="the image model's (default: max_wait_ms); longer fills batches of frames, which score "
        "at about half the cost per frame of single frames on a CPU, at that cost in latency",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False


class InfluxConfig(_Strict):
    url: str = Field(pattern=r"^https?://")
    api: Literal["v1", "v2"] = "v1"
    database: str = "cellwatch"
    retention_policy: str | None = None
    username: str | None = None
    password: SecretRef | None = None
    org: str | None = None
    bucket: str | None = None
    token: SecretRef | None = None
    batch_points: int = Field(default=5000, ge=1, le=100_000)
    flush_interval_ms: int = Field(
        default=1000, ge=1, le=60_000, description="longest a point waits in memory before the spool"
    )
    spool_dir: Path = Path("spool")
    spool_max_mb: float = Field(
        default=256, gt=0, le=1_000_000, description="bound of the on-disk spool; fractions allowed (0.5)"
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    create_database: bool = Field(
        default=True, description="v1: create the database at start-up if missing (needs admin rights)"
    )

    @model_validator(mode="after")
    def _v2_needs(self) -> InfluxConfig:
        if self.api == "v2" and not (self.org and self.bucket and self.token):
            raise ValueError("api v2 needs org, bucket and token")
        return self


class FileSinkConfig(_Strict):
    path: Path = Path("scores.jsonl")
    max_mb: float = Field(default=100, gt=0, le=1_000_000, description="rotate when the file would pass this")
    keep: int = Field(default=5, ge=1, le=1000, description="rotated files kept: scores.jsonl.1 ... .keep")


class MqttPublishConfig(_Strict):
    """Scores and alerts published back to MQTT as JSON (a best-effort live feed; retained state)."""

    host: str = Field(min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str = Field(default="cellwatch-publisher", min_length=1, max_length=128)
    score_topic: str = Field(default="cell/{robot}/anomaly", pattern=r"\{robot\}")
    alert_topic: str = Field(default="cell/{robot}/alert", pattern=r"\{robot\}")
    qos: Literal[0, 1, 2] = 1
    retain: bool = True
    username: str | None = None
    password: SecretRef | None = None
    tls: MqttTlsConfig | None = None
    queue_points: int = Field(default=10_000, ge=1, le=10_000_000)


class KafkaPublishConfig(_Strict):
    """Scores and alerts published back to Kafka as JSON, keyed by robot id (best-effort live feed)."""

    bootstrap: list[Annotated[str, Field(pattern=r"^[^:\s]+:\d{1,5}$")]] = Field(min_length=1)
    score_topic: str = Field(default="cellwatch.scores", pattern=r"^[A-Za-z0-9._-]+$")
    alert_topic: str = Field(default="cellwatch.alerts", pattern=r"^[A-Za-z0-9._-]+$")
    client_id: str = "cellwatch-publisher"
    security: KafkaSecurityConfig = KafkaSecurityConfig()
    queue_points: int = Field(default=10_000, ge=1, le=10_000_000)


class SinksConfig(_Strict):
    influxdb: InfluxConfig | None = None
    file: FileSinkConfig | None = None
    mqtt: MqttPublishConfig | None = None
    kafka: KafkaPublishConfig | None = None

    @model_validator(mode="after")
    def _default_file(self) -> SinksConfig:
        if self.influxdb is None and self.file is None:
            # embedded default: with no database configured, scores go to a local file
            object.__setattr__(self, "file", FileSinkConfig())
        return self


class AlertConfig(_Strict):
    k: int = Field(default=1, ge=1, description="windows over the threshold ...")
    n: int = Field(default=1, ge=1, description="... out of the last n windows open an alert")
    min_duration_s: float = Field(default=0.0, ge=0)
    cooldown_s: float = Field(default=0.0, ge=0)
    update_interval_s: float = Field(
        default=10.0, gt=0, le=86_400, description="a firing alert is re-sent at most this often (data time)"
    )

    @model_validator(mode="after")
    def _k_le_n(self) -> AlertConfig:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        return self


class RobotsConfig(_Strict):
    """Bounds on per-robot state: robot ids come from topics and message keys, which anyone on the bus
    can make up; each robot costs a windower, an alert tracker and InfluxDB series."""

    max_robots: int = Field(default=1000, ge=1, le=1_000_000)
    allow: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]] | None = Field(
        default=None, description="only these robot ids are scored; others are rejected and counted"
    )
    idle_timeout_s: float | None = Field(
        default=600.0,
        gt=0,
        le=7 * 86_400,
        description="a robot silent this long is forgotten: an unfinished cycle is rejected, its open "
        "alert resolves (null: never)",
    )


class MetricsConfig(_Strict):
    listen: str | None = Field(default="127.0.0.1:9108", pattern=r"^[^:\s]+:\d{1,5}$")


class OverlayConfig(_Strict):
    """Anomaly-map overlays of frames over the threshold, as PNG files in the state directory: the oldest
    are deleted first once either bound is reached; `latest/ROBOT_CAMERA.png` is the newest per camera
    (served at /overlays/ by the metrics endpoint)."""

    dir: Path = Path("overlays")
    max_files: int = Field(default=500, ge=1, le=1_000_000)
    max_mb: float = Field(default=200, gt=0, le=1_000_000)


class Config(_Strict):
    sources: list[Source] = Field(min_length=1)
    model: ModelConfig | None = Field(default=None, description="the model; `models` to name several")
    models: list[ModelConfig] = Field(
        default_factory=list,
        max_length=2,
        description="one model per kind of data: an MVT-Flow for signal sources, an AST for camera sources "
        "(the model's own card says which it is)",
    )
    overlays: OverlayConfig = OverlayConfig()
    scoring: ScoringConfig = ScoringConfig()
    sinks: SinksConfig = SinksConfig()
    alerts: AlertConfig = AlertConfig()
    robots: RobotsConfig = RobotsConfig()
    metrics: MetricsConfig = MetricsConfig()
    state_dir: Path | None = Field(
        default=None,
        description="where relative paths resolve (default: $STATE_DIRECTORY, else the config's directory)",
    )
    stop_drain_s: float = Field(default=20.0, gt=0, le=600, description="bounded drain on SIGTERM")

    @model_validator(mode="after")
    def _one_model_field(self) -> Config:
        if self.model is None and not self.models:
            raise ValueError("give `model` (one model) or `models` (one per kind of data)")
        if self.model is not None and self.models:
            raise ValueError("give `model` or `models`, not both")
        return self

    @property
    def model_list(self) -> list[ModelConfig]:
        """Every configured model (`model` or `models`)."""
        return [self.model] if self.model is not None else list(self.models)

    @model_validator(mode="after")
    def _unique_cameras(self) -> Config:
        cameras = [
            (s.robot, s.camera) for s in self.sources if isinstance(s, ImageFolderSource | VideoSource)
        ]
        duplicates = sorted({f"{r}/{c}" for r, c in cameras if cameras.count((r, c)) > 1})
        if duplicates:
            raise ValueError(f"robot/camera pairs must be unique, repeated: {duplicates}")
        return self

    @model_validator(mode="after")
    def _unique_robots(self) -> Config:
        robots = [s.robot for s in self.sources if isinstance(s, VorausReplaySource)]
        duplicates = sorted({r for r in robots if robots.count(r) > 1})
        if duplicates:
            raise ValueError(f"robot ids must be unique, repeated: {duplicates}")
        return self


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    previous: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(previous, int) and part in SOURCE_TYPES:
            pass  # the discriminator tag pydantic inserts after a list index (sources[0].kafka.topic)
        else:
            out += f".{part}" if out else str(part)
        previous = part
    return out or "(top level)"


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors(include_url=False):
        where = _location(tuple(e["loc"]))
        message = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        secret = any(str(p) in ("password", "token") for p in e["loc"])
        shown = "" if secret or isinstance(value, dict | list) else f" (got {value!r})"
        lines.append(f"{where}: {message}{shown}")
    return "; ".join(lines)


def parse_config(data: Any, *, origin: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{origin}: {_describe(err)}") from None


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config (bounded size, safe loader); relative paths are made absolute
    against `base_dir` (see there), which becomes the returned config's `state_dir`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except (ValueError, TypeError, AttributeError, LookupError, OverflowError, RecursionError) as err:
        # found by fuzzing: PyYAML's constructors raise these for malformed typed scalars
        # (`2026-13-45`, `!!float x`, `!!timestamp x`, `!!int ""`, `!!bool x`) and its composer
        # recurses on deep nesting
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(f"{path}: not valid YAML: {type(err).__name__}: {detail}") from None
    config = parse_config(data, origin=str(path))
    return _rebase(config, base_dir(config, path, os.environ if environ is None else environ))


def base_dir(config: Config, path: Path, environ: Mapping[str, str]) -> Path:
    """Where the config's relative paths (model, replay files, file sink, spool) resolve:

    1. `state_dir` when the config sets it (a relative `state_dir` is relative to the config's directory);
    2. else `$STATE_DIRECTORY`, set by systemd's `StateDirectory=` (the first entry when it lists several),
       so that a service never writes into its read-only configuration directory;
    3. else the config file's own directory, as someone running it by hand expects.
    """
    config_dir = path.parent.resolve()
    if config.state_dir is not None:
        return config_dir / config.state_dir  # an absolute state_dir replaces config_dir
    state_directory = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        return Path(state_directory)  # absolute (systemd); not resolved: DynamicUser makes it a symlink
    return config_dir


def _rebase(config: Config, base: Path) -> Config:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    def fix_source(s: Any) -> Any:
        if isinstance(s, VorausReplaySource | ImageFolderSource):
            return s.model_copy(update={"path": fix(s.path)})
        if isinstance(s, EthercatSource):
            return s.model_copy(
                update={"map": fix(s.map), "capture": fix(s.capture) if s.capture is not None else None}
            )
        if isinstance(s, VideoSource) and "://" not in s.url:  # a file, not a stream
            return s.model_copy(update={"url": str(fix(Path(s.url)))})
        return s

    sources = [fix_source(s) for s in config.sources]
    sinks = config.sinks
    updates: dict[str, Any] = {}
    if sinks.file is not None:
        updates["file"] = sinks.file.model_copy(update={"path": fix(sinks.file.path)})
    if sinks.influxdb is not None:
        updates["influxdb"] = sinks.influxdb.model_copy(update={"spool_dir": fix(sinks.influxdb.spool_dir)})
    return config.model_copy(
        update={
            "sources": sources,
            "model": config.model.model_copy(update={"path": fix(config.model.path)})
            if config.model
            else None,
            "models": [m.model_copy(update={"path": fix(m.path)}) for m in config.models],
            "overlays": config.overlays.model_copy(update={"dir": fix(config.overlays.dir)}),
            "sinks": sinks.model_copy(update=updates),
            "state_dir": base,
        }
    )


def resolve_secrets(influx: InfluxConfig) -> tuple[SecretStr | None, SecretStr | None]:
    """(password, token) of the InfluxDB sink, read from their files or environment variables."""
    return (
        influx.password.resolve() if influx.password else None,
        influx.token.resolve() if influx.token else None,
    )
