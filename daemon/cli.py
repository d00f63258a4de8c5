"""The ``cellwatch`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from daemon import __version__
from daemon.cli_support import UsageError
from daemon.logs import FORMATS, LEVELS, setup_logging
from ingest.errors import IngestError

#: subcommand name -> module in daemon.commands providing add_parser() and run()
COMMANDS: dict[str, str] = {
    "inspect": "daemon.commands.inspect",
    "capture": "daemon.commands.capture",
    "synth": "daemon.commands.synth",
    "train": "daemon.commands.train",
    "evaluate": "daemon.commands.evaluate",
    "run": "daemon.commands.run",
    "demo": "daemon.commands.demo",
    "publish": "daemon.commands.publish",
    "report": "daemon.commands.report",
    "spool": "daemon.commands.spool",
    "check": "daemon.commands.check",
    "install-service": "daemon.commands.install_service",
}

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

log = logging.getLogger("cellwatch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellwatch",
        description="Anomaly monitoring for robot cells (voraus-AD layout, MVT-Flow).",
    )
    parser.add_argument("--version", action="version", version=f"cellwatch {__version__}")
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=FORMATS,
        default=os.environ.get("CELLWATCH_LOG_FORMAT") or "text",
        help="log records on stderr as text or one JSON object per line "
        "(default: $CELLWATCH_LOG_FORMAT, else text)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=os.environ.get("CELLWATCH_LOG_LEVEL") or "INFO",
        help="lowest level logged (default: $CELLWATCH_LOG_LEVEL, else INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub)
        assert name in sub.choices, f"{module_name} did not register {name!r}"  # may register more
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # the defaults come from the environment, which argparse does not check against the choices
        setup_logging(args.log_format, args.log_level)
    except ValueError as err:
        parser.error(f"{err} (check CELLWATCH_LOG_FORMAT and CELLWATCH_LOG_LEVEL)")
    json_logs = args.log_format == "json"
    try:
        return int(args.func(args) or 0)
    except (UsageError, IngestError) as err:
        if json_logs:  # every stderr line stays a JSON object
            log.error("cellwatch %s: error: %s", args.command, err, extra={"exit_status": 2})
        else:
            print(f"cellwatch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if json_logs:
            log.warning("interrupted", extra={"exit_status": 130})
        else:
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
