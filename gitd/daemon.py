"""The composition root: builds every part, hands each its dependencies, runs the servers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import resource
import signal
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import uvicorn

from gitd import __version__
from gitd.apps import AppRegistry
from gitd.commands.command_threads import CommandThreads
from gitd.data_dir_lock import DataDirLock
from gitd.database import open_state
from gitd.deploy_management import DeployServices
from gitd.git.git_service import GitService
from gitd.git.hook_server import HookServer
from gitd.git.hooks_dir import write_hooks
from gitd.git.pack_backend import PackLimits, choose_backend
from gitd.git.push_gate import PushGate
from gitd.git.push_sessions import PushSessions
from gitd.git.repositories import Repositories
from gitd.http.app import build_app
from gitd.http.bounded_protocol import BoundedHttpToolsProtocol
from gitd.http.status_page import ServiceInfo
from gitd.identity.directory import Directory
from gitd.identity.public_keys import fingerprint_of
from gitd.identity.roles import Actor
from gitd.log_followers import LogFollowers
from gitd.management import Management
from gitd.remote_urls import RemoteUrls
from gitd.settings import Settings
from gitd.ssh.server import load_or_create_host_key, start_ssh_server
from gitd.ssh.session import SessionHandler
from pipeline import MIGRATIONS as PIPELINE_MIGRATIONS
from pipeline.app_uids import AppUids
from pipeline.builders.native_impl import NativeBuilder
from pipeline.config_vars import ConfigVars
from pipeline.deploy_settings import DeploySettings
from pipeline.deployments import Deployments
from pipeline.host_uids import HostUids, HostUidsError
from pipeline.release_env import Platform
from pipeline.release_ledger import ReleaseLedger
from receivers.deploys import DeployOnPush
from receivers.push_receiver import PushReceiver
from runtime.local.app_user import app_users
from runtime.local.cgroups import Cgroups
from runtime.local.scheduler import LocalScheduler
from runtime.local.unit_bounds import UnitBounds
from runtime.process_logs import ProcessLogs
from runtime.rollout import Rollout
from runtime.router.control import ControlError
from runtime.router.process_impl import RouterProcess, listening_socket

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
    info = short.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
        # Someone else made it first: a socket there could answer our hooks. Use a fresh private one.
        short = Path(tempfile.mkdtemp(prefix="devflow-"))
    return short / "hooks.sock"


def known_hosts_line(host: str, port: int, key: asyncssh.SSHKey) -> str:
    """What OpenSSH writes to known_hosts once the user accepts this host key: `[host]:port type base64`."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {' '.join(key.export_public_key('openssh').decode().split()[:2])}"


def cannot_listen(host: str, port: int, exc: OSError) -> SystemExit:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return SystemExit(f"devflow: cannot listen on {host}:{port}: {reason}")


def bind(host: str, port: int) -> socket.socket:
    try:
        return listening_socket(host, port)
    except OSError as exc:
        raise cannot_listen(host, port, exc) from None


