"""``cellwatch check --config FILE``: validate a config, its model, its files and every service it names,
without starting the pipeline.

One line per check (``ok`` or ``FAIL`` with the reason) and an exit status a script or a unit's
``ExecStartPre=`` can act on: 0 all passed; 2 a config, model, file or credential error (fix the config:
restarting will not help); 75 (EX_TEMPFAIL) a broker or database that cannot be reached (try again
later). Network checks run concurrently, each bounded by ``--timeout`` (3 s by default). Nothing is
written: InfluxDB gets an empty write (which checks the database and the write permission and stores
nothing), Kafka a metadata request (no consumer group is joined, so running daemons see no rebalance),
MQTT a connect with its own client id and a clean session (the daemon's persistent session is not touched).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL (sysexits.h): the unit restarts on it, not on 2

#: MQTT CONNACK reason codes that are the config's fault (v5 and the v3.1.1 return codes 1, 2, 4, 5)
MQTT_CONFIG_CODES = {1, 2, 4, 5, 0x81, 0x82, 0x84, 0x85, 0x86, 0x87, 0x8C, 0x90, 0x95, 0x9A}


class Failure(Exception):
    """A failed check: `kind` is "config" (exit 2) or "unreachable" (exit 75)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass
class Result:
    check: str
    ok: bool
    detail: str
    kind: str = "ok"  # ok | config | unreachable


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="validate a config, its model and files, and reach every source and sink (nothing starts)",
        description=(
            "Validate the config (fields and values), load the model and check its card, open each replay "
            "file and check its rate and signals against the model, read each credential, and reach every "
            "source and sink: InfluxDB (/ping, then an empty write: the database exists and may be written), "
            "Kafka (bootstrap connect and metadata), MQTT (connect). Prints one line per check. Exit status: "
            "0 all passed; 2 a config, model, file or credential error; 75 (EX_TEMPFAIL) a service that "
            "cannot be reached."
        ),
    )
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of lines")
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds allowed for each network check (default 3)"
    )
    p.add_argument(
        "--credentials-dir",
        type=Path,
        help="where relative secret files ({file: NAME}) are read: default $CREDENTIALS_DIRECTORY, else "
        "CONFIG_DIR/credentials when it exists (where install-service puts them), else as given",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = check(args.config, timeout_s=args.timeout, credentials_dir=args.credentials_dir)
    status = exit_status(results)
    if args.json:
        print(json.dumps({"exit_status": status, "checks": [asdict(r) for r in results]}, indent=2))
        return status
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'}  {r.check}: {r.detail}")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} checks failed (exit {status})", file=sys.stderr)
    else:
        print(f"all {len(results)} checks passed", file=sys.stderr)
    return status


def exit_status(results: list[Result]) -> int:
    kinds = {r.kind for r in results if not r.ok}
    if "config" in kinds:
        return EXIT_CONFIG
    if "unreachable" in kinds:
        return EXIT_TEMPFAIL
    return EXIT_OK


def check(config_path: Path, *, timeout_s: float = 3.0, credentials_dir: Path | None = None) -> list[Result]:
    from daemon.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as err:
        return [Result("config", False, str(err), "config")]
    sinks = [name for name in ("influxdb", "file", "mqtt", "kafka") if getattr(config.sinks, name)]
    results = [
        Result(
            "config",
            True,
            f"{config_path}: {len(config.sources)} source(s), sinks {', '.join(sinks)}; "
            f"relative paths resolve in {config.state_dir}",
        )
    ]
    if credentials_dir is None:
        if os.environ.get("CREDENTIALS_DIRECTORY"):
            credentials_dir = Path(os.environ["CREDENTIALS_DIRECTORY"])
        elif (config_path.parent / "credentials").is_dir():
            credentials_dir = config_path.parent / "credentials"
    secrets = _secrets(config, credentials_dir, results)
    models = _model(config, results)
    if models is not None:
        _replays(config, models, results)
    _paths(config, results)
    network = _network_checks(config, secrets, timeout_s)
    results.extend(asyncio.run(_run_all(network, timeout_s)))
    return results


def _secrets(config: Any, credentials_dir: Path | None, results: list[Result]) -> dict[str, str | None]:
    """Each secret the config names, read as the daemon will; a failure is a config error."""
    from daemon.commands.install_service import secret_refs
    from daemon.config import ConfigError, SecretRef
    from daemon.logs import register_secret

    values: dict[str, str | None] = {}
    for where, ref in secret_refs(config):
        if ref.file is not None and not ref.file.is_absolute() and credentials_dir is not None:
            ref = SecretRef(file=credentials_dir / ref.file)
        try:
            value = ref.resolve()
        except ConfigError as err:
            results.append(Result(where, False, str(err), "config"))
            values[where] = None
            continue
        register_secret(value)
        values[where] = value.get_secret_value()
        origin = f"${ref.env}" if ref.env else str(ref.file)
        if not values[where]:
            results.append(Result(where, False, f"{origin} is empty", "config"))
        else:
            results.append(Result(where, True, f"read from {origin}"))
    return values


def _model(config: Any, results: list[Result]) -> Any:
    """Load every configured model as the daemon does (its kind from its card, one per kind)."""
    from daemon.models import load_models
    from flows.artifact import ModelFormatError

    try:
        models, _ = load_models(config)
    except (ModelFormatError, ValueError, OSError) as err:
        results.append(Result("model", False, str(err), "config"))
        return None
    if models.signals is not None:
        card = models.signals.card
        results.append(
            Result(
                "model",
                True,
                f"{models.signals.name}: "
                f"{'fused (MVT-Flow + linear residuals)' if card.detector == 'fusion' else 'MVT-Flow'}, "
                f"{card.mode} mode, {card.rate_hz:g} Hz, "
                f"{len(card.signals)} signals, {card.time_steps} steps, threshold {card.threshold.value:.4g}",
            )
        )
    if models.frames is not None:
        card = models.frames.card
        height, width = card.input_size
        results.append(
            Result(
                "model",
                True,
                f"{models.frames.name}: AST, {height}x{width} input, threshold {card.threshold.value:.4g}",
            )
        )
    return models


BROKER_SOURCES = ("kafka", "mqtt", "kafka_frames", "mqtt_frames")


def _replays(config: Any, models: Any, results: list[Result]) -> None:
    """Each source can be built for the configured models (a replay file opens and fits the signal model's
    signals and rate; a camera source has an image model): the daemon's own start-up checks."""
    from daemon.cli_support import UsageError
    from daemon.commands.run import build_sources, close_unstarted

    for i, src in enumerate(config.sources):
        if src.type in BROKER_SOURCES:
            continue  # their secrets and brokers are checked below
        name = f"sources[{i}] {src.type}" + (f" {src.robot}" if hasattr(src, "robot") else "")
        try:
            sources = build_sources(config.model_copy(update={"sources": [src]}), models)
        except UsageError as err:
            results.append(Result(name, False, str(err), "config"))
            continue
        reader = getattr(sources[0], "reader", None)
        close_unstarted(sources)
        if reader is not None:
            results.append(Result(name, True, f"{src.path}: {reader.rate_hz:g} Hz, signals match the model"))
        else:
            results.append(Result(name, True, f"{sources[0].name}: ready"))


def _paths(config: Any, results: list[Result]) -> None:
    """The file sink and the spool: where they go must be (or become) a directory."""
    places = []
    if config.sinks.file is not None:
        places.append(("sinks.file.path", config.sinks.file.path.parent, config.sinks.file.path))
    if config.sinks.influxdb is not None:
        spool = config.sinks.influxdb.spool_dir
        places.append(("sinks.influxdb.spool_dir", spool, spool))
    for where, directory, shown in places:
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            results.append(Result(where, False, f"{shown}: {existing} is not a directory", "config"))
        else:
            state = "exists" if existing == directory else f"will be created in {existing}"
            results.append(Result(where, True, f"{shown} ({directory} {state})"))


Check = tuple[str, Callable[[], Awaitable[str]]]


def _network_checks(config: Any, secrets: dict[str, str | None], timeout_s: float) -> list[Check]:
    from daemon.config import KafkaFramesSource, KafkaSource, MqttFramesSource, MqttSource

    checks: list[Check] = []
    for i, src in enumerate(config.sources):
        if isinstance(src, MqttSource | MqttFramesSource):
            pw = secrets.get(f"sources[{i}].password")
            checks.append((f"sources[{i}] {src.type} {src.host}:{src.port}", _mqtt(src, pw, timeout_s)))
        elif isinstance(src, KafkaSource | KafkaFramesSource):
            pw = secrets.get(f"sources[{i}].security.password")
            dead = getattr(src, "dead_letter_topic", None)
            topics = [src.topic] + ([dead] if dead else [])
            name = f"sources[{i}] {src.type} {','.join(src.bootstrap)}"
            checks.append((name, _kafka(src.bootstrap, src.client_id, src.security, pw, topics, timeout_s)))
    sinks = config.sinks
    if sinks.influxdb is not None:
        influx = sinks.influxdb
        password, token = secrets.get("sinks.influxdb.password"), secrets.get("sinks.influxdb.token")
        checks.append((f"sinks.influxdb {influx.url}", _influx(influx, password, token, timeout_s)))
    if sinks.mqtt is not None:
        pw = secrets.get("sinks.mqtt.password")
        checks.append((f"sinks.mqtt {sinks.mqtt.host}:{sinks.mqtt.port}", _mqtt(sinks.mqtt, pw, timeout_s)))
    if sinks.kafka is not None:
        kafka = sinks.kafka
        pw = secrets.get("sinks.kafka.security.password")
        name = f"sinks.kafka {','.join(kafka.bootstrap)}"
        topics = [kafka.score_topic, kafka.alert_topic]
        checks.append((name, _kafka(kafka.bootstrap, kafka.client_id, kafka.security, pw, topics, timeout_s)))
    return checks


async def _run_all(checks: list[Check], timeout_s: float) -> list[Result]:
    async def one(name: str, probe: Callable[[], Awaitable[str]]) -> Result:
        try:
            async with asyncio.timeout(timeout_s + 1):  # each probe has its own timeout; this bounds them all
                return Result(name, True, await probe())
        except Failure as err:
            return Result(name, False, err.detail, err.kind)
        except TimeoutError:
            return Result(name, False, f"no answer within {timeout_s:g} s", "unreachable")

    return list(await asyncio.gather(*(one(name, probe) for name, probe in checks)))


def _mqtt(cfg: Any, password: str | None, timeout_s: float) -> Callable[[], Awaitable[str]]:
    async def probe() -> str:
        import aiomqtt

        from daemon.sources import mqtt_tls

        try:
            tls = mqtt_tls(cfg.tls)
            context = tls.context() if tls else None
        except (OSError, ValueError) as err:
            raise Failure("config", f"TLS files: {err}") from None
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            # never the daemon's own id: the broker would disconnect the running daemon
            identifier=f"{cfg.client_id}-check-{os.getpid()}"[:128],
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            username=cfg.username,
            password=password,
            tls_context=context,
            timeout=timeout_s,
        )
        try:
            async with client:
                pass
        except aiomqtt.MqttCodeError as err:
            code = getattr(err.rc, "value", err.rc)
            kind = "config" if isinstance(code, int) and code in MQTT_CONFIG_CODES else "unreachable"
            raise Failure(kind, f"the broker refused the connection: {err}") from None
        except ssl.SSLError as err:
            raise Failure("config", f"TLS: {err}") from None
        except (aiomqtt.MqttError, OSError) as err:
            raise Failure("unreachable", f"cannot connect: {err}") from None
        who = f" as {cfg.username}" if cfg.username else ""
        return f"connected{who} (MQTT 5{', TLS' if context else ''})"

    return probe


