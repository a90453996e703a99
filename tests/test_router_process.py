"""The router process the daemon runs: adopted across daemon restarts, replaced by new code without a refused
connection, brought back when it dies, and unprivileged under root. Real processes, real sockets, httpx."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from conftest import free_port

from runtime.local.scheduler import LocalScheduler
from runtime.process_logs import ProcessLogs
from runtime.rollout import ReleaseSpec, Rollout
from runtime.router import process_impl
from runtime.router.process_impl import RouterProcess, live_routers, running, stop_routers

WAIT = 20
T = TypeVar("T")


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Daemonless:
    """An event loop thread standing in for the daemon's, on which RouterProcess instances live and die."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="daemon-loop")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def app() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(WAIT)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Daemonless, Path, int]]:
    loop = Daemonless()
    run_dir = tmp_path / "run"
    yield loop, run_dir, free_port()
    stop_routers(run_dir)
    loop.stop()


def routed(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "hello.localhost"}, timeout=WAIT)


def pids(run_dir: Path) -> list[int]:
    routers = live_routers(run_dir)
    for client, _ in routers:
        client.close()
    return [client.pid for client, _ in routers]


def freeze(pid: int) -> None:
    """SIGSTOP, and wait until every thread has stopped: the kernel wakes one thread to stop the group, and
    until that one runs, another can still answer a control request."""
    os.kill(pid, signal.SIGSTOP)
    states: list[str] = []
    for _ in range(WAIT * 100):
        states = [(task / "stat").read_text().rpartition(")")[2].split()[0]
                  for task in Path(f"/proc/{pid}/task").iterdir()]
        if all(state == "T" for state in states):
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"the router process {pid} did not stop: its threads are {states}")


def start(loop: Daemonless, run_dir: Path, port: int) -> RouterProcess:
    router = RouterProcess("127.0.0.1", port, run_dir, run_dir.parent / "router.log")
    loop.run(router.start())
    return router


def test_a_restarted_daemon_adopts_the_router_with_its_routes(setup, app: int) -> None:
    loop, run_dir, port = setup
    first = start(loop, run_dir, port)
    loop.run(first.set_app("hello", ["hello.localhost"], [("127.0.0.1", app)]))
    [pid] = pids(run_dir)
    loop.run(first.close())  # the daemon stops: the router keeps routing
    assert routed(port).text == "hello"
    second = start(loop, run_dir, port)
    assert pids(run_dir) == [pid]
    assert routed(port).text == "hello"
    loop.run(second.remove_app("hello"))
    assert routed(port).status_code == 404
    loop.run(second.close())


def test_new_router_code_takes_over_the_socket_without_failing_a_request(setup, app: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    loop, run_dir, port = setup
    first = start(loop, run_dir, port)
    loop.run(first.set_app("hello", ["hello.localhost"], [("127.0.0.1", app)]))
    [old] = pids(run_dir)
    loop.run(first.close())
    failures: list[str] = []
    done = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=WAIT) as client:
            for _ in range(20000):
                if done.is_set():
                    return
                try:  # a new connection each time: the listening socket is what changes hands
                    response = client.get(f"http://127.0.0.1:{port}/", headers={"Host": "hello.localhost",
                                                                                  "Connection": "close"})
                    if response.status_code != 200:
                        failures.append(f"HTTP {response.status_code}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        # As after an upgrade: the daemon's router code differs from the running process's.
        monkeypatch.setattr(process_impl, "code_version", lambda: "an upgrade")
        second = start(loop, run_dir, port)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    [new] = pids(run_dir)
    assert new != old and not running(old)
    assert failures == [], failures[:5]
    assert routed(port).text == "hello"
    loop.run(second.close())


def test_a_router_that_dies_is_replaced_with_every_route(setup, app: int) -> None:
    loop, run_dir, port = setup
    router = start(loop, run_dir, port)
    loop.run(router.set_app("hello", ["hello.localhost"], [("127.0.0.1", app)]))
    [pid] = pids(run_dir)
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):  # the watcher looks every second
        if (found := pids(run_dir)) and found != [pid]:
            break
        threading.Event().wait(0.1)
    assert found and found != [pid]
    assert routed(port).text == "hello"
    loop.run(router.close())