def keep_private(db: Path) -> None:
    """The SQLite state (users, keys, tokens, app config) is owner-only in a data dir others may traverse.

    SQLite creates the -wal and -shm files with the database file's mode, so fixing the main file suffices
    for new ones; existing ones are fixed too.
    """
    db.touch(mode=0o600, exist_ok=True)
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists():
            path.chmod(0o600)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = settings.limits()
        # Any app user will do to check the apps directory is reachable: none of them owns its parents.
        probe = app_users(settings.app_user, lambda app: settings.app_uid_base)
        self.apps_root = settings.apps_root(lambda path: probe is None or probe("").can_search(str(path)))
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.lock = DataDirLock(settings.data_dir)
        self.lock.acquire()
        for path in (settings.repos_dir, settings.run_dir, self.apps_root, settings.logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        if settings.database_url is None:
            keep_private(settings.data_dir / "state.db")
        # Others may only traverse the data dir: the app user reads its app's build, nothing else.
        settings.data_dir.chmod(0o711)
        for private in (settings.repos_dir, settings.run_dir, settings.logs_dir):
            private.chmod(0o700)
        self.apps_root.chmod(0o711)
        sessions = open_state(settings.state_url, PIPELINE_MIGRATIONS)
        # Under root every app and the router run as a uid no other DevFlow on this host has.
        try:
            host_uids = HostUids.open(settings.uids_dir, settings.data_dir) if os.getuid() == 0 else None
            uids = AppUids(sessions, settings.app_uid_base, host_uids)
            uids.claim_recorded(settings.reassign_uids)
            router_uid = uids.router_uid()
        except HostUidsError as exc:
            raise SystemExit(f"devflow: {exc}") from None
        users = app_users(settings.app_user, uids.uid_for)
        self.directory = Directory(sessions, self.limits)
        self.apps = AppRegistry(sessions, Repositories(settings.repos_dir), self.limits)
        self.backend = choose_backend(
            settings.git_backend,
            PackLimits(hooks_dir=write_hooks(settings.data_dir / "hooks"), max_push_bytes=self.limits.max_push_bytes),
        )
        self.receiver = PushReceiver()
        # A uid of its own under root, not one any app runs as, so none can signal it.
        self.router = RouterProcess(settings.host, settings.router_port, settings.run_dir,
                                    settings.logs_dir / "router.log", uid=router_uid)
        logs = ProcessLogs(settings.logs_dir, self.limits.log_max_bytes)
        bounds = UnitBounds(self.limits.max_process_memory, self.limits.max_build_memory, self.limits.max_pids_per_app)
        scheduler = LocalScheduler(settings.run_dir / "processes", logs, users=users, cgroups=Cgroups(),
                                   shims=self.apps_root / ".platform" / "bin", bounds=bounds)
        self.rollout = Rollout(scheduler, self.router, logs)
        deploy_settings = DeploySettings(sessions)
        self.deployments = Deployments(
            sessions, ReleaseLedger(sessions), ConfigVars(sessions), deploy_settings,
            NativeBuilder(settings.extra_ca_certs, limits=self.limits),
            self.rollout, scheduler, logs,
            self.apps_root, Platform(settings.domain, settings.router_port), uids, self.limits,
            max_builds=settings.max_concurrent_builds,
        )
        remote_urls = RemoteUrls(self.apps, settings.host, settings.ssh_port, settings.http_port)
        self.receiver.subscribe(DeployOnPush(self.deployments, deploy_settings, remote_urls.for_user))
        self.deploy_services = DeployServices(self.deployments, self._run_on_loop, LogFollowers(self.limits))
        self.commands = CommandThreads(self.limits)
        self._loop: asyncio.AbstractEventLoop | None = None
        push_sessions = PushSessions()
        gate = PushGate(self.apps, self.backend, self.receiver)
        self.hooks = HookServer(hook_socket_path(settings), push_sessions, gate)
        self.git = GitService(self.apps, self.backend, push_sessions, self.hooks.socket_path)
        self.host_key = load_or_create_host_key(settings.host_key_path)
        self._stop = asyncio.Event()

    def management_for(self, actor: Actor) -> Management:
        return Management(self.directory, self.apps, actor, self.deploy_services)

    def _run_on_loop(self, coroutine):
        """For management calls in worker threads: run a pipeline coroutine on the daemon's loop."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        http_sock = bind(s.host, s.http_port)
        http_port = http_sock.getsockname()[1]
        try:
            await self.router.start()
        except OSError as exc:
            raise cannot_listen(s.host, s.router_port, exc) from None
        except ControlError as exc:
            raise SystemExit(f"devflow: the router did not start: {exc}") from None
        # Apps first: by the time the daemon answers, every app is routed again.
        await self.deployments.restore()
        await self.hooks.start()
        try:
            sessions = SessionHandler(self.git, self.directory, self.management_for, self.limits, self.commands)
            ssh = await start_ssh_server(s.host, s.ssh_port, self.host_key, self.directory, sessions, self.limits)
        except OSError as exc:
            raise cannot_listen(s.host, s.ssh_port, exc) from None
        ssh_port = ssh.sockets[0].getsockname()[1]
        info = ServiceInfo(
            version=__version__, host=s.host, ssh_port=ssh_port, http_url=f"http://{s.host}:{http_port}",
            host_key_fingerprint=fingerprint_of(self.host_key), git_backend=self.backend.name,
            known_hosts_line=known_hosts_line(s.host, ssh_port, self.host_key),
        )
        app = build_app(info, self.directory, self.git, self.management_for, self.limits, self.commands)
        config = uvicorn.Config(app, http=functools.partial(BoundedHttpToolsProtocol, limits=self.limits),
                                log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=10)
        http = _EmbeddedUvicorn(config)
        http_task = asyncio.create_task(http.serve(sockets=[http_sock]))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        print(
            f"DevFlow {__version__} serving\n"
            f"  SSH   ssh://git@{s.host}:{ssh_port}/APP.git  (host key {info.host_key_fingerprint})\n"
            f"        ~/.ssh/known_hosts line: {info.known_hosts_line}\n"
            f"  HTTP  {info.http_url}  (smart git, /api, status page)\n"
            f"  apps  http://APP.{s.domain}:{self.router.port}  (router)\n"
            f"  data  {s.data_dir}  (git backend: {self.backend.name}; builds in {self.apps_root})",
            flush=True,
        )
        await self._stop.wait()
        log.info("shutting down; app processes and the router keep running, re-adopted at the next start")
        ssh.close()
        http.should_exit = True
        await http_task
        await ssh.wait_closed()
        await self.hooks.close()
        await self.rollout.close()
        await self.router.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("DevFlow stopped", flush=True)


def open_files_as_allowed() -> None:
    """Every HTTP and SSH connection, pack exchange and log costs descriptors: take what the hard limit allows
    (max_http_connections bounds the HTTP side), not the 1024 a login shell hands down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def serve(settings: Settings) -> None:
    open_files_as_allowed()

    async def main() -> None:
        daemon = Daemon(settings)
        try:
            await daemon.run()
        finally:
            daemon.lock.release()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
