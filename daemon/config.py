"""The daemon's configuration: one YAML file, validated at start-up with typed models.

A bad config fails before anything starts, with the field path and the bad value, e.g.
``sources[0].speed: must be greater than 0 (got -1)``. Secrets (InfluxDB password or token, broker
passwords) are never written in the file itself: they come from a file (``*_file``, e.g. a systemd
credential under $CREDENTIALS_DIRECTORY) or an environment variable (``*_env``), and are kept as
``SecretStr`` so they never show in logs or error messages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

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


Source = Annotated[VorausReplaySource | KafkaSource | MqttSource, Field(discriminator="type")]


class ModelConfig(_Strict):
    path: Path


class ScoringConfig(_Strict):
    mode: Literal["cycle", "window"] = "cycle"
    batch: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: int = Field(default=50, ge=0, le=60_000)
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


class Config(_Strict):
    sources: list[Source] = Field(min_length=1)
    model: ModelConfig
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
        elif isinstance(previous, int) and part in ("voraus_replay", "kafka", "mqtt"):
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

    sources = [
        s.model_copy(update={"path": fix(s.path)}) if isinstance(s, VorausReplaySource) else s
        for s in config.sources
    ]
    sinks = config.sinks
    updates: dict[str, Any] = {}
    if sinks.file is not None:
        updates["file"] = sinks.file.model_copy(update={"path": fix(sinks.file.path)})
    if sinks.influxdb is not None:
        updates["influxdb"] = sinks.influxdb.model_copy(update={"spool_dir": fix(sinks.influxdb.spool_dir)})
    return config.model_copy(
        update={
            "sources": sources,
            "model": config.model.model_copy(update={"path": fix(config.model.path)}),
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
