"""systemd notification protocol (sd_notify) without libsystemd: READY, WATCHDOG, STOPPING, STATUS.

Messages go as datagrams to the Unix socket in $NOTIFY_SOCKET (a leading '@' is the abstract
namespace). Outside systemd (no $NOTIFY_SOCKET) every call is a no-op. The watchdog interval is half
of $WATCHDOG_USEC, and only when $WATCHDOG_PID (if set) is this process.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("cellwatch.notify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_interval_s: float | None = None
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 2e6
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _send(self, message: str) -> bool:
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # never block the event loop: a receiver that does not read makes sendto fail, not wait
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), target)
            return True
        except OSError as err:  # systemd gone or socket full: never fatal for the daemon
            log.warning("sd_notify %r failed: %s", message.split("=")[0], err)
            return False

    def ready(self, status: str = "") -> bool:
        return self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self._send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self._send("STOPPING=1")

    def reloading(self) -> bool:
        return self._send("RELOADING=1")

    def status(self, text: str) -> bool:
        return self._send(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
