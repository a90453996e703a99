"""The Router role as the daemon plays it: the built-in router in a process of its own (runtime.router.standalone).

The process outlives the daemon, as app processes do, so apps stay reachable while the daemon restarts. A
starting daemon adopts a running router that runs the same code on the same address as the same uid. A router
with other code (or as another uid) on that address hands its listening socket to a successor, which has every
route before it accepts a connection; one on another address is retired.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from runtime.router.builtin_impl import BACKLOG
from runtime.router.control import ControlClient, ControlError, code_version
from runtime.router.standalone import control_path

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
WATCH_INTERVAL = 1.0
STOP_TIMEOUT = 10.0
"""A retiring router finishes requests in flight for up to its shutdown timeout (5 s), then exits."""

Routes = dict[str, tuple[list[str], list[tuple[str, int]], int | None]]
T = TypeVar("T")


class RouterProcess:
    """`set_app` and `remove_app` return once the router process routes accordingly; a router process that
    cannot (it died, or stopped answering) is replaced first, with every route, which are mirrored here.

    Every exchange with the process runs on one control thread, one after the other in the order the calls
    start: a wedged router costs a route change up to the control timeout and a replacement, never the
    daemon's event loop.

    Under root the process runs as `uid` (None: `nobody`).
    """

    def __init__(self, host: str, port: int, run_dir: Path, log_path: Path, uid: int | None = None) -> None:
        self.host = host
        self.port = port
        self.run_dir = run_dir
        self.log_path = log_path
        self.uid = uid
        self._routes: Routes = {}
        self._client: ControlClient | None = None
        self._proc: subprocess.Popen | None = None
        self._watch: asyncio.Task[None] | None = None
        self._control = ThreadPoolExecutor(1, thread_name_prefix="router-control")
        self._closed = False

    async def start(self) -> None:
        """Adopt or start the router process. Raises OSError when the address cannot be listened on, and
        ControlError when a router process does not start."""
        await self._on_control(self._start)
        self._watch = asyncio.create_task(self._watch_process())

    async def close(self) -> None:
        """The daemon stops; the router process keeps routing until a daemon adopts it again."""
        if self._closed:
            return
        self._closed = True
        watch, self._watch = self._watch, None
        try:
            if watch is not None:  # a check under way finishes first: the client is the control thread's
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            await self._on_control(self._disconnect)
        finally:
            self._control.shutdown(wait=False)

    async def set_app(self, app: str, hostnames: Sequence[str], upstreams: Sequence[tuple[str, int]],
                      owner: int | None = None) -> None:
        await self._change(self._set, app, list(hostnames), [(str(h), int(p)) for h, p in upstreams], owner)

    async def remove_app(self, app: str) -> None:
        await self._change(self._remove, app)

    async def _change(self, fn: Callable[..., None], *args: object) -> None:
        if self._closed:
            raise ControlError("the daemon is stopping: its router takes no more changes")
        await self._on_control(fn, *args)

    async def _on_control(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the control thread. A change under way completes even when its caller is cancelled,
        as a synchronous call would: the caller then knows what the router routes."""
        done = asyncio.get_running_loop().run_in_executor(self._control, fn, *args)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.wait([done])
            if not done.cancelled() and done.exception() is not None:
                log.error("router: %s failed for a caller that was cancelled", fn.__name__,
                          exc_info=done.exception())
            raise

    # on the control thread

    def _set(self, app: str, hostnames: list[str], upstreams: list[tuple[str, int]], owner: int | None) -> None:
        self._routes[app] = (hostnames, upstreams, owner)
        self._send("set", app=app, hostnames=hostnames, upstreams=[list(a) for a in upstreams], owner=owner)

    def _remove(self, app: str) -> None:
        self._routes.pop(app, None)
        self._send("remove", app=app)

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _send(self, op: str, **fields: object) -> None:
        if self._client is None:  # a replacement failed: try again, the change must reach a router
            self._replace()
            return
        try:
            self._client.call(op, **fields)
        except ControlError:
            log.exception("router: the router process %d did not take %r; replacing it", self._client.pid, op)
            self._replace()  # the new process gets every route, this one included

    # the process

    def _start(self) -> None:
        routers = live_routers(self.run_dir)
        try:
            self._adopt_or_launch(routers)
        except BaseException:
            for client, _ in routers:  # they keep routing: better old routes than none
                if client is not self._client:
                    client.close()
            raise
        for client, _ in routers:
            if client is not self._client:
                retire(client)

    def _adopt_or_launch(self, routers: list[tuple[ControlClient, dict]]) -> None:
        address = resolve(self.host, self.port)
        hellos = dict(routers)
        keep = next((client for client, hello in routers
                     if _adoptable(hello, address) and (self.uid is None or _runs_as(client.pid) == self.uid)), None)
        if keep is not None:
            self._client, self._routes = keep, _mirror(hellos[keep])
            self.port = hellos[keep]["listening"][1]
            log.info("router: adopted the router process %d on %s:%d", keep.pid, self.host, self.port)
            return
        predecessor = next((c for c, hello in routers if hello["listening"] == list(address)), None)
        if predecessor is not None:
            # Other code on this address: the successor takes over the very socket, and the routes.
            _, fd = predecessor.call("handover", expect_fd=True)
            sock = socket.socket(fileno=fd)
            self._routes = _mirror(hellos[predecessor])
        else:
            sock = self._bind_retiring(routers)
        with sock:
            self._launch(sock)
        log.info("router: started the router process %d on %s:%d", self._client.pid, self.host, self.port)

    def _bind_retiring(self, routers: list[tuple[ControlClient, dict]]) -> socket.socket:
        """A new listening socket; routers on another address are retired only if they hold the port."""
        try:
            return listening_socket(self.host, self.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not routers:
                raise
        for client, _ in routers:
            retire(client)
        routers.clear()
        return listening_socket(self.host, self.port)

    def _launch(self, sock: socket.socket) -> None:
        """A new router process: it gets the routes first, then the socket to accept on."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "runtime.router.standalone", str(self.run_dir)]
        with self.log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [*argv, str(self.uid)] if self.uid is not None else argv,
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True, cwd="/",
                env={"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        client = None
        try:
            client = self._connect(proc)
            for app, (hostnames, upstreams, owner) in self._routes.items():
                client.call("set", app=app, hostnames=hostnames, upstreams=[list(a) for a in upstreams], owner=owner)
            reply, _ = client.call("listen", fd=sock.fileno())
        except BaseException:
            if client is not None:
                client.close()
            proc.kill()
            proc.wait()
            raise
        if self._client is not None:
            self._client.close()
        self._client, self._proc, self.port = client, proc, reply["port"]

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
            try:
                client.call("hello")
            except ControlError:
                client.close()
                raise
            return client
        raise ControlError(f"the router process did not start within {START_TIMEOUT:g}s; see {self.log_path}")

    def _replace(self) -> None:
        """Kill the router process (dead, wedged or deaf) and start another with every route."""
        if self._client is not None:
            pid = self._client.pid
            self._client.close()
            self._client = None
            _kill(pid)
        if self._proc is not None:
            self._proc.wait(STOP_TIMEOUT)  # reap our own child
            self._proc = None
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:  # the killed process's listening socket can outlive it by a moment
            try:
                sock = listening_socket(self.host, self.port)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with sock:
            self._launch(sock)
        log.info("router: the router process %d replaces the one that failed", self._client.pid)

    async def _watch_process(self) -> None:
        """Replace a router process that died or stopped answering."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self._on_control(self._check)
            except Exception:  # the watcher must outlive any one failure
                log.exception("router: could not replace the router process; trying again")

    def _check(self) -> None:
        if self._client is None:
            self._replace()
            return
        try:
            self._client.call("ping")
        except ControlError:
            log.error("router: the router process %d is gone or does not answer; replacing it (see %s)",
                      self._client.pid, self.log_path)
            self._replace()


def _adoptable(hello: dict, address: tuple[str, int]) -> bool:
    listening = hello["listening"]
    return (hello["version"] == code_version() and listening is not None and listening[0] == address[0]
            and (address[1] == 0 or listening[1] == address[1]))


def _runs_as(pid: int) -> int | None:
    """The one uid a process runs as (real, effective, saved and filesystem alike), else None."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    uids = set(next((line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")), []))
    return int(uids.pop()) if len(uids) == 1 else None


def _mirror(hello: dict) -> Routes:
    return {app: (r["hostnames"], [(h, p) for h, p in r["upstreams"]], r.get("owner"))
            for app, r in hello["routes"].items()}


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def resolve(host: str, port: int) -> tuple[str, int]:
    """The address a listening socket for `host` reports (`localhost` is 127.0.0.1), to compare with a router's."""
    *_, address = socket.getaddrinfo(host, port, _family(host), socket.SOCK_STREAM)[0]
    return address[0], port


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def live_routers(run_dir: Path) -> list[tuple[ControlClient, dict]]:
    """The router processes of this run dir, each with its hello. A socket nobody listens on is removed; a
    router that does not answer is killed, as it would hold its port and routes forever."""
    found = []
    for path in sorted(run_dir.glob("router-*.sock")):
        try:
            client = ControlClient(path)
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            continue
        except OSError as exc:
            log.warning("router: cannot reach the router process at %s: %s", path, exc)
            continue
        try:
            hello, _ = client.call("hello")
        except ControlError:
            log.error("router: the router process %d does not answer; killing it", client.pid)
            client.close()
            _kill(client.pid)
            path.unlink(missing_ok=True)
            continue
        found.append((client, hello))
    return found


def retire(client: ControlClient) -> None:
    """Ask a router process to finish its requests in flight and exit; wait for it, kill it past the timeout."""
    pid = client.pid
    try:
        client.call("retire")
    except ControlError:
        pass
    finally:
        client.close()
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _exited(pid):
            return
        time.sleep(0.05)
    _kill(pid)


def _kill(pid: int) -> None:
    """SIGKILL, and wait until the process has let go of its sockets (a zombie has)."""
    if not running(pid):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _exited(pid: int) -> bool:
    """Gone or a zombie: past closing its files (its command line empties earlier, before that)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def running(pid: int) -> bool:
    """A router process runs under `pid` (its command line says so: not a zombie, not a reused pid)."""
    try:
        return b"runtime.router.standalone" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_routers(run_dir: Path) -> int:
    """Stop every router process of this run dir (`devflow stop-apps`); returns how many there were."""
    routers = live_routers(run_dir)
    for client, _ in routers:
        retire(client)
    return len(routers)
