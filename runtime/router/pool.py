"""Keep-alive connections to upstreams: a request reuses an idle one instead of paying for a new connection.

A new connection to an app whose owner the route names is kept only if a socket of that uid accepted it: the
one listening on the app's port may be another tenant's, which bound it while the app's process was down.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterable

from runtime.router.config import RouterConfig
from runtime.router.routes import Address
from runtime.router.socket_owners import SocketOwners
from runtime.router.upstream import UpstreamConnection

OWNER_LOOKUPS = 20  # 1 ms apart: the accepting socket exists once the handshake's last packet is in


class ForeignListener(ConnectionRefusedError):
    """The socket that accepted the connection is not the app's uid's."""


class UpstreamPool:
    """Idle connections per upstream, most recently used first, closed after `pool_idle_timeout`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: RouterConfig,
                 owners: SocketOwners | None = None) -> None:
        self.loop = loop
        self._config = config
        self._owners = owners
        self._idle: dict[Address, list[UpstreamConnection]] = {}
        self._closed = False
        self._sweeper = loop.call_later(config.pool_idle_timeout, self._sweep)

    def take(self, address: Address, max_idle: float, owner: int | None = None) -> UpstreamConnection | None:
        """The most recently used idle connection, if it has been idle for less than `max_idle`; one made for
        another owner than the route's now is closed instead."""
        idle = self._idle.get(address)
        if not idle:
            return None
        now = self.loop.time()
        limit = now - self._config.pool_idle_timeout
        while idle:
            conn = idle[-1]
            if conn.idle_since < limit:
                self._close_all(idle)  # the newest is stale, so are the older ones
                idle.clear()
            elif conn.idle_since < now - max_idle:
                return None  # and older ones are older still
            else:
                idle.pop()
                if conn.owner != owner:
                    conn.transport.close()
                elif not conn.transport.is_closing():  # else the app closed it and connection_lost is on its way
                    conn.reused = True
                    return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        conn.idle_since = self.loop.time()
        idle = self._idle.setdefault(conn.address, [])
        if len(idle) < self._config.pool_size and not conn.transport.is_closing() and not self._closed:
            idle.append(conn)
        else:
            conn.transport.close()

    def discard(self, conn: UpstreamConnection) -> None:
        """The app closed an idle connection."""
        idle = self._idle.get(conn.address)
        if idle and conn in idle:
            idle.remove(conn)

    async def connect(self, address: Address, owner: int | None = None) -> UpstreamConnection:
        """A new connection; with `owner` (and a kernel that says whose sockets are whose), one that a socket of
        that uid accepted, else ForeignListener."""
        async with asyncio.timeout(self._config.connect_timeout):
            transport, conn = await self.loop.create_connection(lambda: UpstreamConnection(self, address), *address)
            if owner is not None and self._owners is not None:
                await self._check_owner(transport, owner)
        conn.owner = owner
        return conn

    async def _check_owner(self, transport: asyncio.BaseTransport, owner: int) -> None:
        local, remote = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        found = None
        try:
            for _ in range(OWNER_LOOKUPS):
                if (found := self._owners.peer(local, remote)) is not None:
                    break
                await asyncio.sleep(0.001)
        finally:
            if found != owner:
                transport.abort()
        if found != owner:
            raise ForeignListener(errno.ECONNREFUSED, f"port {remote[1]} is held by uid {found}, not {owner}")

    def retain(self, addresses: set[Address]) -> None:
        """Close idle connections to upstreams no app routes to any more, so old processes can drain."""
        for address in [a for a in self._idle if a not in addresses]:
            self._close_all(self._idle.pop(address))

    def close(self) -> None:
        self._closed = True
        self._sweeper.cancel()
        for idle in self._idle.values():
            self._close_all(idle)
        self._idle.clear()

    def _sweep(self) -> None:
        limit = self.loop.time() - self._config.pool_idle_timeout
        for idle in self._idle.values():
            stale = [conn for conn in idle if conn.idle_since < limit]
            if stale:
                idle[:] = [conn for conn in idle if conn.idle_since >= limit]
                self._close_all(stale)
        self._sweeper = self.loop.call_later(self._config.pool_idle_timeout / 2, self._sweep)

    @staticmethod
    def _close_all(conns: Iterable[UpstreamConnection]) -> None:
        for conn in conns:
            conn.transport.close()
