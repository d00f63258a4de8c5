"""The real daemon as a subprocess for end-to-end tests: `cellwatch run --config FILE`, its
Prometheus endpoint as the way to watch it, SIGTERM for a graceful stop and SIGKILL for a crash."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from services import free_port, wait_until

CELLWATCH = Path(sys.executable).parent / "cellwatch"
# label values are quoted and may hold braces (the source `mqtt_frames:cell/{robot}/camera/{camera}`)
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})? (\S+)$', re.M)


class Daemon:
    """One daemon process; `config` is the YAML config as a dict (metrics gets a free port)."""

    def __init__(self, root: Path, name: str, config: dict[str, Any]) -> None:
        self.root = root
        self.name = name
        self.port = free_port()
        config = {**config, "metrics": {"listen": f"127.0.0.1:{self.port}"}}
        self.config_path = root / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.stderr = root / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 60, *, wait_ready: bool = True) -> Daemon:
        """Start and wait until the metrics endpoint answers (it opens once sources and sinks are up)."""
        with self.stderr.open("ab") as err, (self.root / f"{self.name}.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(CELLWATCH), "--log-format", "json", "run", "--config", str(self.config_path)],
                stdout=out,
                stderr=err,
            )
        if not wait_ready:
            return self
        wait_until(
            lambda: self.metrics() is not None or not self.alive, ready_timeout, f"daemon {self.name} ready"
        )
        assert self.alive, f"daemon {self.name} exited: {self.log_tail()}"
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.stderr.read_text(errors="replace")[-chars:] if self.stderr.exists() else ""

    def metrics(self) -> dict[str, float] | None:
        """Every sample, keyed `name` or `name{labels}` as exposed; None while the endpoint is down."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError):
            return None
        return {name + (labels or ""): float(value) for name, labels, value in _SAMPLE.findall(text)}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
        samples = self.metrics() or {}
        total = 0.0
        for key, value in samples.items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM: graceful drain; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL (a crash, or clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
