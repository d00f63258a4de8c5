"""``cellwatch install-service``: install cellwatch as a systemd service on this machine.

Writes the unit (``systemd/cellwatch.service`` with ExecStart pointing at the cellwatch that runs this
command, or at ``PREFIX/.venv/bin/cellwatch``), the configuration directory and its credentials directory
with safe modes, a sample config when there is none (``examples/service.yaml``), and the drop-in
``cellwatch.service.d/credentials.conf`` with one ``LoadCredential=`` per secret file the config names, so
the unit starts whatever secrets the config has (none at all: file- and MQTT-only setups). It cannot run
``systemctl`` (that is left to the user, printed at the end), and with ``--root DIR`` it installs into an
image or a test directory instead of ``/``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.cli_support import UsageError

UNIT_NAME = "cellwatch.service"
DROP_IN_NAME = "credentials.conf"
CONFIG_NAME = "cellwatch.yaml"
CREDENTIALS_SUBDIR = "credentials"
#: the checkout this module lives in (an editable install: the documented path); the template and the
#: sample config come from there
CHECKOUT = Path(__file__).resolve().parents[2]
TEMPLATE = CHECKOUT / "systemd" / UNIT_NAME
CAPTURE_DROP_IN = CHECKOUT / "systemd" / "cellwatch-capture.conf"
CAPTURE_DROP_IN_NAME = "capture.conf"
SAMPLE = CHECKOUT / "examples" / "service.yaml"
#: directories the unit's sandbox hides (ProtectHome=yes, PrivateTmp=yes): an ExecStart there cannot run
HIDDEN = tuple(Path(p) for p in ("/home", "/root", "/run/user", "/tmp", "/var/tmp"))  # noqa: S108
#: systemd credential names: no '/', not '.' or '..'; kept to a conservative set
CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")


def add_parser(sub: Any) -> None:
    running = Path(sys.executable).parent / "cellwatch"
    p = sub.add_parser(
        "install-service",
        help="install cellwatch as a systemd service (unit, config and credential directories)",
        description=(
            "Install cellwatch as a systemd service: write UNIT_DIR/cellwatch.service (ExecStart = the "
            "cellwatch executable, see --prefix), create CONFIG_DIR (0755) and CONFIG_DIR/credentials "
            "(0700), put a sample config at CONFIG_DIR/cellwatch.yaml when there is none (or install "
            "--config FILE there), and write UNIT_DIR/cellwatch.service.d/credentials.conf with one "
            "LoadCredential= per secret file the config names ({file: NAME}): the unit starts without "
            "any credential when the config names none. Run it again after changing the config's secrets. "
            "Then, as printed at the end: cellwatch check, systemctl daemon-reload, systemctl enable --now. "
            "Run as root (or with --root DIR to install into a directory tree)."
        ),
    )
    p.add_argument(
        "--prefix",
        type=Path,
        help="the cellwatch installation (a git checkout with its virtual environment) the unit runs: "
        "ExecStart=PREFIX/.venv/bin/cellwatch; default: the cellwatch running this command, i.e. the "
        f"'cellwatch' beside this Python ({running}). It must not be under /home, /root or /tmp, which "
        "the unit's sandbox hides: use e.g. /opt/cellwatch",
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        default=Path("/etc/cellwatch"),
        help="configuration directory (default: /etc/cellwatch)",
    )
    p.add_argument(
        "--unit-dir",
        type=Path,
        default=Path("/etc/systemd/system"),
        help="where the unit and its drop-in go (default: /etc/systemd/system)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="a config to install as CONFIG_DIR/cellwatch.yaml (validated first); default: keep the one "
        "there, or install the sample examples/service.yaml",
    )
    p.add_argument("--force", action="store_true", help="with --config: replace a different existing config")
    p.add_argument(
        "--encrypted-credentials",
        action="store_true",
        help="the credentials are encrypted with systemd-creds: LoadCredentialEncrypted= instead of "
        "LoadCredential=",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install into this directory tree instead of / (DESTDIR: an image, a test); the paths written "
        "into the unit are those without it",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    p.set_defaults(func=run)


@dataclass
class Credential:
    name: str
    fields: list[str]


@dataclass
class Plan:
    """What the install writes (paths as the running system sees them; `--root` is applied on writing)."""

    unit: str
    drop_in: str
    config_text: str | None  # None: keep the config that is there
    config_source: str
    credentials: list[Credential]
    notes: list[str] = field(default_factory=list)
    capture: str | None = None  # the live-capture drop-in, when a source captures on an interface


def run(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    config_dir = _absolute(args.config_dir, "--config-dir")
    unit_dir = _absolute(args.unit_dir, "--unit-dir")
    executable, readme = _executable(args.prefix, root)
    config_path = config_dir / CONFIG_NAME
    credentials_dir = config_dir / CREDENTIALS_SUBDIR

    config_text, config_source = _config_text(args.config, _under(root, config_path), force=args.force)
    existing = config_text is None
    text = _under(root, config_path).read_text() if config_text is None else config_text
    config = _parse(text, str(args.config or config_path))
    credentials, notes = credentials_of(config)
    plan = Plan(
        unit=render_unit(_template(), executable, config_path, config_dir, readme),
        drop_in=render_drop_in(
            credentials, credentials_dir, config_path, encrypted=args.encrypted_credentials
        ),
        config_text=None if existing else config_text,
        config_source=config_source,
        credentials=credentials,
        notes=notes,
        capture=_capture_drop_in() if live_interfaces(config) else None,
    )
    unit_path = unit_dir / UNIT_NAME
    drop_in_path = unit_dir / f"{UNIT_NAME}.d" / DROP_IN_NAME
    if args.dry_run:
        print(f"dry run: nothing written (root {root})")
        for path, mode in ((config_dir, 0o755), (credentials_dir, 0o700)):
            print(f"would create {path} (mode {mode:04o})")
        if plan.config_text is not None:
            print(f"would write {config_path} (0644) from {config_source}")
        else:
            print(f"would keep {config_path}")
        print(f"would write {unit_path} (0644):\n{plan.unit}")
        print(f"would write {drop_in_path} (0644):\n{plan.drop_in}")
        if plan.capture is not None:
            print(f"would write {drop_in_path.with_name(CAPTURE_DROP_IN_NAME)} (0644):\n{plan.capture}")
    else:
        try:
            _install(plan, root, config_dir, credentials_dir, config_path, unit_path, drop_in_path)
        except OSError as err:
            hint = " (run as root, or use --root DIR)" if isinstance(err, PermissionError) else ""
            raise UsageError(f"cannot write {err.filename}: {err.strerror}{hint}") from None
    for note in plan.notes:
        print(f"note: {note}")
    missing = [c for c in credentials if not _under(root, credentials_dir / c.name).exists()]
    steps = []
    for cred in missing:
        target = credentials_dir / cred.name
        if args.encrypted_credentials:
            command = (
                f"systemd-ask-password -n '{cred.name}:' | "
                f"systemd-creds encrypt --name={cred.name} - {target} && chmod 0600 {target}"
            )
        else:
            command = f"systemd-ask-password -n '{cred.name}:' | install -m 0600 /dev/stdin {target}"
        steps.append(f"{command}    # {', '.join(cred.fields)}")
    steps.append(f"{executable} check --config {config_path}")
    steps.append("systemctl daemon-reload && systemctl enable --now cellwatch")
    steps.append("journalctl -u cellwatch -f")
    print("next, as root:")
    for step in steps:
        print(f"  {step}")
    return 0


def _absolute(path: Path, option: str) -> Path:
    if not path.is_absolute():
        raise UsageError(f"{option} must be an absolute path (got {str(path)!r})")
    return path


def _under(root: Path, path: Path) -> Path:
    """`path` (absolute, as the installed system sees it) inside `root`."""
    return root / path.relative_to(path.anchor)


def _executable(prefix: Path | None, root: Path) -> tuple[Path, Path | None]:
    """(the cellwatch the unit runs, the README of the installation it belongs to, when there is one)."""
    if prefix is None:
        executable = Path(sys.executable).parent / "cellwatch"  # the venv's bin/, symlinks not followed
        candidates = [executable, executable.resolve()]
        venv = executable.parent.parent
        readme = (venv.parent if venv.name == ".venv" else venv) / "README.md"
        on_disk, readme_on_disk = executable, readme
    else:
        executable = _absolute(prefix, "--prefix") / ".venv" / "bin" / "cellwatch"
        candidates = [executable]
        readme = prefix / "README.md"
        on_disk, readme_on_disk = _under(root, executable), _under(root, readme)
    if not (on_disk.is_file() and os.access(on_disk, os.X_OK)):
        raise UsageError(
            f"no cellwatch executable at {on_disk}: install cellwatch there first "
            "(git clone ... && bash .ci/setup, or python3 -m venv .venv && .venv/bin/pip install -e .)"
        )
    if re.search(r"\s", str(executable)):
        raise UsageError(f"the cellwatch path {executable} contains whitespace: install it under e.g. /opt")
    for candidate in candidates:
        for hidden in HIDDEN:
            if candidate.is_relative_to(hidden):
                raise UsageError(
                    f"cellwatch is at {candidate}, under {hidden}, which the unit's sandbox hides "
                    "(ProtectHome=yes, PrivateTmp=yes): the service could not start it. Install it under "
                    "/opt/cellwatch (git clone ... /opt/cellwatch && bash /opt/cellwatch/.ci/setup) and run "
                    "/opt/cellwatch/.venv/bin/cellwatch install-service, or pass --prefix"
                )
    return executable, readme if readme_on_disk.is_file() else None


def _template() -> str:
    try:
        return TEMPLATE.read_text()
    except OSError as err:
        raise UsageError(
            f"cannot read the unit template {TEMPLATE}: {err.strerror} (install-service works from a "
            "git checkout installed with pip install -e)"
        ) from None


def live_interfaces(config: Any) -> list[str]:
    """The interfaces the config's EtherCAT sources capture on live (they need the capture drop-in)."""
    from daemon.config import EthercatSource

    return [s.interface for s in config.sources if isinstance(s, EthercatSource) and s.interface]


