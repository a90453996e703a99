"""asyncssh server: who may connect, and what a session may ask for (exec only)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncssh

from gitd.identity.directory import Directory
from gitd.identity.roles import Actor
from gitd.ssh.session import SessionHandler
from pipeline.limits import Limits

log = logging.getLogger(__name__)

WINDOW = 2 * 1024 * 1024  # per channel: what one push may have in flight in the daemon
MAX_PACKET = 256 * 1024


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key(str(path))
    path.chmod(0o600)
    key.write_public_key(str(path) + ".pub")
    return key


class AuthServer(asyncssh.SSHServer):
    """One instance per connection; only public keys, and only the one the client proved."""

    def __init__(self, directory: Directory, open_connections: set[AuthServer], limits: Limits) -> None:
        self.directory = directory
        self.open_connections = open_connections
        self.limits = limits
        self.conn: asyncssh.SSHServerConnection | None = None
        self.address = ""
        self.authenticated = False
        self._candidate: Actor | None = None
        self._key: asyncssh.SSHKey | None = None
        self._offered: set[bytes] = set()  # the keys offered so far (asyncssh asks twice for the one it uses)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.open_connections.add(self)
        address = self.address = (conn.get_extra_info("peername") or ("",))[0]
        waiting = [c for c in self.open_connections if not c.authenticated]
        if len(waiting) > self.limits.max_ssh_unauthenticated or \
                sum(1 for c in waiting if c.address == address) > self.limits.max_connections_per_client:
            log.warning("ssh: dropped a connection from %s: %d connections are authenticating "
                        "(--max-ssh-unauthenticated, --max-connections-per-client)", address, len(waiting) - 1)
            conn.abort()
            return
        if len(self.open_connections) > self.limits.max_ssh_connections:
            # Before any authentication: anonymous clients must not hold every slot of the daemon's descriptors.
            # Nothing the client could show can be said before the version exchange: dropped, as OpenSSH's
            # MaxStartups does, and said in the daemon's log.
            log.warning("ssh: dropped a connection from %s: %d are open, the limit (--max-ssh-connections)",
                        conn.get_extra_info("peername"), len(self.open_connections) - 1)
            conn.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_connections.discard(self)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh calls this for a key offered without a signature too; the key is only
        # trusted when auth_completed() follows, which asyncssh does only after it checked
        # the signature of the request that called this last.
        self._offered.add(key.public_data)
        if len(self._offered) > self.limits.max_auth_tries:
            assert self.conn is not None
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, str(self.limits.refuse(
                "max_auth_tries", "too many keys offered on one connection")))
            return False
        self._candidate = await asyncio.to_thread(self.directory.actor_for_key, key)
        self._key = key
        return self._candidate is not None

    def auth_completed(self) -> None:
        assert self.conn is not None and self._candidate is not None
        self.authenticated = True
        self.conn.set_extra_info(devflow_key=self._key)
        log.info("ssh: %s authenticated (%s) from %s", self._candidate.name, self._candidate.via,
                 self.conn.get_extra_info("peername"))


async def start_ssh_server(
    host: str, port: int, host_key: asyncssh.SSHKey, directory: Directory, sessions: SessionHandler, limits: Limits,
) -> asyncssh.SSHAcceptor:
    open_connections: set[AuthServer] = set()
    return await asyncssh.create_server(
        lambda: AuthServer(directory, open_connections, limits),
        host, port,
        server_host_keys=[host_key],
        process_factory=sessions.handle,
        encoding=None,
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        password_auth=False,
        kbdint_auth=False,
        window=WINDOW,
        max_pktsize=MAX_PACKET,
        login_timeout=30,
        keepalive_interval=30,
        server_version="DevFlow",
    )
