"""The composition root: builds every part, hands each its dependencies, runs the servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from gitd import __version__
from gitd.apps import AppRegistry
from gitd.database import open_state
from gitd.git.git_service import GitService
from gitd.git.hook_server import HookServer
from gitd.git.hooks_dir import write_hooks
from gitd.git.pack_backend import PackLimits, choose_backend
from gitd.git.push_gate import PushGate
from gitd.git.push_sessions import PushSessions
from gitd.git.repositories import Repositories
from gitd.http.app import build_app
from gitd.http.status_page import ServiceInfo
from gitd.identity.directory import Directory
from gitd.identity.public_keys import fingerprint_of
from gitd.identity.roles import Actor
from gitd.management import Management
from gitd.settings import Settings
from gitd.ssh.server import load_or_create_host_key, start_ssh_server
from gitd.ssh.session import SessionHandler
from receivers.push_receiver import PushReceiver

log = logging.getLogger(__name__)

UNIX_PATH_MAX = 100


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: the daemon, not uvicorn, owns the signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def hook_socket_path(settings: Settings) -> Path:
    path = settings.run_dir / "hooks.sock"
    if len(str(path)) <= UNIX_PATH_MAX:
        return path
    # Unix socket paths are limited to ~108 bytes; deep data dirs get a private short one.
    digest = hashlib.sha256(str(settings.data_dir).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"devflow-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / "hooks.sock"


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"devflow: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        for path in (settings.data_dir, settings.repos_dir, settings.run_dir):
            path.mkdir(parents=True, exist_ok=True)
        settings.data_dir.chmod(0o700)
        sessions = open_state(settings.state_url)
        self.directory = Directory(sessions)
        self.apps = AppRegistry(sessions, Repositories(settings.repos_dir))
        self.backend = choose_backend(
            settings.git_backend,
            PackLimits(hooks_dir=write_hooks(settings.data_dir / "hooks"), max_push_bytes=settings.max_push_bytes),
        )
        self.receiver = PushReceiver()
        push_sessions = PushSessions()
        self.hooks = HookServer(hook_socket_path(settings), push_sessions, PushGate(self.apps, self.backend, self.receiver))
        self.git = GitService(self.apps, self.backend, push_sessions, self.hooks.socket_path)
        self.host_key = load_or_create_host_key(settings.host_key_path)
        self._stop = asyncio.Event()

    def management_for(self, actor: Actor) -> Management:
        return Management(self.directory, self.apps, actor)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        http_sock = bind(s.host, s.http_port)
        http_port = http_sock.getsockname()[1]
        await self.hooks.start()
        ssh = await start_ssh_server(
            s.host, s.ssh_port, self.host_key, self.directory, SessionHandler(self.git, self.management_for),
        )
        ssh_port = ssh.sockets[0].getsockname()[1]
        info = ServiceInfo(
            version=__version__, host=s.host, ssh_port=ssh_port, http_url=f"http://{s.host}:{http_port}",
            host_key_fingerprint=fingerprint_of(self.host_key), git_backend=self.backend.name,
        )
        app = build_app(info, self.directory, self.git, self.management_for)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=10)
        http = _EmbeddedUvicorn(config)
        http_task = asyncio.create_task(http.serve(sockets=[http_sock]))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        print(
            f"DevFlow {__version__} serving\n"
            f"  SSH   ssh://git@{s.host}:{ssh_port}/APP.git  (host key {info.host_key_fingerprint})\n"
            f"  HTTP  {info.http_url}  (smart git, /api, status page)\n"
            f"  data  {s.data_dir}  (git backend: {self.backend.name})",
            flush=True,
        )
        await self._stop.wait()
        log.info("shutting down")
        ssh.close()
        http.should_exit = True
        await http_task
        await ssh.wait_closed()
        await self.hooks.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("DevFlow stopped", flush=True)


def serve(settings: Settings) -> None:
    async def main() -> None:
        await Daemon(settings).run()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