def _capture_drop_in() -> str:
    try:
        return CAPTURE_DROP_IN.read_text()
    except OSError as err:
        raise UsageError(f"cannot read the capture drop-in {CAPTURE_DROP_IN}: {err.strerror}") from None


def _systemd_path(path: Path) -> str:
    return str(path).replace("%", "%%")  # '%' starts a specifier in unit files


def render_unit(
    template: str, executable: Path, config_path: Path, config_dir: Path, documentation: Path | None
) -> str:
    """The shipped unit with this machine's ExecStart, config path and documentation link."""
    out = [
        "# Written by `cellwatch install-service` from systemd/cellwatch.service: edit the template or use",
        "# drop-ins (systemctl edit cellwatch) rather than this file, which install-service rewrites.",
    ]
    seen = set()
    for line in template.splitlines():
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key == "ExecStart":
            line = f"ExecStart={_systemd_path(executable)} run --config {_systemd_path(config_path)}"
        elif key == "Documentation":
            if documentation is None:
                continue
            line = f"Documentation=file://{_systemd_path(documentation)}"
        elif key == "ConfigurationDirectory":
            if config_dir.parent != Path("/etc"):
                continue  # ConfigurationDirectory= names a directory directly under /etc only
            line = f"ConfigurationDirectory={config_dir.name}"
        if key is not None:
            seen.add(key)
        out.append(line)
    for needed in ("ExecStart", "StateDirectory", "Type"):
        if needed not in seen:
            raise UsageError(f"the unit template {TEMPLATE} has no {needed}= line")
    return "\n".join(out) + "\n"


