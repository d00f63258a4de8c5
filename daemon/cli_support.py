"""Shared bits of the command line: the error type printed without a traceback, console and progress."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
err_console = Console(stderr=True)


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def progress() -> Progress:
    """A progress bar on stderr (stdout stays clean for --json output)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
