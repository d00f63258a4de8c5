"""The systemd unit and the notify protocol.

No unit can run here (PID 1 is not systemd): the unit is checked with `systemd-analyze verify` and
`security --offline`, and the daemon's notifications are received on a fake notify socket (a Unix
datagram socket we bind, as systemd would) and counted.
"""

from __future__ import annotations

import json
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
from typing import Any

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
        "WatchdogSec=",
    ):
        assert line in text
    assert "CAP_NET_RAW" not in text  # only the capture drop-in grants it
    # a LoadCredential= of a file that does not exist stops the unit: credentials are loaded only by the
    # drop-in install-service writes from the config (tests/test_install_service.py)
    assert unit_directives("LoadCredential") == []
    assert unit_directives("LoadCredentialEncrypted") == []


def unit_directives(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def test_the_unit_restarts_after_an_outage_at_start_but_not_after_a_config_error(
    tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """The exit statuses of the real daemon against the unit's restart policy: Restart=on-failure restarts
    every failure except those in RestartPreventExitStatus=."""
    _, model = tiny_cell_and_model
    assert unit_directives("Restart") == ["on-failure"]
    prevented = {int(code) for value in unit_directives("RestartPreventExitStatus") for code in value.split()}

    def exit_status(config: dict[str, Any]) -> int:
        path = tmp_path / "cellwatch.yaml"
        path.write_text(yaml.safe_dump({"model": {"path": str(model)}, **config}))
        result = subprocess.run(
            [str(CELLWATCH), "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return result.returncode

    mqtt_down: dict[str, Any] = {"sources": [{"type": "mqtt", "host": "127.0.0.1", "port": free_port()}]}
    bad_field = {**mqtt_down, "scoring": {"batch": 0}}
    assert exit_status(bad_field) == 2
    assert 2 in prevented  # a config error stays failed (a restart cannot fix it)
    assert exit_status(mqtt_down) == 75  # EX_TEMPFAIL: the broker is down at start
    assert 75 not in prevented  # restarted every RestartSec until the broker is back
    assert "75" in unit_directives("RestartForceExitStatus")


@pytest.mark.parametrize(
    ("state_dir", "state_directory", "expected"),
    [
        (None, None, "conf"),  # by hand: next to the config, as before
        (None, "/var/lib/cellwatch", "/var/lib/cellwatch"),  # under systemd: StateDirectory=
        ("data", "/var/lib/cellwatch", "conf/data"),  # state_dir wins; relative to the config's directory
        ("/srv/cw", None, "/srv/cw"),
    ],
)
def test_relative_paths_resolve_in_the_state_directory(
    tmp_path: Path, state_dir: str | None, state_directory: str | None, expected: str
) -> None:
    from daemon.config import load_config

    path = tmp_path / "conf" / "cellwatch.yaml"
    path.parent.mkdir()
    data: dict[str, object] = {
        "sources": [{"type": "voraus_replay", "robot": "r1", "path": "data/cell.parquet"}],
        "model": {"path": "models/cell"},
        "sinks": {"influxdb": {"url": "http://db:8086"}, "file": {"path": "/abs/scores.jsonl"}},
    }
    if state_dir is not None:
        data["state_dir"] = state_dir
    path.write_text(yaml.safe_dump(data))
    environ = {"STATE_DIRECTORY": state_directory} if state_directory else {}
    config = load_config(path, environ=environ)
    base = tmp_path / expected
    assert config.state_dir == base
    assert config.model.path == base / "models/cell"
    assert config.sources[0].path == base / "data/cell.parquet"  # type: ignore[union-attr]
    assert config.sinks.influxdb is not None
    assert config.sinks.influxdb.spool_dir == base / "spool"
    assert config.sinks.file is not None
    assert config.sinks.file.path == Path("/abs/scores.jsonl")  # absolute paths are left alone


def test_the_daemon_writes_into_STATE_DIRECTORY_not_next_to_its_config(
    tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """As under the unit: the config in a directory of its own (/etc/cellwatch), relative paths, and
    $STATE_DIRECTORY (systemd's StateDirectory=) where the model, the data and the output live."""
    cell, model = tiny_cell_and_model
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir()
    state.mkdir()
    (state / "models").mkdir()
    (state / "models" / "cell").symlink_to(model)
    (state / "cell.parquet").symlink_to(cell)
    config = etc / "cellwatch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [{"type": "voraus_replay", "robot": "r1", "path": "cell.parquet", "speed": 1e6}],
                "model": {"path": "models/cell"},
                "sinks": {"file": {"path": "scores.jsonl"}},
                "metrics": {"listen": None},
            }
        )
    )
    result = subprocess.run(
        [str(CELLWATCH), "run", "--config", str(config)],
        env={**os.environ, "STATE_DIRECTORY": str(state)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in etc.iterdir()) == ["cellwatch.yaml"]  # nothing written beside the config
    rows = [json.loads(line) for line in (state / "scores.jsonl").read_text().splitlines()]
    assert sum(r["measurement"] == "anomaly_score" for r in rows) == 36  # each test cycle, scored


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
