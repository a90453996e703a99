"""The built-in router in a process of its own: `python -m runtime.router.standalone RUN_DIR [UID]`.

The daemon starts it and drives it over a control socket (runtime.router.control). Apart from the daemon,
it keeps routing while the daemon restarts or is upgraded, no daemon work (a build, a git pack, an API call)
holds up a request, and the code that parses requests from the network does not run as root: started by
root, it switches to UID (by default `nobody`) once its control socket exists.

It never binds: the daemon hands it a listening socket, its own or the previous router's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from runtime.local.app_user import nobody_uid
from runtime.router.builtin_impl import BuiltinRouter
from runtime.router.control import Channel, code_version

log = logging.getLogger("runtime.router")


def control_path(run_dir: Path, pid: int) -> Path:
    return run_dir / f"router-{pid}.sock"


class RouterService:
    """Answers control requests (on its own threads) by acting on the router (on the loop)."""

    def __init__(self, router: BuiltinRouter, loop: asyncio.AbstractEventLoop, version: str) -> None:
        self.router = router
        self.loop = loop
        self.version = version
        self.retired = asyncio.Event()

    def serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # out of descriptors, say: the daemon tries again
                log.exception("router: cannot accept a control connection")
                time.sleep(0.1)
                continue
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
                finally:
                    if fd is not None and message.get("op") != "listen":  # listen's socket owns its fd
                        os.close(fd)
                try:
                    channel.send(reply, reply_fd)
                finally:
                    if reply_fd is not None:
                        os.close(reply_fd)
        except (OSError, ValueError):
            pass  # the daemon went away: it reconnects when it starts again
        finally:
            channel.close()

    def _handle(self, message: dict, fd: int | None) -> tuple[dict, int | None]:
        op = message.get("op")
        if op == "ping":
            return {"ok": True}, None
        if op == "hello":
            routes = {app: {"hostnames": list(hosts), "upstreams": [list(a) for a in upstreams], "owner": owner}
                      for app, (hosts, upstreams, owner) in self.router.routes().items()}
            address = [self.router.host, self.router.port] if self.router.listening else None
            return {"ok": True, "version": self.version, "pid": os.getpid(), "listening": address,
                    "routes": routes}, None
        if op == "set":
            owner = message.get("owner")
            self.router.set_app(str(message["app"]), [str(h) for h in message["hostnames"]],
                                [(str(h), int(p)) for h, p in message["upstreams"]],
                                int(owner) if owner is not None else None)
            return {"ok": True}, None
        if op == "remove":
            self.router.remove_app(str(message["app"]))
            return {"ok": True}, None
        if op == "listen":
            if fd is None:
                return {"ok": False, "error": "listen needs a listening socket beside the request"}, None
            sock = socket.socket(fileno=fd)
            asyncio.run_coroutine_threadsafe(self.router.start(sock), self.loop).result()
            return {"ok": True, "port": self.router.port}, None
        if op == "handover":
            # A copy made on the loop, where the server may close: never a number reused meanwhile.
            dup = asyncio.run_coroutine_threadsafe(self._listening_copy(), self.loop).result()
            return {"ok": True}, dup
        if op == "retire":
            self.loop.call_soon_threadsafe(self.retired.set)
            return {"ok": True}, None
        return {"ok": False, "error": f"unknown request {op!r}"}, None

    async def _listening_copy(self) -> int:
        if self.retired.is_set():
            raise RuntimeError("this router is retiring")
        return os.dup(self.router.listening_fd())


def drop_privileges(uid: int | None) -> None:
    """Root only: the router needs no privilege once it has its sockets."""
    if os.getuid() != 0:
        return
    if uid is None:
        uid = nobody_uid()
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


async def run(run_dir: Path, uid: int | None) -> None:
    path = control_path(run_dir, os.getpid())
    path.unlink(missing_ok=True)  # left by a process that had this pid before
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # only the daemon's user may connect
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen()
    version = code_version()  # while the source is readable: a private checkout is not, to nobody
    drop_privileges(uid)
    router = BuiltinRouter("", 0)
    service = RouterService(router, asyncio.get_running_loop(), version)
    threading.Thread(target=service.serve, args=(listener,), name="control", daemon=True).start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, service.retired.set)
    gc.freeze()  # what is loaded now lives as long as the process: collections need not walk it
    await service.retired.wait()
    log.info("router %d retiring: in-flight requests finish, then it exits", os.getpid())
    await router.close()


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].isdigit()):
        print("usage: python -m runtime.router.standalone RUN_DIR [UID]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router[%(process)d] %(levelname)s %(message)s")
    main_coro = run(Path(argv[0]), int(argv[1]) if len(argv) == 2 else None)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
