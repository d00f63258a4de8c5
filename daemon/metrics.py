"""Prometheus metrics: a tiny text-format endpoint (GET /metrics) served from the event loop.

Counters and gauges are read from the running pipeline and sinks at scrape time, so the hot path
does no extra work.

With an overlay directory (daemon.overlays.OverlayStore) the same server also serves the anomaly-map
overlays for the dashboards: GET /overlays/NAME.png and /overlays/latest/ROBOT_CAMERA.png. Only names
of [A-Za-z0-9_.-] ending in .png are looked up (no `/`, no `%`-escapes: nothing can name a path outside
the directory), the resolved file must be a regular file directly in the directory (or its latest/), at
most MAX_OVERLAY_BYTES and a PNG; anything else is 404. Files are read off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

log = logging.getLogger("cellwatch.metrics")

Sample = tuple[str, str, dict[str, str], float]  # name, type, labels, value
Collector = Callable[[], Iterable[Sample]]

HELP = {
    "cellwatch_cycles_in_total": "Cycles (frames) read from all sources",
    "cellwatch_windows_scored_total": "Windows scored",
    "cellwatch_anomalous_windows_total": "Windows over the threshold",
    "cellwatch_alerts_total": "Alerts closed and written",
    "cellwatch_rejects_total": "Input rejected, by source and reason",
    "cellwatch_queue_depth": "Windows waiting to be scored",
    "cellwatch_spool_bytes": "Bytes waiting in the InfluxDB spool",
    "cellwatch_sink_retries_total": "InfluxDB write retries",
    "cellwatch_inference_seconds_total": "Time spent in inference",
    "cellwatch_inference_batches_total": "Inference batches",
    "cellwatch_overlays_saved_total": "Anomaly-map overlays written",
    "cellwatch_overlays_deleted_total": "Overlays deleted to keep the directory within its bounds",
    "cellwatch_overlays_failed_total": "Overlay writes the disk refused",
    "cellwatch_overlay_files": "Overlay files kept (latest/ not counted)",
    "cellwatch_overlay_bytes": "Bytes of the overlay files kept (latest/ not counted)",
}

MAX_OVERLAY_BYTES: Final = 16 * 2**20  # a larger file is not served (an overlay is at most ~3 MiB)
OVERLAY_PATH: Final = re.compile(rb"/overlays/(latest/)?([A-Za-z0-9_.-]{1,200}\.png)")
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def render(samples: Iterable[Sample]) -> str:
    lines: list[str] = []
    seen: set[str] = set()
    for name, kind, labels, value in samples:
        if name not in seen:
            seen.add(name)
            lines.append(f"# HELP {name} {HELP.get(name, name)}")
            lines.append(f"# TYPE {name} {kind}")
        label = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{name}{{{label}}} {value:.17g}" if label else f"{name} {value:.17g}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """GET /metrics; with `overlays`, also the overlay PNGs in that directory (see the module doc)."""

    def __init__(self, listen: str, collect: Collector, *, overlays: Path | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host, int(port)
        self.collect = collect
        self.overlays = overlays
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        self.port = int(sock[1])
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        if self.overlays is not None:
            log.info("overlays of %s on http://%s:%d/overlays/", self.overlays, self.host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            path = path.split(b"?", 1)[0]  # a cache-busting query (?t=...) names the same file
            get = request.startswith(b"GET ")
            overlay = OVERLAY_PATH.fullmatch(path) if get and self.overlays is not None else None
            if get and path in (b"/metrics", b"/metrics/"):
                body = render(self.collect()).encode()
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            elif overlay and (data := await asyncio.to_thread(self._read_overlay, overlay)) is not None:
                body = data
                cache = b"no-cache" if overlay.group(1) else b"max-age=3600"  # latest/ changes in place
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Content-Type-Options: nosniff\r\n"
                    b"Cache-Control: " + cache + b"\r\n"
                )
            else:
                body = b"not found: try /metrics\n"
                head = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sends garbage or goes away is not our problem
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _read_overlay(self, match: re.Match[bytes]) -> bytes | None:
        """The PNG a matched path names, or None (not there, not inside the directory, not a regular
        file, too large, not a PNG). Runs on a worker thread."""
        assert self.overlays is not None
        try:
            root = self.overlays.resolve(strict=True)
            folder = root / "latest" if match.group(1) else root
            path = (folder / match.group(2).decode("ascii")).resolve(strict=True)
            if path.parent != folder.resolve(strict=True) or not path.is_relative_to(root):
                return None  # a symbolic link out of the directory
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_OVERLAY_BYTES:
                    return None
                data = f.read(MAX_OVERLAY_BYTES + 1)
        except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop
            return None
        if len(data) > MAX_OVERLAY_BYTES or not data.startswith(PNG_SIGNATURE):
            return None
        return data

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
