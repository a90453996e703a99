"""Whose socket takes a TCP connection on this host, in the kernel's own words: sock_diag over netlink, which
needs no privilege (it is what `ss -e` reads) and looks one socket up as the kernel routes a packet to it.

Tenants share the loopback's port space: a port one app's process let go of (it crashed, it restarts) can be
bound by another's meanwhile. So the router checks that the socket which accepted each connection it opens to an
app is the app's uid's, and the daemon routes to an instance only once the socket that listens on its port is.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
ALL_STATES = 0xFFFFFFFF
NO_COOKIE = 0xFFFFFFFF
HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
REQUEST = struct.Struct("=BBBxI")  # struct inet_diag_req_v2, up to its socket id
SOCKET_ID = struct.Struct("!HH16s16s")  # ports and addresses, in network order
SOCKET_ID_REST = struct.Struct("=III")  # interface, cookie
UID_AT = HEADER.size + 4 + SOCKET_ID.size + SOCKET_ID_REST.size + 12  # in struct inet_diag_msg
TCP_LISTEN, TCP_SYN_RECV, TCP_NEW_SYN_RECV = 10, 3, 12
LOOPBACK = "127.0.0.1"
ANSWER_TIMEOUT = 0.5  # the kernel answers within the system call: this is a guard


class SocketOwners:
    """One netlink socket; queries take turns (threads may share it)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        self._sock.settimeout(ANSWER_TIMEOUT)
        self._lock = threading.Lock()
        self._seq = 0

    @classmethod
    def open(cls) -> SocketOwners | None:
        """None, saying why, where the kernel does not answer (no inet_diag): then nothing can be checked."""
        try:
            owners = cls()
            with socket.socket() as probe:
                probe.bind((LOOPBACK, 0))
                probe.listen(1)
                found = owners.listener(probe.getsockname()[1])
            if found != os.geteuid():
                raise OSError(f"it names uid {found} for a socket of uid {os.geteuid()}")
        except OSError as exc:
            log.warning("cannot tell whose sockets take connections (sock_diag: %s): the ports of apps are not "
                        "checked", exc)
            return None
        return owners

    def listener(self, port: int) -> int | None:
        """The uid whose socket would accept a connection to 127.0.0.1:`port` now; None when none would."""
        found = self._ask(LOOPBACK, port, LOOPBACK, 0)  # from port 0: no connection, so the listener
        return found[1] if found is not None and found[0] == TCP_LISTEN else None

    def peer(self, local: tuple, remote: tuple) -> int | None:
        """The uid owning the socket at the other end of the TCP connection from `local` to `remote` (addresses
        as sockets give them), within this host; None while the kernel has not made that socket yet (the
        handshake's last step), or once it is gone."""
        found = self._ask(remote[0], remote[1], local[0], local[1])
        return found[1] if found is not None and found[0] not in (TCP_SYN_RECV, TCP_NEW_SYN_RECV) else None

    def _ask(self, source: str, source_port: int, destination: str, destination_port: int) -> tuple[int, int] | None:
        """(state, uid) of the TCP socket whose own address is source:source_port, as a packet from
        destination:destination_port would find it; None when there is none."""
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        body = (REQUEST.pack(family, socket.IPPROTO_TCP, 0, ALL_STATES)
                + SOCKET_ID.pack(source_port, destination_port, socket.inet_pton(family, source),
                                 socket.inet_pton(family, destination))
                + SOCKET_ID_REST.pack(0, NO_COOKIE, NO_COOKIE))
        with self._lock:
            self._seq = self._seq % 0xFFFFFFFF + 1
            self._sock.sendto(HEADER.pack(HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self._seq, 0)
                              + body, (0, 0))
            while True:
                reply = self._sock.recv(4096)
                if len(reply) >= HEADER.size and HEADER.unpack_from(reply)[3] == self._seq:
                    break  # else the answer to a question given up on
        kind = HEADER.unpack_from(reply)[1]
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, HEADER.size)[0]
            if code == errno.ENOENT:
                return None
            raise OSError(code, os.strerror(code))
        if kind != SOCK_DIAG_BY_FAMILY or len(reply) < UID_AT + 4:
            raise OSError(errno.EPROTO, "sock_diag answered something else")
        return reply[HEADER.size + 1], struct.unpack_from("=I", reply, UID_AT)[0]
