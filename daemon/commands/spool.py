"""``cellwatch spool resend --config FILE``: re-send the batches InfluxDB refused.

A batch InfluxDB refuses for good (404 database not found, 400 bad line, ...) is not dropped: the
sink keeps it in ``<spool_dir>/rejected/batch-*.lp`` (line protocol, as it was sent) with a
``.reason`` file. Once the cause is fixed (the database created, a retention policy added), this
command sends each file again, oldest first, to the InfluxDB of the config's ``sinks.influxdb``
section, and removes each one InfluxDB accepted. It can run while the daemon runs (it does not touch
the spool itself, only ``rejected/``). Batches are idempotent: points carry their own timestamps.

Exit status: 0 when every batch was delivered (or there was none), 1 when some are left (refused
again, or InfluxDB unreachable: the summary says which and why), 2 for a config error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from daemon.cli_support import UsageError, console


def add_parser(sub: Any) -> None:
    p = sub.add_parser("spool", help="manage the InfluxDB sink's spool (re-send refused batches)")
    actions = p.add_subparsers(dest="spool_action", metavar="ACTION", required=True)
    r = actions.add_parser(
        "resend",
        help="re-send the batches InfluxDB refused (spool_dir/rejected/) once the cause is fixed",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--config", required=True, type=Path, help="the daemon's YAML config")
    r.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")
    r.set_defaults(func=resend)


def resend(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError, load_config
    from daemon.sinks.influx import (
        MissingDatabase,
        PermanentWriteError,
        TransientWriteError,
        ensure_database,
        post,
        target_from_config,
    )

    try:
        config = load_config(args.config)
        influx = config.sinks.influxdb
        if influx is None:
            raise UsageError(f"{args.config}: no sinks.influxdb section, so there is no spool to re-send")
        target = target_from_config(influx)
    except ConfigError as err:
        raise UsageError(str(err)) from err
    rejected = Path(influx.spool_dir) / "rejected"
    batches = sorted(rejected.glob("batch-*.lp")) if rejected.is_dir() else []
    if not batches:
        console.print(f"nothing to re-send: no refused batches in {rejected}")
        return 0
    if args.dry_run:
        for path in batches:
            console.print(f"{path.name}: {path.stat().st_size} bytes, refused: {_reason(path)}")
        console.print(f"{len(batches)} batch(es) would be re-sent to {target.url}")
        return 0
    if influx.create_database:
        try:
            console.print(f"InfluxDB: {ensure_database(target, create=True)}")
        except (MissingDatabase, PermanentWriteError, TransientWriteError) as err:  # the writes will tell
            console.print(f"InfluxDB database check: {err}")
    sent = refused = 0
    unreachable = ""
    for path in batches:
        try:
            post(target, path.read_bytes())
        except PermanentWriteError as err:  # still refused: keep it, say why
            refused += 1
            path.with_name(path.name + ".reason").write_text(f"{err}\n")
            console.print(f"{path.name}: refused again: {err}")
            continue
        except TransientWriteError as err:  # unreachable or credentials: the rest would fail alike
            unreachable = str(err)
            break
        path.unlink()
        path.with_name(path.name + ".reason").unlink(missing_ok=True)
        sent += 1
    left = len(batches) - sent
    summary = f"re-sent {sent} of {len(batches)} batch(es) to {target.url}"
    if refused:
        summary += f"; {refused} refused again (kept in {rejected})"
    if unreachable:
        summary += f"; stopped: InfluxDB not usable ({unreachable}), {left - refused} not tried (kept)"
    console.print(summary)
    return 0 if left == 0 else 1


def _reason(path: Path) -> str:
    note = path.with_name(path.name + ".reason")
    return note.read_text().strip() if note.exists() else "(no reason recorded)"
