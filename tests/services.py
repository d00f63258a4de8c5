"""Real services for integration tests, started by the test session on private ports.

Each server runs from a temporary directory, is polled for readiness (never slept on), and is stopped
by its PID. Nothing here is a fake.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def poll(condition: Callable[[], bool], seconds: float) -> None:
    """`wait_until` inside an event loop: wait for another component's state (it has no event)."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `condition()` until it is true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class ServerProcess:
    """A server run from `root`: `start()` waits until `ready()` (polled, never slept on), `stop()`
    terminates it by PID and waits until it no longer answers. Subclasses give the command and the
    readiness check."""

    name = "server"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        log_path = self.root / f"{self.name}.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, cwd=self.root)
        proc = self.proc
        wait_until(lambda: self.ready() or proc.poll() is not None, 30, f"{self.name} ready")
        if not self.ready():
            raise RuntimeError(f"{self.name} did not start: see {log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        wait_until(lambda: not self.ready(), 10, f"{self.name} to stop answering")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InfluxServer(ServerProcess):
    """InfluxDB 1.x (Debian's influxd) on private ports with its data in `root`."""

    name = "influxd"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.binary = shutil.which("influxd")
        if self.binary is None:
            raise RuntimeError("influxd is not installed (.ci/setup installs Debian's influxdb package)")
        self.http_port = free_port()
        self.rpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = root / "influxdb.conf"
        self.config.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{root}/meta"
[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{self.http_port}"
  log-enabled = false
[logging]
  level = "warn"
"""
        )

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as response:
                return bool(response.status == 204)
        except (urllib.error.URLError, OSError):
            return False

    def command(self) -> list[str]:
        assert self.binary is not None
        return [self.binary, "run", "-config", str(self.config)]

    def ready(self) -> bool:
        return self.ping()

    def create_database(self, name: str) -> None:
        """CREATE DATABASE, then wait until the server lists it: InfluxDB answers 200 with the error
        in the body, and a server just restarted by another test may not have it yet (one CI run wrote
        to a database it had been told to create and got "database not found")."""
        import json

        body = urllib.parse.urlencode({"q": f'CREATE DATABASE "{name}"'}).encode()
        request = urllib.request.Request(f"{self.url}/query", data=body)
        with urllib.request.urlopen(request, timeout=10) as response:
            result = json.loads(response.read())["results"][0]
        if "error" in result:
            raise RuntimeError(f"CREATE DATABASE {name}: {result['error']}")
        wait_until(lambda: [name] in self.series("SHOW DATABASES", name), 10, f"database {name} listed")

    def query(self, q: str, db: str | None = None) -> dict[str, Any]:
        import json

        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        url = f"{self.url}/query?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.loads(response.read()))

    def series(self, q: str, db: str) -> list[list[Any]]:
        """Rows of the first series a query returns ([] when there are none)."""
        result = self.query(q, db)["results"][0]
        if "error" in result:
            raise RuntimeError(result["error"])
        series = result.get("series") or [{"values": []}]
        return list(series[0]["values"])