def _kafka(
    bootstrap: list[str],
    client_id: str,
    security: Any,
    password: str | None,
    topics: list[str],
    timeout_s: float,
) -> Callable[[], Awaitable[str]]:
    async def probe() -> str:
        from aiokafka.client import AIOKafkaClient
        from aiokafka.errors import KafkaError

        from daemon.sources import kafka_security

        try:
            options = kafka_security(security.model_copy(update={"password": None})).options()
        except (OSError, ValueError) as err:
            raise Failure("config", f"TLS files: {err}") from None
        if password is not None:
            options["sasl_plain_password"] = password
        client = AIOKafkaClient(
            bootstrap_servers=bootstrap,
            client_id=f"{client_id}-check",
            request_timeout_ms=int(timeout_s * 1000),
            **options,
        )
        try:
            async with asyncio.timeout(timeout_s):
                await client.bootstrap()
                metadata = await client.fetch_all_metadata()
        except TimeoutError:
            raise Failure("unreachable", f"no answer within {timeout_s:g} s") from None
        except ssl.SSLError as err:
            raise Failure("config", f"TLS: {err}") from None
        except (KafkaError, OSError) as err:
            name = type(err).__name__
            kind = "config" if "Auth" in name or "Sasl" in name else "unreachable"
            raise Failure(kind, f"cannot connect: {name}: {err}") from None
        finally:
            await client.close()
        known = metadata.topics()
        missing = [t for t in topics if t not in known]
        brokers = len(metadata.brokers())
        if missing:
            return (
                f"{brokers} broker(s); topic(s) {', '.join(missing)} not there yet "
                "(created on first use where the broker auto-creates topics)"
            )
        return f"{brokers} broker(s); topic(s) {', '.join(topics)} exist"

    return probe


