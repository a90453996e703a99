"""The SSH front door bounds what a client can hold: connections before they authenticate, and sessions
(each a pack program or a command) on one connection. The stock ssh client and asyncssh, a real daemon."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from conftest import Daemon, keygen, start_daemon, stop_daemon


@pytest.fixture(scope="module")
def bounded(tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp("ssh-limits"),
                     extra_args=("--max-ssh-connections", "3", "--max-ssh-sessions", "2"))
    yield d
    stop_daemon(d)


def test_connections_past_the_limit_are_refused_until_some_close(bounded: Daemon) -> None:
    d = bounded
    idle = [socket.create_connection(("127.0.0.1", d.ssh_port), timeout=10) for _ in range(3)]
    try:
        for conn in idle:  # each one is an SSH connection the daemon holds: it has sent its banner
            assert conn.recv(64).startswith(b"SSH-2.0-DevFlow")
        refused = d.ssh("whoami")
        assert refused.returncode == 255 and "name: admin" not in refused.stdout
        assert "the limit (--max-ssh-connections)" in d.log.read_text()
    finally:
        for conn in idle:
            conn.close()
    for _ in range(50):  # the daemon notices the closed connections as its loop gets to them
        if (answer := d.ssh("whoami")).returncode == 0:
            break
    assert answer.returncode == 0 and "name: admin" in answer.stdout


def test_sessions_on_one_connection_are_bounded(bounded: Daemon) -> None:
    d = bounded
    assert d.ssh("apps:create", "sessions").returncode == 0

    async def open_sessions() -> tuple[list[bytes], int | None, str]:
        async with asyncssh.connect("127.0.0.1", d.ssh_port, username="git", client_keys=[str(d.admin_key)],
                                    known_hosts=None) as conn:
            # upload-pack advertises and then waits for the client: a session held open.
            held = [await conn.create_process("git-upload-pack '/sessions.git'", encoding=None) for _ in range(2)]
            firsts = [await p.stdout.read(4) for p in held]
            third = await conn.run("whoami", check=False)
            for process in held:
                process.stdin.write_eof()
                await process.wait()
            after = await conn.run("whoami", check=False)
            return firsts, third.exit_status, str(third.stderr) + "|" + str(after.exit_status)

    firsts, status, errors = asyncio.run(asyncio.wait_for(open_sessions(), 120))
    assert all(first.isalnum() for first in firsts)  # pkt-line lengths: the advertisements came
    refusal, after = errors.split("|")
    assert status == 1 and "too many sessions on one connection" in refusal and "--max-ssh-sessions" in refusal
    assert after == "0"  # once the others end, the connection serves again


def test_a_connection_may_offer_only_a_few_keys(bounded: Daemon, tmp_path: Path) -> None:
    d = bounded
    strangers = [keygen(tmp_path / f"stranger{n}") for n in range(7)]

    def whoami(*keys: Path) -> subprocess.CompletedProcess:
        argv = ["ssh", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-p", str(d.ssh_port)]
        for key in keys:
            argv += ["-i", str(key)]
        return subprocess.run([*argv, "git@127.0.0.1", "whoami"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)

    late = whoami(*strangers, d.admin_key)  # the admin's key comes eighth: past the limit of six
    assert late.returncode == 255 and "name: admin" not in late.stdout
    early = whoami(*strangers[:3], d.admin_key)
    assert early.returncode == 0 and "name: admin" in early.stdout


def test_one_client_address_holds_only_so_many_connections(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, extra_args=("--max-connections-per-client", "2"))
    try:
        ssh_idle = [socket.create_connection(("127.0.0.1", d.ssh_port), timeout=10) for _ in range(2)]
        http_idle = [socket.create_connection(("127.0.0.1", d.http_port), timeout=10) for _ in range(2)]
        try:
            assert d.ssh("whoami").returncode == 255  # a third connection still authenticating: dropped
            with socket.create_connection(("127.0.0.1", d.http_port), timeout=10) as third:
                third.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert third.recv(64).startswith(b"HTTP/1.1 503")
        finally:
            for conn in ssh_idle + http_idle:
                conn.close()
        for _ in range(50):
            if (answer := d.ssh("whoami")).returncode == 0:
                break
        assert answer.returncode == 0
    finally:
        stop_daemon(d)
