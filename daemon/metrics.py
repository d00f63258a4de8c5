"""Prometheus metrics: a tiny text-format endpoint (GET /metrics) served from the event loop.

Counters and gauges are read from the running pipeline and sinks at scrape time, so the hot path
does no extra work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

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
}


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
    def __init__(self, listen: str, collect: Collector) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host, int(port)
        self.collect = collect
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        self.port = int(sock[1])
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if request.startswith(b"GET ") and path in (b"/metrics", b"/metrics/"):
                body = render(self.collect()).encode()
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
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

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
