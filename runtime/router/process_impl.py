"""The Router role as the daemon plays it: the built-in router in a process of its own (runtime.router.standalone).

The process outlives the daemon, as app processes do, so apps stay reachable while the daemon restarts. A
starting daemon adopts a running router that runs the same code on the same address; any other it replaces,
handing the listening socket itself to the successor, which has the routes before it accepts a connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from runtime.router.builtin_impl import BACKLOG
from runtime.router.control import ControlClient, ControlError, code_version
from runtime.router.standalone import control_path

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
WATCH_INTERVAL = 1.0
STOP_TIMEOUT = 10.0
"""A retiring router finishes requests in flight for up to its shutdown timeout (5 s), then exits."""

Routes = dict[str, tuple[list[str], list[tuple[str, int]]]]


class RouterProcess:
    """`set_app` and `remove_app` return once the router process routes accordingly.

    The routes are mirrored here, so a router process that dies is replaced with all of them.
    """

    def __init__(self, host: str, port: int, run_dir: Path, log_path: Path) -> None:
        self.host = host
        self.port = port
        self.run_dir = run_dir
        self.log_path = log_path
        self._routes: Routes = {}
        self._client: ControlClient | None = None
        self._proc: subprocess.Popen | None = None
        self._pid = 0
        self._watch: asyncio.Task[None] | None = None
        self._changing = threading.Lock()  # a change waits while a new process gets the routes

    async def start(self) -> None:
        """Adopt or start the router process. Raises OSError when the address cannot be listened on."""
        await asyncio.to_thread(self._start)
        self._watch = asyncio.create_task(self._watch_process())

    async def close(self) -> None:
        """The daemon stops; the router process keeps routing until a daemon adopts it again."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def set_app(self, app: str, hostnames: Sequence[str], upstreams: Sequence[tuple[str, int]]) -> None:
        with self._changing:
            self._routes[app] = (list(hostnames), [(str(h), int(p)) for h, p in upstreams])
            self._send("set", app=app, hostnames=list(hostnames), upstreams=[list(a) for a in upstreams])

    def remove_app(self, app: str) -> None:
        with self._changing:
            self._routes.pop(app, None)
            self._send("remove", app=app)

    def _send(self, op: str, **fields: object) -> None:
        if self._client is None:
            return
        try:
            self._client.call(op, **fields)
        except ControlError:
            # The watcher replaces the process with every route, this one included.
            log.exception("router: %s did not reach the router process %d", op, self._pid)

    # the process

    def _start(self) -> None:
        routers = live_routers(self.run_dir)
        address = resolve(self.host, self.port)
        keep = next((entry for entry in routers if _adoptable(entry[1], address)), None)
        if keep is not None:
            self._client, hello = keep
            self._pid, self.port = hello["pid"], hello["listening"][1]
            self._routes = _mirror(hello)
            log.info("router: adopted the router process %d on %s:%d", self._pid, self.host, self.port)
        else:
            predecessor = next((e for e in routers if e[1]["listening"] == list(address)), None)
            if predecessor is not None:
                # Other code on the same address: the successor takes over the very socket, and the routes.
                _, fd = predecessor[0].call("handover")
                sock = socket.socket(fileno=fd)
                self._routes = _mirror(predecessor[1])
            else:
                for client, hello in routers:  # another address: they may hold the port wanted now
                    retire(client, hello["pid"])
                routers = []
                sock = listening_socket(*address)
            try:
                with self._changing:
                    self._launch(sock)
            finally:
                sock.close()
            log.info("router: started the router process %d on %s:%d", self._pid, self.host, self.port)
        for client, hello in routers:
            if client is not self._client:
                retire(client, hello["pid"])

    def _launch(self, sock: socket.socket) -> None:
        """A new router process: it gets the routes first, then the socket to accept on."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.router.standalone", str(self.run_dir)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True, cwd="/",
                env={"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        try:
            client = self._connect(proc)
            for app, (hostnames, upstreams) in list(self._routes.items()):
                client.call("set", app=app, hostnames=hostnames, upstreams=[list(a) for a in upstreams])
            reply, _ = client.call("listen", fd=sock.fileno())
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if self._client is not None:
            self._client.close()
        self._client, self._proc, self._pid, self.port = client, proc, proc.pid, reply["port"]

    def _connect(self, proc: subprocess.Popen) -> ControlClient:
        path = control_path(self.run_dir, proc.pid)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ControlError(f"the router process exited with status {proc.returncode}; see {self.log_path}")
            try:
                client = ControlClient(path)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
                continue
            client.call("hello")
            return client
        raise ControlError(f"the router process did not start within {START_TIMEOUT:g}s; see {self.log_path}")

    async def _watch_process(self) -> None:
        """Replace a router process that died, with every route and a fresh socket."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self._alive():
                continue
            log.error("router: the router process %d died; starting another (see %s)", self._pid, self.log_path)
            try:
                await asyncio.to_thread(self._relaunch)
            except (OSError, ControlError):
                log.exception("router: could not start another router process; trying again")

    def _relaunch(self) -> None:
        sock = listening_socket(self.host, self.port)
        try:
            with self._changing:
                self._launch(sock)
        finally:
            sock.close()

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return running(self._pid)


def _adoptable(hello: dict, address: tuple[str, int]) -> bool:
    listening = hello["listening"]
    return (hello["version"] == code_version() and listening is not None and listening[0] == address[0]
            and (address[1] == 0 or listening[1] == address[1]))


def _mirror(hello: dict) -> Routes:
    return {app: (r["hostnames"], [(h, p) for h, p in r["upstreams"]]) for app, r in hello["routes"].items()}


def resolve(host: str, port: int) -> tuple[str, int]:
    """The address a socket for `host` reports (`localhost` is 127.0.0.1), to compare with a router's."""
    *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return address[0], port


def running(pid: int) -> bool:
    """A router process runs under `pid` (its command line says so: not a zombie, not a reused pid)."""
    try:
        return b"runtime.router.standalone" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def live_routers(run_dir: Path) -> list[tuple[ControlClient, dict]]:
    """The router processes that answer, each with its hello; sockets nobody answers on are removed."""
    found = []
    for path in sorted(run_dir.glob("router-*.sock")):
        try:
            client = ControlClient(path)
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            continue
        except OSError:
            continue
        try:
            hello, _ = client.call("hello")
        except ControlError:
            client.close()
            continue
        found.append((client, hello))
    return found


def retire(client: ControlClient, pid: int) -> None:
    """Ask a router process to finish its requests in flight and exit; wait for it, kill it past the timeout."""
    try:
        client.call("retire")
    except ControlError:
        pass
    finally:
        client.close()
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not running(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_routers(run_dir: Path) -> int:
    """Stop every router process of this data dir (`devflow stop-apps`); returns how many there were."""
    routers = live_routers(run_dir)
    for client, hello in routers:
        retire(client, hello["pid"])
    return len(routers)
