"""Supervisors tell the daemon at once when their process's state changes: a datagram naming the instance's
directory, sent to a socket in the daemon's run directory (root's alone, so only root can send) at each write of
status.json. The supervisor watch waits on it rather than finding the change at its next look. A daemon that is
down misses nothing: it reads every status.json when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

EVENTS_SOCKET = "supervisors.sock"
"""In the daemon's run directory."""
MESSAGE_BYTES = 4096  # a path


class SupervisorEvents:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def open(self) -> bool:
        """Listen (a socket a previous daemon left goes); False, saying why, where it cannot: the watch then only
        looks at its interval."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self.path.unlink(missing_ok=True)
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            log.warning("supervisors cannot tell the daemon of changes at once (%s: %s); it looks every second",
                        self.path, exc)
            return False
        self._sock = sock
        return True

    async def next(self) -> Path:
        """The directory of the next instance whose supervisor wrote its status."""
        assert self._sock is not None
        data = await asyncio.get_running_loop().sock_recv(self._sock, MESSAGE_BYTES)
        return Path(os.fsdecode(data))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)
