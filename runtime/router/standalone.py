"""The built-in router in a process of its own: `python -m runtime.router.standalone RUN_DIR`.

The daemon starts it and drives it over a control socket (runtime.router.control). Apart from the daemon,
it keeps routing while the daemon restarts or is upgraded, no daemon work (a build, a git pack, an API call)
holds up a request, and the code that parses requests from the network runs as `nobody`, not root.

It never binds: the daemon hands it a listening socket, its own or the previous router's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pwd
import signal
import socket
import sys
import threading
from pathlib import Path

from runtime.router.builtin_impl import BuiltinRouter
from runtime.router.control import Channel, code_version

log = logging.getLogger("runtime.router")

UNPRIVILEGED = "nobody"


def control_path(run_dir: Path, pid: int) -> Path:
    return run_dir / f"router-{pid}.sock"


class RouterService:
    """Answers control requests (on its own threads) by acting on the router (on the loop)."""

    def __init__(self, router: BuiltinRouter, loop: asyncio.AbstractEventLoop, version: str) -> None:
        self.router = router
        self.loop = loop
        self.version = version
        self.retired = asyncio.Event()
        self._listening = False

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._converse, args=(Channel(conn),), daemon=True).start()

    def _converse(self, channel: Channel) -> None:
        try:
            while True:
                message, fd = channel.receive()
                try:
                    reply, reply_fd = self._handle(message, fd)
                except Exception as exc:  # any failure is the requester's to report
                    log.exception("router: control request %r failed", message.get("op"))
                    reply, reply_fd = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, None
                channel.send(reply, reply_fd)
        except (OSError, ValueError):
            pass  # the daemon went away: it reconnects when it starts again
        finally:
            channel.close()

    def _handle(self, message: dict, fd: int | None) -> tuple[dict, int | None]:
        op = message.get("op")
        if op == "hello":
            routes = {app: {"hostnames": list(hosts), "upstreams": [list(a) for a in upstreams]}
                      for app, (hosts, upstreams) in self.router.routes().items()}
            address = [self.router.host, self.router.port] if self._listening else None
            return {"ok": True, "version": self.version, "pid": os.getpid(), "listening": address,
                    "routes": routes}, None
        if op == "set":
            self.router.set_app(str(message["app"]), [str(h) for h in message["hostnames"]],
                                [(str(h), int(p)) for h, p in message["upstreams"]])
            return {"ok": True}, None
        if op == "remove":
            self.router.remove_app(str(message["app"]))
            return {"ok": True}, None
        if op == "listen":
            if fd is None:
                return {"ok": False, "error": "listen needs a listening socket beside the request"}, None
            sock = socket.socket(fileno=fd)
            asyncio.run_coroutine_threadsafe(self.router.start(sock), self.loop).result()
            self._listening = True
            return {"ok": True, "port": self.router.port}, None
        if op == "handover":
            return {"ok": True}, self.router.listening_fd()
        if op == "retire":
            self.loop.call_soon_threadsafe(self.retired.set)
            return {"ok": True}, None
        return {"ok": False, "error": f"unknown request {op!r}"}, None


def drop_privileges() -> None:
    """Root only: the router needs no privilege once it has its sockets."""
    if os.getuid() != 0:
        return
    try:
        user = pwd.getpwnam(UNPRIVILEGED)
        uid, gid = user.pw_uid, user.pw_gid
    except KeyError:
        uid = gid = 65534
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


async def run(run_dir: Path) -> None:
    path = control_path(run_dir, os.getpid())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # only the daemon's user may connect
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen()
    version = code_version()  # while the source is readable: a private checkout is not, to nobody
    drop_privileges()
    router = BuiltinRouter("", 0)
    service = RouterService(router, asyncio.get_running_loop(), version)
    threading.Thread(target=service.serve, args=(listener,), name="control", daemon=True).start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, service.retired.set)
    gc.freeze()  # what is loaded now lives as long as the process: collections need not walk it
    await service.retired.wait()
    log.info("router %d retiring: in-flight requests finish, then it exits", os.getpid())
    await router.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m runtime.router.standalone RUN_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router[%(process)d] %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(Path(argv[0])))
    else:
        uvloop.run(run(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
