"""Logging for the daemon: human text or one JSON object per line, both on stderr, secrets redacted.

``setup_logging("json", "INFO")`` makes every record one line such as::

    {"ts": "2024-05-01T12:00:00.123Z", "level": "WARNING", "logger": "cellwatch.sink.influx",
     "msg": "InfluxDB write failed ...", "spooled_bytes": 4096}

(on one line): the fixed keys ``ts`` (ISO 8601, UTC), ``level``, ``logger`` and ``msg``, then every
``extra=`` field of the call, then ``exc`` (the formatted traceback) when there is one. That is what
journald, Loki or any log shipper can parse without a grok pattern; systemd/cellwatch.service selects
it with ``CELLWATCH_LOG_FORMAT=json``.

Secrets never reach the output: :class:`RedactingFilter`, installed on the handler, replaces

* the value of any pydantic ``SecretStr`` passed as an argument or an ``extra=`` field (and remembers
  it, so the same value is redacted wherever it shows up later), and any value given to
  :func:`register_secret`;
* whatever follows ``token=``, ``password=`` (also ``"token": "…"`` and the like) and
  ``Authorization:`` in the message, the ``extra=`` fields and the traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import SecretStr

__all__ = [
    "FORMATS",
    "LEVELS",
    "REDACTED",
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "redact",
    "register_secret",
    "setup_logging",
]

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REDACTED = "**********"  # what pydantic shows for a SecretStr
#: known secret values shorter than this are not searched for in text (they would mangle every message)
MIN_SECRET_LENGTH = 4

# attributes every LogRecord has; anything else on a record came from `extra=`
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

_KEY_VALUE = re.compile(
    # password=…, access_token=…, "token": "…", 'password': '…' (the value up to a separator or quote)
    r"""(?ix)
    (?P<key>[\w.-]*(?:password|passwd|token)["']?\s*[=:]\s*["']?)
    (?P<value>(?!\*{10})[^\s&,;"'}\])]+)
    """
)
_AUTHORIZATION = re.compile(
    # Authorization: Token abc, 'Authorization': 'Basic abc=' (the scheme is kept, the credential is not)
    r"""(?ix)
    (?P<key>authorization["']?\s*[:=]\s*["']?(?:(?:basic|bearer|token|digest)\s+)?)
    (?P<value>(?!\*{10})[^\s,;"'}\])]+)
    """
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: SecretStr | str | None) -> None:
    """Redact this value wherever it appears in a log record from now on (e.g. a resolved password)."""
    if value is None:
        return
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if len(raw) >= MIN_SECRET_LENGTH:
        with _secrets_lock:
            _secrets.add(raw)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with known secret values and key=value / Authorization credentials replaced."""
    with _secrets_lock:
        known = _secrets.union(s for s in secrets if len(s) >= MIN_SECRET_LENGTH)
    for secret in sorted(known, key=len, reverse=True):  # a secret containing another one goes first
        text = text.replace(secret, REDACTED)
    text = _AUTHORIZATION.sub(lambda m: m["key"] + REDACTED, text)
    return _KEY_VALUE.sub(lambda m: m["key"] + REDACTED, text)


def _scrub(value: Any, found: set[str]) -> Any:
    """A loggable copy of `value`: SecretStr replaced (its value noted in `found`), strings redacted."""
    if isinstance(value, SecretStr):
        found.add(value.get_secret_value())
        return REDACTED
    if isinstance(value, str):
        return value  # redacted once every SecretStr in the record is known (see RedactingFilter)
    if isinstance(value, dict):
        return {k: _scrub(v, found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, found) for v in value)
    return value


def _redact_strings(value: Any, secrets: set[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: _redact_strings(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_strings(v, secrets) for v in value)
    return value


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra=` fields of a record."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class RedactingFilter(logging.Filter):
    """Rewrites each record in place so that no formatter can print a secret (always returns True).

    The message is rendered once (``msg % args``) and redacted; ``args`` is cleared. Tracebacks are
    rendered and redacted into ``exc_text``, which formatters use instead of rendering their own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_cellwatch_redacted", False):  # a record passes each handler once
            return True
        found: set[str] = set()
        args: Any = record.args
        if isinstance(args, tuple):
            args = tuple(_scrub(a, found) for a in args)
        elif isinstance(args, dict):
            args = _scrub(args, found)
        record.msg = _scrub(record.msg, found)
        extras = {k: _scrub(v, found) for k, v in extra_fields(record).items()}
        for secret in found:
            register_secret(secret)
        try:
            message = str(record.msg) % args if args else str(record.msg)
        except (TypeError, ValueError, KeyError):
            message = f"{record.msg} {args!r}"  # a malformed call: still log it, still redacted
        record.msg = redact(message, found)
        record.args = None
        for key, value in extras.items():
            setattr(record, key, _redact_strings(value, found))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, found)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, found)
        record._cellwatch_redacted = True
        return True


def _iso_utc(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            out[key if key not in out else f"extra_{key}"] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z WARNING cellwatch.sink.influx: message key=value``."""

    def __init__(self) -> None:
        super().__init__("%(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {super().format(record)}"
        extras = extra_fields(record)
        if extras:
            first, sep, rest = line.partition("\n")  # after the message, before a traceback
            fields = " ".join(f"{k}={v}" for k, v in extras.items())
            line = f"{first} {fields}{sep}{rest}"
        return line


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time of the call (tests and tools replace it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(fmt: str, level: str) -> logging.Handler:
    """Send every log record (the root logger's) to stderr as `fmt` ("text" or "json") from `level` up.

    Calling it again replaces the handler it installed before; handlers installed by others (a test
    runner's) are left alone. Returns the handler.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if level.upper() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_cellwatch", False)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler._cellwatch = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    if fmt == "json":
        logging.captureWarnings(True)  # Python warnings become JSON lines too (logger "py.warnings")
    return handler
