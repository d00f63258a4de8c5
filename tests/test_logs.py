"""Structured logs: ``cellwatch --log-format json`` writes one JSON object per stderr line, and no
secret ever reaches the log, whatever the format.

Everything runs in a subprocess, as systemd runs the daemon: logging setup is process-wide state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

CELLWATCH = Path(sys.executable).parent / "cellwatch"
REQUIRED = ("ts", "level", "logger", "msg")


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CELLWATCH_LOG_")}
    return subprocess.run(
        args, capture_output=True, text=True, env={**clean, **(env or {})}, timeout=120, check=False
    )


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line parsed as a JSON object with the required keys (fails on any other line)."""
    lines = stderr.splitlines()
    assert lines, "nothing was logged"
    records = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        for key in REQUIRED:
            assert key in record, f"{key!r} missing in {line}"
        ts = datetime.fromisoformat(record["ts"])
        assert ts.utcoffset() == timedelta(0), record["ts"]  # UTC
        assert abs(datetime.now(UTC) - ts) < timedelta(minutes=5)
        records.append(record)
    return records


def python_logging(
    script: str, *, fmt: str = "json", level: str = "DEBUG"
) -> subprocess.CompletedProcess[str]:
    """`script` run after setup_logging(fmt, level), with `log` a logger under cellwatch."""
    prelude = (
        "import logging\n"
        "from daemon.logs import setup_logging\n"
        f"setup_logging({fmt!r}, {level!r})\n"
        "log = logging.getLogger('cellwatch.test')\n"
    )
    return run([sys.executable, "-c", prelude + textwrap.dedent(script)])


def test_cli_error_is_a_json_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run([str(CELLWATCH), "--log-format", "json", "run", "--config", str(missing)])
    assert result.returncode == 2
    assert result.stdout == ""
    [record] = json_lines(result.stderr)
    assert record["level"] == "ERROR"
    assert record["logger"] == "cellwatch"
    assert f"cannot read config {missing}" in record["msg"]
    assert record["exit_status"] == 2


def test_format_and_level_default_from_the_environment(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    as_json = run([str(CELLWATCH), "run", "--config", missing], env={"CELLWATCH_LOG_FORMAT": "json"})
    assert json_lines(as_json.stderr)[0]["level"] == "ERROR"
    # the option wins over the environment; text keeps the one-line error people read
    as_text = run(
        [str(CELLWATCH), "--log-format", "text", "run", "--config", missing],
        env={"CELLWATCH_LOG_FORMAT": "json"},
    )
    assert (
        as_text.stderr == f"cellwatch run: error: cannot read config {missing}: No such file or directory\n"
    )
    bad = run([str(CELLWATCH), "run", "--config", missing], env={"CELLWATCH_LOG_LEVEL": "loud"})
    assert bad.returncode == 2
    assert "log level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'" in bad.stderr


def test_json_lines_carry_extra_fields_exceptions_and_warnings() -> None:
    result = python_logging(
        """
        import warnings
        log.debug("below INFO")
        log.info("spool %s", "draining", extra={"spool_bytes": 4096, "robot": "arm 1", "level": "x"})
        log.warning("two\\nlines")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("scoring failed")
        warnings.warn("old option", DeprecationWarning, stacklevel=1)
        """,
        level="info",
    )
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stderr)
    assert [r["msg"] for r in records[:3]] == ["spool draining", "two\nlines", "scoring failed"]
    info, warning, error, warned = records
    assert info["level"] == "INFO"
    assert info["logger"] == "cellwatch.test"
    assert (info["spool_bytes"], info["robot"]) == (4096, "arm 1")
    assert info["extra_level"] == "x"  # an extra field never overwrites a fixed key
    assert "exc" not in warning
    assert error["level"] == "ERROR"
    assert error["exc"].startswith("Traceback (most recent call last):")
    assert error["exc"].endswith("ZeroDivisionError: division by zero")
    assert warned["logger"] == "py.warnings"
    assert "DeprecationWarning: old option" in warned["msg"]


def test_text_format_is_one_readable_line() -> None:
    result = python_logging('log.warning("spool full", extra={"spool_bytes": 7})', fmt="text")
    [line] = result.stderr.splitlines()
    ts, level, rest = line.split(maxsplit=2)
    assert datetime.fromisoformat(ts).utcoffset() == timedelta(0)
    assert level == "WARNING"
    assert rest == "cellwatch.test: spool full spool_bytes=7"


SECRETS = ("hunter2-pw", "tok-abc123", "dXNlcjpodW50ZXIy", "s3cr3t-from-extra", "later-on-pw")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_are_redacted(fmt: str) -> None:
    result = python_logging(
        """
        from pydantic import SecretStr
        from daemon.logs import register_secret

        password = SecretStr("hunter2-pw")
        log.info("connecting with %s", password)
        log.info("raw value hunter2-pw seen again")  # remembered once a SecretStr went through
        log.info("POST http://db:8086/api/v2/write?org=o&token=tok-abc123&bucket=b")
        log.info("headers %s", {"Authorization": "Basic dXNlcjpodW50ZXIy", "Accept": "*/*"})
        log.info("Authorization: Token tok-abc123")
        log.info("config: password=hunter2-pw, database=cellwatch")
        log.info("connected", extra={"creds": SecretStr("s3cr3t-from-extra"), "url": "x?password=p4ss"})
        register_secret("later-on-pw")
        log.info("resolved later-on-pw")
        try:
            raise ConnectionError("login failed for password=hunter2-pw")
        except ConnectionError:
            log.exception("cannot connect")
        """,
        fmt=fmt,
    )
    assert result.returncode == 0, result.stderr
    for secret in (*SECRETS, "p4ss"):
        assert secret not in result.stderr
    if fmt == "json":
        records = json_lines(result.stderr)
        lines = [r["msg"] for r in records]
        assert (records[6]["creds"], records[6]["url"]) == ("**********", "x?password=**********")
    else:
        lines = [line.split(": ", 1)[1] for line in result.stderr.splitlines() if line[:1].isdigit()]
        lines[6] = lines[6].replace(" creds=********** url=x?password=**********", "")
    assert lines[:8] == [
        "connecting with **********",
        "raw value ********** seen again",
        "POST http://db:8086/api/v2/write?org=o&token=**********&bucket=b",  # the rest stays readable
        "headers {'Authorization': 'Basic **********', 'Accept': '*/*'}",
        "Authorization: Token **********",
        "config: password=**********, database=cellwatch",
        "connected",
        "resolved **********",
    ]
    assert "ConnectionError: login failed for password=**********" in result.stderr
