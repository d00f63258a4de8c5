"""`cellwatch install-service` into a temporary root (`--root`, as DESTDIR): the unit it writes verifies and
stays hardened, the directories get safe modes, and the credential drop-in loads exactly the secrets the
config names, so a config without secrets gives a unit that needs none. systemctl cannot run here (PID 1
is not systemd): the unit files are checked with systemd-analyze."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.cli import main
from daemon.commands.install_service import HIDDEN, SAMPLE
from daemon.config import load_config

CELLWATCH = Path(sys.executable).parent / "cellwatch"
UNIT = Path("etc/systemd/system/cellwatch.service")
DROP_IN = Path("etc/systemd/system/cellwatch.service.d/credentials.conf")
CONFIG = Path("etc/cellwatch/cellwatch.yaml")
CREDENTIALS = Path("etc/cellwatch/credentials")
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
#: the default ExecStart is this checkout's cellwatch, which the unit could not run from a hidden directory
checkout_visible = pytest.mark.skipif(
    any(CELLWATCH.is_relative_to(h) for h in HIDDEN), reason=f"{CELLWATCH} is where the sandbox hides it"
)


def install(root: Path, *args: str) -> int:
    return main(["install-service", "--root", str(root), *args])


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def directives(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def verify(unit: Path) -> str:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.strip()  # verify exits 0 even for unknown keys: they show on stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout[-500:]
    return float(match.group(1))


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@checkout_visible
@needs_systemd
def test_fresh_install_needs_no_credential_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    assert install(root) == 0
    out = capsys.readouterr().out
    unit = (root / UNIT).read_text()
    assert directives(unit, "ExecStart") == [f"{CELLWATCH} run --config /etc/cellwatch/cellwatch.yaml"]
    assert directives(unit, "RestartPreventExitStatus") == ["2"]
    # the sample config, readable by the service's dynamic user; the credentials directory by root only
    assert (root / CONFIG).read_text() == SAMPLE.read_text()
    assert mode(root / CONFIG) == 0o644
    assert mode(root / "etc/cellwatch") == 0o755
    assert mode(root / CREDENTIALS) == 0o700
    # the sample names no secret: no LoadCredential= anywhere, so nothing can stop the unit from starting
    drop_in = (root / DROP_IN).read_text()
    assert "LoadCredential" not in "".join(line for line in (unit + drop_in).splitlines() if line[:1] != "#")
    assert verify(root / UNIT) == ""  # the drop-in beside it is read too
    assert exposure(root / UNIT) <= 2.0
    assert "systemctl daemon-reload && systemctl enable --now cellwatch" in out
    assert f"{CELLWATCH} check --config /etc/cellwatch/cellwatch.yaml" in out


@checkout_visible
def test_the_sample_resolves_its_relative_paths_in_the_state_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert install(root, "--dry-run") == 0
    assert not root.exists()  # a dry run writes nothing
    assert install(root) == 0
    config = load_config(root / CONFIG, environ={})  # by hand, outside the unit: the same paths
    assert config.state_dir == Path("/var/lib/cellwatch")
    assert config.model.path == Path("/var/lib/cellwatch/models/cell")
    assert config.sinks.file is not None
    assert config.sinks.file.path == Path("/var/lib/cellwatch/scores.jsonl")
    assert config.sinks.influxdb is None


@checkout_visible
@needs_systemd
def test_the_drop_in_loads_exactly_the_credentials_the_config_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secure = {"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "username": "cw"}
    config = write_config(
        tmp_path / "mine.yaml",
        {
            "sources": [
                {"type": "mqtt", "host": "broker", "username": "cw", "password": {"file": "mqtt-password"}},
                {
                    "type": "kafka",
                    "bootstrap": ["k:9093"],
                    "topic": "t",
                    "security": {**secure, "password": {"file": "kafka-password"}},
                },
            ],
            "model": {"path": "models/cell"},
            "sinks": {
                "influxdb": {
                    "url": "http://db:8086",
                    "username": "cw",
                    "password": {"file": "influx-password"},
                },
                "kafka": {
                    "bootstrap": ["k:9093"],
                    "security": {**secure, "password": {"file": "kafka-password"}},
                },
                "mqtt": {"host": "broker", "username": "cw", "password": {"env": "MQTT_FEED_PASSWORD"}},
            },
        },
    )
    root = tmp_path / "root"
    (root / CREDENTIALS).mkdir(parents=True, mode=0o755)
    (root / CREDENTIALS / "influx-password").write_text("s3cret\n")
    (root / CREDENTIALS / "influx-password").chmod(0o644)
    assert install(root, "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert (root / CONFIG).read_text() == config.read_text()
    drop_in = (root / DROP_IN).read_text()
    assert sorted(directives(drop_in, "LoadCredential")) == [
        f"{name}:/etc/cellwatch/credentials/{name}"
        for name in ("influx-password", "kafka-password", "mqtt-password")
    ]  # the Kafka password named twice is loaded once; the environment variable is no credential
    assert "MQTT_FEED_PASSWORD" in out  # ... and the user is told how to set it
    # loosened modes are made safe again
    assert mode(root / CREDENTIALS) == 0o700
    assert mode(root / CREDENTIALS / "influx-password") == 0o600
    # the two credentials that do not exist yet get a step each; the one that exists does not
    steps = [line for line in out.splitlines() if "install -m 0600 /dev/stdin" in line]
    assert [re.search(r"credentials/(\S+)", s).group(1) for s in steps] == ["mqtt-password", "kafka-password"]  # type: ignore[union-attr]
    assert verify(root / UNIT) == ""

    assert install(root, "--config", str(config), "--encrypted-credentials") == 0
    drop_in = (root / DROP_IN).read_text()
    assert directives(drop_in, "LoadCredential") == []
    assert len(directives(drop_in, "LoadCredentialEncrypted")) == 3
    assert verify(root / UNIT) == ""


@checkout_visible
def test_an_existing_config_is_kept_and_replaced_only_when_forced(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / CONFIG).parent.mkdir(parents=True)
    ours = {"sources": [{"type": "mqtt", "host": "h"}], "model": {"path": "/m"}}
    write_config(root / CONFIG, ours)
    before = (root / CONFIG).read_text()
    assert install(root) == 0
    assert (root / CONFIG).read_text() == before  # kept, not replaced by the sample

    other = write_config(tmp_path / "other.yaml", {**ours, "model": {"path": "/other"}})
    assert install(root, "--config", str(other)) == 2  # differs: refused, nothing changed
    assert (root / CONFIG).read_text() == before
    assert install(root, "--config", str(other), "--force") == 0
    assert (root / CONFIG).read_text() == other.read_text()


@checkout_visible
def test_a_bad_config_or_credential_name_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    bad = write_config(
        tmp_path / "bad.yaml", {"sources": [{"type": "mqtt", "host": "h", "port": 0}], "model": {}}
    )
    assert install(root, "--config", str(bad)) == 2
    assert "sources[0].port" in capsys.readouterr().err
    slash = write_config(
        tmp_path / "slash.yaml",
        {
            "sources": [{"type": "mqtt", "host": "h", "username": "u", "password": {"file": "sub/pw"}}],
            "model": {"path": "/m"},
        },
    )
    assert install(root, "--config", str(slash)) == 2
    assert "sources[0].password: file 'sub/pw' is not a valid credential name" in capsys.readouterr().err
    assert not root.exists()


@needs_systemd
def test_prefix_and_directories_are_written_into_the_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    venv_bin = root / "opt/cellwatch/.venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "cellwatch").write_text("#!/bin/sh\n")
    (venv_bin / "cellwatch").chmod(0o755)
    (root / "opt/cellwatch/README.md").write_text("docs\n")
    args = [
        "--prefix",
        "/opt/cellwatch",
        "--config-dir",
        "/srv/cw-conf",
        "--unit-dir",
        "/usr/local/lib/systemd",
    ]
    assert install(root, *args) == 0
    unit = (root / "usr/local/lib/systemd/cellwatch.service").read_text()
    assert directives(unit, "ExecStart") == [
        "/opt/cellwatch/.venv/bin/cellwatch run --config /srv/cw-conf/cellwatch.yaml"
    ]
    assert directives(unit, "Documentation") == ["file:///opt/cellwatch/README.md"]
    assert directives(unit, "ConfigurationDirectory") == []  # it can only name a directory in /etc
    assert (root / "srv/cw-conf/cellwatch.yaml").is_file()
    assert mode(root / "srv/cw-conf/credentials") == 0o700
    assert (root / "usr/local/lib/systemd/cellwatch.service.d/credentials.conf").is_file()


def test_a_cellwatch_the_sandbox_hides_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    venv_bin = root / "home/me/cellwatch/.venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "cellwatch").write_text("#!/bin/sh\n")
    (venv_bin / "cellwatch").chmod(0o755)
    assert install(root, "--prefix", "/home/me/cellwatch") == 2
    assert "ProtectHome=yes" in capsys.readouterr().err
    assert install(root, "--prefix", "/opt/nothing-here") == 2
    assert "no cellwatch executable at" in capsys.readouterr().err
    assert not (root / "etc").exists()


@checkout_visible
@needs_systemd
def test_a_live_bus_capture_gets_the_capture_drop_in_and_nothing_more(tmp_path: Path) -> None:
    """A config with an EtherCAT source on an interface needs raw sockets: install-service writes the
    capture drop-in (CAP_NET_RAW and AF_PACKET only) next to the credentials one; a config that replays
    a capture file gets no such rights."""
    root = tmp_path / "root"
    capture = Path("etc/systemd/system/cellwatch.service.d/capture.conf")
    replay = write_config(
        tmp_path / "replay.yaml",
        {
            "sources": [{"type": "ethercat", "capture": "bus.pcapng", "map": "m.yaml"}],
            "model": {"path": "/m"},
        },
    )
    assert install(root, "--config", str(replay)) == 0
    assert not (root / capture).exists()

    live = write_config(
        tmp_path / "live.yaml",
        {"sources": [{"type": "ethercat", "interface": "eth1", "map": "m.yaml"}], "model": {"path": "/m"}},
    )
    assert install(root, "--config", str(live), "--force") == 0
    text = (root / capture).read_text()
    assert directives(text, "AmbientCapabilities") == ["CAP_NET_RAW"]
    assert directives(text, "CapabilityBoundingSet") == ["CAP_NET_RAW"]
    assert "AF_PACKET" in directives(text, "RestrictAddressFamilies")[0]
    assert mode(root / capture) == 0o644
    assert verify(root / UNIT) == ""  # both drop-ins are read with the unit
