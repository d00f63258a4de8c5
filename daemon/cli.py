"""The ``cellwatch`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from daemon import __version__
from daemon.cli_support import UsageError
from ingest.errors import IngestError

#: subcommand name -> module in daemon.commands providing add_parser() and run()
COMMANDS: dict[str, str] = {
    "inspect": "daemon.commands.inspect",
    "synth": "daemon.commands.synth",
    "train": "daemon.commands.train",
    "evaluate": "daemon.commands.evaluate",
    "run": "daemon.commands.run",
    "demo": "daemon.commands.demo",
}

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellwatch",
        description="Anomaly monitoring for robot cells (voraus-AD layout, MVT-Flow).",
    )
    parser.add_argument("--version", action="version", version=f"cellwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub)
        assert name in sub.choices, f"{module_name} did not register {name!r}"  # may register more
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, IngestError) as err:
        print(f"cellwatch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
