"""The systemd unit and the notify protocol.

No unit can run here (PID 1 is not systemd): the unit is checked with `systemd-analyze verify` and
`security --offline`, and the daemon's notifications are received on a fake notify socket (a Unix
datagram socket we bind, as systemd would) and counted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml
from services import free_port, wait_until

from daemon.notify import Notifier

UNIT = Path(__file__).parent.parent / "systemd" / "cellwatch.service"
CELLWATCH = Path(sys.executable).parent / "cellwatch"


def unit_for_here(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's cellwatch (verify checks it exists)."""
    text = UNIT.read_text().replace("/opt/cellwatch/.venv/bin/cellwatch", str(CELLWATCH))
    path = tmp_path / "cellwatch.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_for_here(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr.strip() == ""  # verify exits 0 even for unknown keys: they show on stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_is_hardened(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit_for_here(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout[-500:]
    assert float(match.group(1)) <= 2.0  # "OK"; an unhardened service scores 9.6
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=cellwatch",
        "LoadCredential=",
        "WatchdogSec=",
    ):
        assert line in text
    assert "CAP_NET_RAW" not in text  # only the capture drop-in grants it


class FakeNotifySocket:
    """What systemd does: a Unix datagram socket, read promptly (here by a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.messages.extend(data.decode().split("\n"))

    def drain(self) -> list[str]:
        with self._lock:
            return list(self.messages)

    def count(self, message: str) -> int:
        return sum(1 for m in self.drain() if m == message)

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self.sock.close()


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval_s is None


def test_notifier_sends_and_computes_the_watchdog_interval(tmp_path: Path) -> None:
    fake = FakeNotifySocket(tmp_path / "n.sock")
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "3000000"})
    assert notifier.watchdog_interval_s == 1.5
    assert notifier.ready(status="up")
    assert notifier.watchdog()
    assert notifier.stopping()
    wait_until(lambda: len(fake.drain()) == 4, 5, "four messages")
    assert fake.drain() == ["READY=1", "STATUS=up", "WATCHDOG=1", "STOPPING=1"]
    notifier.close()
    other = Notifier(
        environ={"NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval_s is None  # the watchdog is meant for another process
    fake.close()


@pytest.fixture
def daemon_setup(tiny_cell_and_model: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_cell_and_model


def start_daemon(
    tmp_path: Path, cell: Path, model: Path, speed: float, metrics_port: int = 0
) -> tuple[subprocess.Popen[bytes], FakeNotifySocket]:
    config = tmp_path / "cellwatch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [{"type": "voraus_replay", "robot": "r1", "path": str(cell), "speed": speed}],
                "model": {"path": str(model)},
                "scoring": {"batch": 4, "max_wait_ms": 5},
                "sinks": {"file": {"path": str(tmp_path / "scores.jsonl")}},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            }
        )
    )
    fake = FakeNotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [str(CELLWATCH), "run", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc, fake


def stop(proc: subprocess.Popen[bytes], fake: FakeNotifySocket) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    fake.close()


def test_daemon_notifies_ready_watchdog_and_stopping(daemon_setup: tuple[Path, Path], tmp_path: Path) -> None:
    cell, model = daemon_setup
    # 36 test cycles of ~12 s at 200x real time: about 2 s of paced replay
    proc, fake = start_daemon(tmp_path, cell, model, speed=200)
    try:
        out, _ = proc.communicate(timeout=120)
        messages = [m for m in fake.drain() if not m.startswith("STATUS=")]
    finally:
        stop(proc, fake)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert messages.count("READY=1") == 1
    assert messages.count("STOPPING=1") == 1
    assert messages.count("WATCHDOG=1") >= 5  # every 0.1 s while the pipeline moves
    assert messages.index("READY=1") < messages.index("WATCHDOG=1")
    assert messages[-1] == "STOPPING=1"


def test_sigterm_drains_gracefully(daemon_setup: tuple[Path, Path], tmp_path: Path) -> None:
    cell, model = daemon_setup
    port = free_port()
    proc, fake = start_daemon(tmp_path, cell, model, speed=20, metrics_port=port)  # would take ~20 s
    scores = tmp_path / "scores.jsonl"
    try:
        wait_until(lambda: fake.count("READY=1") == 1, 60, "READY=1")
        wait_until(lambda: scores.exists() and scores.read_text().count("\n") >= 2, 60, "first scores")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)  # bounded drain
        stopping = fake.count("STOPPING=1")
    finally:
        stop(proc, fake)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert stopping == 1
    written = scores.read_text().splitlines()
    assert 2 <= len(written) < 36  # stopped early, and what was scored was written
    assert all(line.endswith("}") for line in written)  # no torn line
    # the Prometheus endpoint answered while the daemon ran
    scored = re.search(r"^cellwatch_windows_scored_total (\S+)$", metrics, re.M)
    assert scored is not None
    assert float(scored.group(1)) >= 2
    assert "# TYPE cellwatch_queue_depth gauge" in metrics
    assert "cellwatch_inference_seconds_total" in metrics


def test_notifier_never_blocks_when_nobody_reads(tmp_path: Path) -> None:
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "deaf.sock"))  # bound, never read: its queue fills up
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "deaf.sock")})
    results = [notifier.watchdog() for _ in range(500)]  # would hang forever with a blocking socket
    assert results[0] is True
    assert results[-1] is False  # dropped and logged, the daemon goes on
    notifier.close()
    sink.close()


def test_metrics_text_format() -> None:
    from daemon.metrics import render

    text = render(
        [
            ("cellwatch_windows_scored_total", "counter", {}, 12),
            ("cellwatch_rejects_total", "counter", {"source": "arm-1", "reason": "nan"}, 3),
            ("cellwatch_rejects_total", "counter", {"source": "arm-1", "reason": 'odd"one'}, 1),
        ]
    )
    assert text.count("# TYPE cellwatch_rejects_total counter") == 1
    assert "cellwatch_windows_scored_total 12\n" in text
    assert 'cellwatch_rejects_total{reason="nan",source="arm-1"} 3\n' in text
    assert 'reason="odd\\"one"' in text