def test_a_wedged_router_is_replaced(setup, app: int) -> None:
    loop, run_dir, port = setup
    router = start(loop, run_dir, port)
    loop.run(router.set_app("hello", ["hello.localhost"], [("127.0.0.1", app)]))
    [pid] = pids(run_dir)
    freeze(pid)  # alive, but it answers nothing
    for _ in range(300):  # the watcher asks every second and waits 5 s for an answer
        if not running(pid):
            break
        threading.Event().wait(0.1)
    assert not running(pid)
    assert routed(port).text == "hello"
    loop.run(router.close())


def test_a_change_the_router_cannot_take_is_not_lost_and_does_not_hold_up_the_daemon(setup, app: int) -> None:
    loop, run_dir, port = setup
    router = start(loop, run_dir, port)
    [pid] = pids(run_dir)
    freeze(pid)

    async def change() -> bool:
        """Whether the loop ran on while the change waited for the stopped router."""
        changing = asyncio.ensure_future(router.set_app("hello", ["hello.localhost"], [("127.0.0.1", app)]))
        await asyncio.sleep(0)  # the change starts; a change that blocked the loop would also finish here
        ran_on = not changing.done()
        await changing  # done once a router routes it: the stopped one is replaced
        return ran_on

    assert loop.run(change())
    assert not running(pid)
    assert routed(port).text == "hello"
    loop.run(router.close())


def test_a_busy_port_is_refused_with_the_reason(setup) -> None:
    loop, run_dir, _ = setup
    with process_impl.listening_socket("127.0.0.1", 0) as taken:
        router = RouterProcess("127.0.0.1", taken.getsockname()[1], run_dir, run_dir.parent / "router.log")
        with pytest.raises(OSError, match="in use"):
            loop.run(router.start())
    assert pids(run_dir) == []


@pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")
def test_the_router_runs_unprivileged_under_root(setup, app: int) -> None:
    loop, run_dir, port = setup
    router = start(loop, run_dir, port)
    [pid] = pids(run_dir)
    uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
    assert "0" not in uids
    loop.run(router.close())


def test_stop_routers_stops_it(setup) -> None:
    loop, run_dir, port = setup
    router = start(loop, run_dir, port)
    [pid] = pids(run_dir)
    loop.run(router.close())
    assert stop_routers(run_dir) == 1
    assert not running(pid) and pids(run_dir) == []
    with pytest.raises(httpx.ConnectError):
        routed(port)


RELEASE_APP = textwrap.dedent("""
    import http.server, os
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = os.environ["BODY"].encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
""")


def test_a_name_added_while_a_rollout_waits_for_the_router_goes_to_the_new_release(setup, tmp_path: Path) -> None:
    """domains:add while the router has not yet taken a rollout's switch: the name must follow the new
    release, whose processes stay, not the old one, which is drained."""
    loop, run_dir, port = setup
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "app.py").write_text(RELEASE_APP)
    router = start(loop, run_dir, port)
    scheduler = LocalScheduler(tmp_path / "apps", ProcessLogs(tmp_path / "logs"), stop_timeout=3)
    rollout = Rollout(scheduler, router, scheduler.logs, drain_seconds=0.2)

    def release(version: int) -> ReleaseSpec:
        return ReleaseSpec(app="demo", version=version, cwd=tmp_path / "app",
                           processes={"web": f"{sys.executable} app.py"},
                           env={"PATH": os.environ["PATH"], "BODY": f"v{version}"}, formation={"web": 1},
                           hostnames=["demo.localhost"])

    async def scenario() -> list[dict]:
        (await rollout.deploy(release(1), lambda line: None)).finish()
        [pid] = pids(run_dir)
        freeze(pid)  # the switch to v2 waits for the control timeout and a new router
        deploying = asyncio.ensure_future(rollout.deploy(release(2), lambda line: None))
        while not any(p["release"] == "v2" and p["state"] == "running" for p in rollout.processes("demo")):
            assert not deploying.done(), deploying.exception()
            await asyncio.sleep(0.05)
        assert not deploying.done()  # v2 passed its checks; the router has not switched yet
        await rollout.reroute("demo", ["demo.localhost", "www.demo.test"])
        (await deploying).finish()
        await asyncio.sleep(0.5)  # past the drain: v1 is stopped
        return rollout.processes("demo")

    try:
        processes = loop.run(scenario())
        assert [(p["release"], p["state"]) for p in processes if p["state"] != "stopped"] == [("v2", "running")]
        for name in ("demo.localhost", "www.demo.test"):
            response = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": name}, timeout=WAIT)
            assert (response.status_code, response.text) == (200, "v2"), name
    finally:
        loop.run(rollout.stop_app("demo"))
        loop.run(rollout.close())
        loop.run(router.close())
