"""systemd integration: sd_notify messages, the watchdog and socket activation, without libsystemd.

The notify protocol is one datagram of `KEY=VALUE` lines sent to the unix socket named in
`$NOTIFY_SOCKET`; socket activation hands listening sockets in from fd 3 (`sd_listen_fds(3)`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

# sd_listen_fds(3): passed sockets start right after stdin, stdout and stderr.
LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """Sends sd_notify messages to the service manager; does nothing when not run by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        """Build from `$NOTIFY_SOCKET`: a path, or an abstract socket when it starts with '@'."""
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        return cls("\0" + value[1:] if value.startswith("@") else value)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send the fields as one datagram; True when it was sent, False when disabled or it failed."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            # A lost notification must never take the daemon down; systemd's own sd_notify is as lenient.
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """`READY=1`, with `STATUS=` when given: the table is in force and the port is open."""
        return self.notify("READY=1", *([_status(status)] if status is not None else []))

    def reloading(self) -> bool:
        """`RELOADING=1` with the monotonic time, which systemd requires to tell reloads apart."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """`STOPPING=1`: shutdown has begun."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """`STATUS=text`, shown by `systemctl status`."""
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        """`WATCHDOG=1`: the event loop is alive."""
        return self.notify("WATCHDOG=1")


def _status(text: str) -> str:
    # A newline would end the field and start another, so a status could forge READY=1.
    return "STATUS=" + " ".join(text.splitlines())


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of `$WATCHDOG_USEC`), or None when no watchdog is asked of us."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Ping the watchdog every `interval` seconds until cancelled; run it on the daemon's event loop."""
    # Pinging from the loop itself, not a thread, is the point: a blocked loop stops the pings
    # and systemd restarts the daemon, while a slow exchange (awaited, not blocking) never does.
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The sockets systemd passed in (`LISTEN_PID`/`LISTEN_FDS`), in order; empty when none were.

    The variables are removed afterwards so that a child process never takes them for its own.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    for name in _LISTEN_VARIABLES:
        env.pop(name, None)
    if pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + max(n, 0)):
        os.set_inheritable(fd, False)
        # fileno= alone makes Python read family, type and protocol from the descriptor itself.
        sockets.append(socket.socket(fileno=fd))
    return sockets