def _influx(
    cfg: Any, password: str | None, token: str | None, timeout_s: float
) -> Callable[[], Awaitable[str]]:
    base = cfg.url.rstrip("/")
    headers: dict[str, str] = {}
    if cfg.api == "v1" and cfg.username:
        creds = f"{cfg.username}:{password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()
    elif cfg.api == "v2" and token:
        headers["Authorization"] = f"Token {token}"

    def request(url: str, data: bytes | None = None) -> tuple[int, bytes]:
        method = "POST" if data is not None else "GET"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:  # noqa: S310
                return int(response.status), response.read(64 * 1024)
        except urllib.error.HTTPError as err:
            return int(err.code), err.read(64 * 1024)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise Failure("unreachable", f"cannot connect: {reason}") from None

    def probe_sync() -> str:
        status, _ = request(f"{base}/ping")
        if status not in (200, 204):
            raise Failure("unreachable", f"/ping answered HTTP {status}")
        if cfg.api == "v1":
            params = {"db": cfg.database, "precision": "ns"}
            if cfg.retention_policy:
                params["rp"] = cfg.retention_policy
            # an empty write: checks the credentials, the database and the write permission, stores nothing
            status, body = request(f"{base}/write?{urllib.parse.urlencode(params)}", b"")
            target = f"database {cfg.database}"
        else:
            params = {"name": cfg.bucket, "org": cfg.org}
            status, body = request(f"{base}/api/v2/buckets?{urllib.parse.urlencode(params)}")
            target = f"bucket {cfg.bucket}"
            if status == 200 and not json.loads(body or b"{}").get("buckets"):
                status, body = 404, b"bucket not found"
        detail = body.decode(errors="replace").strip()[:200]
        if status in (401, 403):
            raise Failure("config", f"HTTP {status}: credentials refused ({detail})")
        if status == 404:
            hint = f' (CREATE DATABASE "{cfg.database}")' if cfg.api == "v1" else ""
            raise Failure("config", f"{target} does not exist{hint}: {detail}")
        if status >= 500:
            raise Failure("unreachable", f"HTTP {status}: {detail}")
        if status not in (200, 204):
            raise Failure("config", f"HTTP {status}: {detail}")
        return f"ping ok, {target} exists and accepts writes (API {cfg.api})"

    async def probe() -> str:
        return await asyncio.to_thread(probe_sync)

    return probe
