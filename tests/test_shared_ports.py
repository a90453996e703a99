"""Tenants share the host's loopback ports: while one app's process restarts, another tenant's process can bind
its port (/proc/net/tcp shows every listener). The router must never send the first app's requests there.

Through a real daemon under root (each app its own uid): a victim app, and an attacker app whose process waits
for the victim's port to be free and binds it. The victim's process is killed; its requests, sent all along,
get the victim's answer, 502 or 503, never the attacker's, which logs each request it gets.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from conftest import Daemon, commit, start_daemon, stop_daemon
from test_deploy import APPS, app_repo, push
from test_process_units import processes, running, wait_until


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    if os.getuid() != 0:
        pytest.skip(reason="apps have uids of their own only under a root daemon")
    d = start_daemon(tmp_path_factory.mktemp("shared-ports"))
    yield d
    stop_daemon(d)


class Visitor:
    """Requests for the victim through the router, one after the other, until stopped: what each got."""

    def __init__(self, daemon: Daemon, host: str) -> None:
        self.seen: Counter[tuple[int, str]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._visit, args=(daemon.router_port, host), daemon=True)
        self._thread.start()

    def _visit(self, port: int, host: str) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Host": host, "Cookie": "session=victim"},
                          timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.get("/")
                except httpx.HTTPError as exc:
                    self.seen[(0, type(exc).__name__)] += 1
                    continue
                self.seen[(response.status_code, response.text[:40])] += 1

    def stop(self) -> Counter[tuple[int, str]]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.seen


def test_a_port_another_tenant_takes_while_the_app_restarts_gets_none_of_its_requests(shared: Daemon) -> None:
    push(shared, app_repo(shared, "stdlib", "victim"), "victim")
    attacker = app_repo(shared, "stdlib", "attacker")
    shutil.copy(APPS / "porthijack" / "hijack.py", attacker / "hijack.py")
    (attacker / "Procfile").write_text("web: python3 app.py\nhijack: python3 hijack.py\n")
    commit(attacker, "a process that takes another app's port")
    push(shared, attacker, "attacker")
    victim = wait_until(lambda: running(shared, "victim", "web.1"), "the victim's web process")
    assert shared.ssh("config:set", "attacker", f"TARGET={victim['port']}").returncode == 0
    assert shared.ssh("ps:scale", "attacker", "hijack=1").returncode == 0
    wait_until(lambda: running(shared, "attacker", "hijack.1"), "the attacker's process")

    visitor = Visitor(shared, "victim.localhost")
    try:
        wait_until(lambda: visitor.seen[(200, "stdlib v1")] >= 10, "the victim to answer through the router")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(lambda: "bound the port" in shared.ssh("logs", "attacker", "--process", "hijack").stdout,
                   "the attacker to bind the victim's port")
        wait_until(lambda: processes(shared, "victim")["web.1"]["state"] == "crashed",
                   "the victim to give up on a port another holds")
        seen_meanwhile = sum(visitor.seen.values())
        wait_until(lambda: sum(visitor.seen.values()) > seen_meanwhile + 10, "more requests once it crashed")
    finally:
        seen = visitor.stop()
    assert "got a request" not in shared.ssh("logs", "attacker", "--process", "hijack").stdout
    assert {status for status, _ in seen} <= {200, 502, 503}, seen  # the victim, or the router's own pages
    assert {text for status, text in seen if status == 200} == {"stdlib v1"}, seen
    assert seen[(503, "victim has no healthy web process\n")] > 0, seen  # taken out as soon as it exited

    assert shared.ssh("ps:scale", "attacker", "hijack=0").returncode == 0  # the port is free again
    assert shared.ssh("ps:restart", "victim").returncode == 0
    with httpx.Client(timeout=10) as client:
        response = client.get(f"http://127.0.0.1:{shared.router_port}/", headers={"Host": "victim.localhost"})
    assert response.text == "stdlib v1"
