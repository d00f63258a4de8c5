"""The MQTT source over TLS with a username and a password read from a file (as a systemd credential),
against a real Mosquitto that allows nothing else: the daemon scores what arrives, a wrong password
stops it at start-up with a clear error, and the password never shows in its log."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from brokers import SecureMosquittoServer
from daemons import CELLWATCH, Daemon
from services import wait_until

from ingest.loadgen import plan, robot_ids
from ingest.messages import encode_arrow
from ingest.mqtt import BrokerRefused, MqttSource, MqttTls
from ingest.voraus import schema

pytestmark = pytest.mark.slow
PASSWORD = "s3cret-Pa55word"
T0 = 1_714_543_200_000_000_000


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMosquittoServer]:
    with SecureMosquittoServer(tmp_path_factory.mktemp("mosquitto-tls"), {"cellwatch": PASSWORD}) as server:
        yield server


def config(broker: SecureMosquittoServer, model: Path, root: Path, password_file: Path) -> dict:
    return {
        "sources": [
            {
                "type": "mqtt",
                "host": "127.0.0.1",
                "port": broker.port,
                "topic": "secure/+/signals",
                "client_id": "cw-secure",
                "username": "cellwatch",
                "password": {"file": str(password_file)},
                "tls": {"ca_file": str(broker.ca)},
            }
        ],
        "model": {"path": str(model)},
        "sinks": {"file": {"path": str(root / "scores.jsonl")}},
        "state_dir": str(root),
    }


async def publish_tls(broker: SecureMosquittoServer, cell: Path, robots: list[str], cycles: int) -> int:
    import aiomqtt

    context = ssl.create_default_context(cafile=str(broker.ca))
    sent = 0
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, username="cellwatch", password=PASSWORD, tls_context=context
    ) as client:
        for batch in plan(cell, robots, start_ns=T0, max_cycles=cycles):
            await client.publish(
                f"secure/{batch.robot}/signals", encode_arrow(batch, schema.MACHINE_SIGNALS), qos=1
            )
            sent += int(batch.cycle_end)
    return sent


def test_tls_and_password_from_a_file(
    secure_broker: SecureMosquittoServer, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    cell, model = tiny_cell_and_model
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD + "\n")
    daemon = Daemon(tmp_path, "d", config(secure_broker, model, tmp_path, secret)).start()
    try:
        cycles = asyncio.run(publish_tls(secure_broker, cell, robot_ids(2), cycles=5))
        scores = tmp_path / "scores.jsonl"

        def stored() -> int:
            if not scores.exists():
                return 0
            return sum(
                json.loads(line)["measurement"] == "anomaly_score" for line in scores.read_text().splitlines()
            )

        wait_until(lambda: stored() >= cycles, 60, f"{cycles} scores over TLS")
        assert stored() == cycles == 10
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert PASSWORD not in daemon.stderr.read_text()


def test_wrong_password_fails_at_start_with_a_clear_error(
    secure_broker: SecureMosquittoServer, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    _, model = tiny_cell_and_model
    secret = tmp_path / "mqtt-password"
    secret.write_text("not-the-password")
    cfg = config(secure_broker, model, tmp_path, secret)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [str(CELLWATCH), "run", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert f"MQTT broker 127.0.0.1:{secure_broker.port} refused the connection" in result.stderr
    assert "not authorized" in result.stderr.lower() or "bad user name or password" in result.stderr.lower()
    assert "unavailable at start" not in result.stderr  # a refusal is not retried like an outage
    assert "not-the-password" not in result.stderr


def test_a_refusal_is_not_retried_at_start(secure_broker: SecureMosquittoServer) -> None:
    """However long `connect_retry_s` is, a broker that refuses the credentials (Mosquitto answers
    an MQTT 5 client "not authorized") fails the start at the first attempt, with the reason."""

    async def start() -> None:
        source = MqttSource(
            host="127.0.0.1",
            port=secure_broker.port,
            topic="secure/+/signals",
            client_id="cw-refused",
            signals=schema.MACHINE_SIGNALS,
            username="cellwatch",
            password="not-the-password",
            tls=MqttTls(ca_file=str(secure_broker.ca)),
            connect_retry_s=600,
        )
        await source.start()

    with pytest.raises(BrokerRefused, match=r"refused the connection \(not authorized\)") as err:
        asyncio.run(start())
    assert "not-the-password" not in str(err.value)


def test_an_untrusted_certificate_is_refused(
    secure_broker: SecureMosquittoServer, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """Without the broker's CA the TLS handshake fails: no fallback to an unverified connection."""
    _, model = tiny_cell_and_model
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD)
    cfg = config(secure_broker, model, tmp_path, secret)
    cfg["sources"][0]["tls"] = {}  # the system's trust store, which does not know this CA
    path = tmp_path / "untrusted.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [str(CELLWATCH), "run", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "certificate verify failed" in result.stderr.lower()
    assert "unavailable at start" not in result.stderr  # refused at once, not retried