def render_drop_in(
    credentials: list[Credential], credentials_dir: Path, config_path: Path, *, encrypted: bool
) -> str:
    key = "LoadCredentialEncrypted" if encrypted else "LoadCredential"
    lines = [
        f"# Written by `cellwatch install-service` from {config_path}: one credential per secret file the",
        "# config names ({file: NAME}, read from $CREDENTIALS_DIRECTORY/NAME). Run install-service again",
        "# after changing the config's secrets: a LoadCredential= of a missing file stops the unit.",
        "[Service]",
    ]
    if not credentials:
        lines.append("# the config names no credential files")
    for cred in credentials:
        lines.append(f"# {', '.join(cred.fields)}")
        lines.append(f"{key}={cred.name}:{_systemd_path(credentials_dir / cred.name)}")
    return "\n".join(lines) + "\n"


def _config_text(config: Path | None, target: Path, *, force: bool) -> tuple[str | None, str]:
    """(the config text to write, where it comes from); None: keep the existing one."""
    if config is not None:
        try:
            text = config.read_text()
        except OSError as err:
            raise UsageError(f"cannot read {config}: {err.strerror}") from None
        if target.exists() and target.read_text() != text and not force:
            raise UsageError(f"{target} exists and differs from {config}: pass --force to replace it")
        return text, str(config)
    if target.exists():
        return None, str(target)
    try:
        return SAMPLE.read_text(), str(SAMPLE)
    except OSError as err:
        raise UsageError(
            f"cannot read the sample config {SAMPLE}: {err.strerror}; pass --config FILE"
        ) from None


def _parse(text: str, origin: str) -> Any:
    from daemon.config import ConfigError, parse_config

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"{origin}: not valid YAML: {err}") from None
    try:
        return parse_config(data, origin=origin)
    except ConfigError as err:
        raise UsageError(str(err)) from None


