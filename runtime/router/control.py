"""The control channel between the daemon and its router process.

JSON objects, one per line, on a Unix socket; beside a message may travel one file descriptor (SCM_RIGHTS),
which is how the listening socket passes from an old router process to its successor: one socket, one
accept queue, so no connection is refused or reset while routers change.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
from pathlib import Path

TIMEOUT = 5.0
"""How long the daemon waits for any reply: the router answers at once, or it is wedged."""
MAX_LINE = 16 * 1024 * 1024
"""A route table of many thousands of apps fits; a peer sending more is broken."""


def code_version() -> str:
    """What the router runs, by the source of this package: a daemon with other code replaces the process."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class ControlError(Exception):
    """The router process refused a request, or cannot be reached."""


class Channel:
    """One control connection: request and reply alternate, so a descriptor belongs to the line it came with."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._fds: list[int] = []

    def send(self, message: dict, fd: int | None = None) -> None:
        data = json.dumps(message).encode() + b"\n"
        if fd is None:
            self.sock.sendall(data)
            return
        sent = socket.send_fds(self.sock, [data], [fd])
        self.sock.sendall(data[sent:])

    def receive(self) -> tuple[dict, int | None]:
        while b"\n" not in self._buffer:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 1)
            for fd in fds:
                os.set_inheritable(fd, False)  # recv_fds cannot ask for MSG_CMSG_CLOEXEC
            self._fds += fds
            if not data:
                raise ConnectionError("the control channel was closed")
            self._buffer += data
            if len(self._buffer) > MAX_LINE:
                raise ValueError("a control message is too long")
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("a control message must be a JSON object")
        return message, self._fds.pop(0) if self._fds else None

    def close(self) -> None:
        for fd in self._fds:
            socket.close(fd)
        self._fds.clear()
        self.sock.close()

    def peer_pid(self) -> int:
        """The process at the other end, as the kernel knows it: not what the peer says."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]


class ControlClient:
    """The daemon's end: one request at a time, from any thread. After a failed call (a timeout leaves a
    late reply in the way of the next) the client is broken for good: the caller connects again."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        self.path = path
        self._channel = Channel(sock)
        self._lock = threading.Lock()
        self._broken = False
        self.pid = self._channel.peer_pid()

    def call(self, op: str, fd: int | None = None, *, expect_fd: bool = False,
             **fields: object) -> tuple[dict, int | None]:
        """Send one request; return the reply and, with `expect_fd`, the descriptor that came with it (the
        caller owns it). Any other descriptor is closed."""
        with self._lock:
            if self._broken:
                raise ControlError(f"the control channel to the router process {self.pid} is broken")
            try:
                self._channel.send({"op": op, **fields}, fd)
                reply, received = self._channel.receive()
            except (OSError, ValueError) as exc:
                self._broken = True
                self._channel.close()
                raise ControlError(f"the router process {self.pid} did not answer {op!r}: {exc}") from exc
        if received is not None and not (expect_fd and reply.get("ok")):
            socket.close(received)
            received = None
        if not reply.get("ok"):
            raise ControlError(reply.get("error") or f"the router process refused {op!r}")
        if expect_fd and received is None:
            raise ControlError(f"the router process {self.pid} sent no descriptor with its answer to {op!r}")
        return reply, received

    def close(self) -> None:
        with self._lock:
            self._broken = True
            self._channel.close()