def secret_refs(config: Any) -> list[tuple[str, Any]]:
    """(field path, SecretRef) of every secret the config names: InfluxDB password and token, the Kafka
    and MQTT passwords of the sources (signals and camera frames) and of the publish-back sinks."""
    from daemon.config import KafkaFramesSource, KafkaSource, MqttFramesSource, MqttSource

    refs: list[tuple[str, Any]] = []
    for i, src in enumerate(config.sources):
        if isinstance(src, MqttSource | MqttFramesSource):
            refs.append((f"sources[{i}].password", src.password))
        elif isinstance(src, KafkaSource | KafkaFramesSource):
            refs.append((f"sources[{i}].security.password", src.security.password))
    sinks = config.sinks
    if sinks.influxdb is not None:
        refs.append(("sinks.influxdb.password", sinks.influxdb.password))
        refs.append(("sinks.influxdb.token", sinks.influxdb.token))
    if sinks.mqtt is not None:
        refs.append(("sinks.mqtt.password", sinks.mqtt.password))
    if sinks.kafka is not None:
        refs.append(("sinks.kafka.security.password", sinks.kafka.security.password))
    return [(where, ref) for where, ref in refs if ref is not None]


def credentials_of(config: Any) -> tuple[list[Credential], list[str]]:
    """The credentials the unit must load (relative `{file: NAME}` secrets), and notes on the others."""
    by_name: dict[str, Credential] = {}
    notes = []
    for where, ref in secret_refs(config):
        if ref.env is not None:
            notes.append(
                f"{where} comes from ${ref.env}: set it in a drop-in (systemctl edit cellwatch: "
                f"Environment= or EnvironmentFile=), or better make it a credential ({{file: NAME}})"
            )
            continue
        path = Path(ref.file)
        if path.is_absolute():
            notes.append(
                f"{where} is read from {path} directly: the service's dynamic user must be able to read "
                "it; a credential ({file: NAME} in CONFIG_DIR/credentials) needs no such permission"
            )
            continue
        name = str(path)
        if not CREDENTIAL_NAME.match(name):
            raise UsageError(
                f"{where}: file {name!r} is not a valid credential name (letters, digits, '_', '.', '-'; "
                "no '/'): give a plain name, looked up in $CREDENTIALS_DIRECTORY"
            )
        by_name.setdefault(name, Credential(name, [])).fields.append(where)
    return list(by_name.values()), notes


def _install(
    plan: Plan,
    root: Path,
    config_dir: Path,
    credentials_dir: Path,
    config_path: Path,
    unit_path: Path,
    drop_in_path: Path,
) -> None:
    # the config is read by the service's dynamic user: 0755/0644, and it holds no secret by design
    _directory(_under(root, config_dir), 0o755)
    _directory(_under(root, credentials_dir), 0o700)  # read by PID 1 (root) for LoadCredential= only
    for cred in plan.credentials:
        secret = _under(root, credentials_dir / cred.name)
        if secret.exists() and secret.stat().st_mode & 0o077:
            secret.chmod(0o600)
            print(f"made {credentials_dir / cred.name} readable by its owner only (0600)")
    if plan.config_text is not None:
        _write(_under(root, config_path), plan.config_text, 0o644)
        print(f"wrote {config_path} from {plan.config_source}")
    else:
        print(f"kept {config_path}")
    _directory(_under(root, unit_path.parent), 0o755, fix=False)
    _write(_under(root, unit_path), plan.unit, 0o644)
    print(f"wrote {unit_path}")
    _directory(_under(root, drop_in_path.parent), 0o755, fix=False)
    _write(_under(root, drop_in_path), plan.drop_in, 0o644)
    names = ", ".join(c.name for c in plan.credentials) or "none"
    print(f"wrote {drop_in_path} (credentials: {names})")
    if plan.capture is not None:
        capture = drop_in_path.with_name(CAPTURE_DROP_IN_NAME)
        _write(_under(root, capture), plan.capture, 0o644)
        print(f"wrote {capture} (live EtherCAT capture: CAP_NET_RAW and AF_PACKET only)")


def _directory(path: Path, mode: int, *, fix: bool = True) -> None:
    if not path.is_dir():
        path.mkdir(mode=mode, parents=True)
        path.chmod(mode)  # mkdir's mode is masked by the umask
    elif fix and path.stat().st_mode & 0o777 != mode:
        path.chmod(mode)


def _write(path: Path, text: str, mode: int) -> None:
    """Atomically: a temporary file beside it, fsynced, renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
