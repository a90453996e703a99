"""`devflow up` as an operator meets it: first start, what it prints and serves, signals, restarts,
settings from flags and DEVFLOW_* variables, refusals at start-up, and the offline bootstrap commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory

from conftest import DEVFLOW, ROOT, Daemon, devflow, free_port, keygen, start_daemon, stop_daemon
from gitd.daemon import hook_socket_path
from gitd.database import MIGRATIONS
from gitd.settings import Settings
from runtime.router.process_impl import stop_routers

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("git") is None,
                                reason="needs the C git and OpenSSH clients")

STARTUP_POLLS = 300  # x 0.1 s: a hang guard, not a timing assertion
SHUTDOWN_WAIT = 30


@pytest.fixture(autouse=True)
def no_router_left(tmp_path: Path) -> Iterator[None]:
    """The router process outlives `devflow up` by design: each test stops those its daemons started."""
    yield
    for run_dir in tmp_path.glob("**/run"):
        stop_routers(run_dir)


@dataclasses.dataclass
class Up:
    """A `devflow up` started by a test, with its combined output in a file."""

    proc: subprocess.Popen
    log: Path
    http_port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def output(self) -> str:
        return self.log.read_text()


def launch(log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*DEVFLOW, "up", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def wait_serving(proc: subprocess.Popen, log: Path, http_port: int) -> None:
    """Until /healthz answers; raises with the daemon's output if it exits or never answers."""
    for _ in range(STARTUP_POLLS):
        if proc.poll() is not None:
            raise AssertionError(f"devflow up exited with {proc.returncode}: {log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"devflow up did not answer on port {http_port}: {log.read_text()}")


def stop(proc: subprocess.Popen, sig: signal.Signals = signal.SIGTERM) -> int:
    """Signal the daemon and wait; a daemon that ignores the signal is killed and the test fails."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=SHUTDOWN_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"devflow up did not stop on {sig.name}") from None
    return proc.returncode


@contextmanager
def running(tmp: Path, *args: str, http_port: int | None = None, env: dict[str, str] | None = None,
            name: str = "up") -> Iterator[Up]:
    """`devflow up` on loopback for the length of a with block; always stopped afterwards."""
    log = tmp / f"{name}.log"
    port_args = ("--http-port", str(http_port)) if http_port else ()
    proc = launch(log, "--host", "127.0.0.1", *port_args, *args, env=env)
    try:
        port = http_port or int((env or {})["DEVFLOW_HTTP_PORT"])
        wait_serving(proc, log, port)
        yield Up(proc, log, port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def loopback_args(data: Path) -> tuple[str, ...]:
    return ("--data-dir", str(data), "--ssh-port", str(free_port()), "--router-port", str(free_port()))


def keyscan(port: int) -> str:
    """The host key line an SSH client sees, without the host name column."""
    result = subprocess.run(["ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0].split(None, 1)[1]


def fingerprint(public_key_line: str) -> str:
    result = subprocess.run(["ssh-keygen", "-lf", "-"], input=public_key_line, capture_output=True, text=True,
                            check=True)
    return result.stdout.split()[1]


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("devflow: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], result.stderr


def test_first_start_creates_state_and_serves(tmp_path: Path) -> None:
    data = tmp_path / "fresh" / "data"
    http_port, ssh_port = free_port(), free_port()
    with running(tmp_path, "--data-dir", str(data), "--ssh-port", str(ssh_port), "--router-port",
                 str(free_port()), http_port=http_port) as up:
        # Others (the app user) may traverse the data dir but not list it, nor read the secrets in it.
        assert data.stat().st_mode & 0o077 == 0o011
        host_key = data / "ssh_host_ed25519_key"
        assert host_key.stat().st_mode & 0o777 == 0o600
        assert (data / "state.db").is_file()
        for state_file in data.glob("state.db*"):
            assert state_file.stat().st_mode & 0o077 == 0, state_file
        with sqlite3.connect(data / "state.db") as db:
            versions = {row[0] for row in db.execute("SELECT version_num FROM alembic_version")}
        assert ScriptDirectory(str(MIGRATIONS)).get_current_head() in versions

        health = httpx.get(up.http + "/healthz")
        assert health.status_code == 200 and health.headers["content-type"].startswith("application/json")
        info = health.json()
        assert info["status"] == "ok" and info["ssh_port"] == ssh_port and info["http_url"] == up.http
        host_fp = fingerprint(host_key.with_suffix(".pub").read_text())
        assert info["host_key_fingerprint"] == host_fp
        # What a client sees on the wire is the key on disk.
        assert keyscan(ssh_port).split()[:2] == host_key.with_suffix(".pub").read_text().split()[:2]

        page = httpx.get(up.http + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f"ssh://git@127.0.0.1:{ssh_port}/" in page.text and host_fp in page.text

        banner = up.output()
        assert f"SSH   ssh://git@127.0.0.1:{ssh_port}/APP.git  (host key {host_fp})" in banner
        assert f"HTTP  {up.http}" in banner
        assert stop(up.proc) == 0
    assert "DevFlow stopped" in up.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    data = tmp_path / "data"
    http_port = free_port()
    with running(tmp_path, *loopback_args(data), http_port=http_port) as up:
        hooks = hook_socket_path(Settings(data_dir=data))
        assert hooks.exists()
        assert stop(up.proc, sig) == 0
    assert "DevFlow stopped" in up.output() and "Traceback" not in up.output()
    assert not hooks.exists()
    # The listening port is released: a new listener can take it.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", http_port))


def test_restart_keeps_host_key_apps_keys_and_tokens(tmp_path: Path) -> None:
    first = start_daemon(tmp_path)
    try:
        assert first.ssh("apps:create", "survivor").returncode == 0
        ivan = first.add_user("ivan")
        ivan_token = json.loads(first.ssh("tokens:create", "--user", "ivan", "--json").stdout)["token"]
        revoked = json.loads(first.ssh("tokens:create", "--json").stdout)
        assert first.ssh("tokens:revoke", str(revoked["id"])).returncode == 0
        host_line = keyscan(first.ssh_port)
        host_fp = httpx.get(first.http + "/healthz").json()["host_key_fingerprint"]
    finally:
        assert stop_daemon(first) == 0

    ssh_port, http_port = free_port(), free_port()
    log = tmp_path / "restart.log"
    proc = launch(log, "--data-dir", str(first.data), "--host", "127.0.0.1", "--ssh-port", str(ssh_port),
                  "--http-port", str(http_port), "--router-port", str(free_port()))
    second = dataclasses.replace(first, proc=proc, log=log, ssh_port=ssh_port, http_port=http_port)
    try:
        wait_serving(proc, log, http_port)
        assert keyscan(ssh_port) == host_line
        assert httpx.get(second.http + "/healthz").json()["host_key_fingerprint"] == host_fp
        assert fingerprint(host_line) == host_fp

        assert "survivor" in second.ssh("apps:list").stdout
        assert (second.data / "repos" / "survivor.git" / "HEAD").is_file()
        assert json.loads(second.ssh("whoami", "--json", key=ivan).stdout)["name"] == "ivan"
        with second.api(ivan_token) as api:
            assert api.get("whoami").json()["name"] == "ivan"
        with second.api(revoked["token"]) as api:
            assert api.get("whoami").status_code == 401
        with second.api() as api:
            assert api.get("apps/survivor").status_code == 200
    finally:
        assert stop_daemon(second) == 0


def test_settings_from_environment(tmp_path: Path) -> None:
    data, http_port, ssh_port = tmp_path / "env-data", free_port(), free_port()
    env = {"DEVFLOW_DATA_DIR": str(data), "DEVFLOW_HTTP_PORT": str(http_port), "DEVFLOW_SSH_PORT": str(ssh_port),
           "DEVFLOW_ROUTER_PORT": str(free_port()), "DEVFLOW_GIT_BACKEND": "dulwich"}
    with running(tmp_path, env=env) as up:
        info = httpx.get(up.http + "/healthz").json()
        assert (info["ssh_port"], info["git_backend"]) == (ssh_port, "dulwich")
        assert (data / "state.db").is_file()
        assert stop(up.proc) == 0


def test_flags_beat_environment(tmp_path: Path) -> None:
    env_port, flag_port, ssh_port = free_port(), free_port(), free_port()
    env = {"DEVFLOW_HTTP_PORT": str(env_port), "DEVFLOW_GIT_BACKEND": "dulwich",
           "DEVFLOW_DATA_DIR": str(tmp_path / "env-data")}
    with running(tmp_path, "--data-dir", str(tmp_path / "flag-data"), "--ssh-port", str(ssh_port),
                 "--router-port", str(free_port()), "--git-backend", "cgit", http_port=flag_port, env=env) as up:
        info = httpx.get(up.http + "/healthz").json()
        assert (info["http_url"], info["git_backend"]) == (up.http, "cgit")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{env_port}/healthz")
        assert (tmp_path / "flag-data" / "state.db").is_file()
        assert not (tmp_path / "env-data").exists()
        assert stop(up.proc) == 0


@pytest.mark.parametrize("busy", ["--http-port", "--ssh-port", "--router-port"])
def test_port_in_use_is_a_clear_error(tmp_path: Path, busy: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--http-port": str(free_port()), "--ssh-port": str(free_port()),
                 "--router-port": str(free_port()), busy: str(port)}
        result = subprocess.run(
            [*DEVFLOW, "up", "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1",
             *[x for kv in ports.items() for x in kv]],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert_one_error_line(result, f"cannot listen on 127.0.0.1:{port}", "in use")
    assert "serving" not in result.stdout


def test_second_daemon_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running(tmp_path, *loopback_args(data), http_port=free_port()) as first:
        result = subprocess.run([*DEVFLOW, "up", "--host", "127.0.0.1", "--http-port", str(free_port()),
                                 *loopback_args(data)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert_one_error_line(result, f"another daemon (pid {first.proc.pid})", str(data), "--data-dir")
        assert "serving" not in result.stdout
        assert httpx.get(first.http + "/healthz").status_code == 200
        assert stop(first.proc) == 0
    # Freed with the process: the next daemon starts.
    with running(tmp_path, *loopback_args(data), http_port=free_port(), name="again") as again:
        assert stop(again.proc) == 0


@pytest.mark.skipif(os.getuid() != 0, reason="--app-user only applies under a root daemon")
def test_unknown_app_user_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run([*DEVFLOW, "up", "--host", "127.0.0.1", "--http-port", str(free_port()),
                             "--app-user", "no-such-user-here", *loopback_args(tmp_path / "data")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert_one_error_line(result, "--app-user no-such-user-here", "no such user")


@pytest.mark.parametrize("args, env, fragments", [
    (("--ssh-port", "99999"), {}, ("ssh_port", "65535")),
    (("--http-port", "-1"), {}, ("http_port", "0")),
    (("--max-push-bytes", "-5"), {}, ("max_push_bytes",)),
    (("--log-max-bytes", "1000"), {}, ("log_max_bytes", "65536")),
    ((), {"DEVFLOW_HTTP_PORT": "eighty"}, ("http_port", "integer")),
], ids=["ssh-port-too-big", "negative-http-port", "negative-push-limit", "tiny-log-limit", "env-not-a-number"])
def test_bad_settings_are_refused_before_anything_starts(tmp_path: Path, args: tuple[str, ...], env: dict,
                                                          fragments: tuple[str, ...]) -> None:
    data = tmp_path / "data"
    result = subprocess.run([*DEVFLOW, "up", "--data-dir", str(data), *args], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={**os.environ, **env})
    assert_one_error_line(result, *fragments)
    assert not data.exists()


@pytest.mark.parametrize("args, fragment", [
    (("--ssh-port", "abc"), "argument --ssh-port: invalid int value: 'abc'"),
    (("--git-backend", "svn"), "argument --git-backend: invalid choice: 'svn'"),
])
def test_malformed_flags_show_usage(tmp_path: Path, args: tuple[str, ...], fragment: str) -> None:
    result = subprocess.run([*DEVFLOW, "up", "--data-dir", str(tmp_path / "data"), *args], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.startswith("usage: devflow up")
    assert fragment in result.stderr


@pytest.mark.parametrize("data_dir_first", [False, True], ids=["data-dir-after", "data-dir-before"])
def test_offline_bootstrap_then_daemon_accepts(tmp_path: Path, data_dir_first: bool) -> None:
    data = tmp_path / "data"

    def offline(*args: str) -> subprocess.CompletedProcess:
        where = ("--data-dir", str(data))
        return devflow(*(where if data_dir_first else ()), *args, *(() if data_dir_first else where), check=False)

    key = keygen(tmp_path / "boss_key")
    added = offline("keys", "add", "--admin", "--user", "boss", str(key.with_suffix(".pub")))
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"added key {fingerprint(key.with_suffix('.pub').read_text())} for user boss (admin)\n"
    created = offline("tokens", "create", "--user", "boss", "--json")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    plain = offline("tokens", "create", "--user", "boss", "--description", "second")
    assert plain.returncode == 0 and "shown once" in plain.stdout and plain.stdout.split()[-1].startswith("dfp_")

    ssh_port, http_port = free_port(), free_port()
    log = tmp_path / "up.log"
    proc = launch(log, "--data-dir", str(data), "--host", "127.0.0.1", "--ssh-port", str(ssh_port),
                  "--http-port", str(http_port), "--router-port", str(free_port()))
    daemon = Daemon(data, tmp_path, ssh_port, http_port, 0, key, token, proc, log, "auto")
    try:
        wait_serving(proc, log, http_port)
        who = json.loads(daemon.ssh("whoami", "--json").stdout)
        assert (who["name"], who["admin"]) == ("boss", True)
        with daemon.api() as api:
            assert api.get("whoami").json()["name"] == "boss"
        # The offline commands share the state database with a running daemon.
        late = keygen(tmp_path / "late_key")
        assert offline("keys", "add", "--user", "late", str(late.with_suffix(".pub"))).returncode == 0
        assert json.loads(daemon.ssh("whoami", "--json", key=late).stdout)["name"] == "late"
    finally:
        assert stop_daemon(daemon) == 0


def test_offline_commands_refuse_bad_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    private = keygen(tmp_path / "some_key")
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("this is not a key\n")
    empty = tmp_path / "empty.pub"
    empty.write_text("")
    cases = [
        (str(garbage), "not a valid OpenSSH public key"),
        (str(private), "private key"),
        (str(empty), "exactly one OpenSSH public key"),
        (str(tmp_path / "missing.pub"), "No such file"),
    ]
    for path, fragment in cases:
        result = devflow("keys", "add", "--admin", "--user", "boss", path, "--data-dir", str(data), check=False)
        assert_one_error_line(result, fragment)
        assert result.stdout == ""
    refused = devflow("tokens", "create", "--user", "boss", "--data-dir", str(data), check=False)
    assert_one_error_line(refused, "no user named 'boss'")

    bad_name = devflow("keys", "add", "--user", "Not Valid", str(private.with_suffix(".pub")), "--data-dir",
                       str(data), check=False)
    assert_one_error_line(bad_name, "invalid user name")
    assert devflow("keys", "add", "--user", "boss", str(private.with_suffix(".pub")), "--data-dir", str(data),
                   check=False).returncode == 0
    duplicate = devflow("keys", "add", "--user", "other", str(private.with_suffix(".pub")), "--data-dir", str(data),
                        check=False)
    assert_one_error_line(duplicate, "already registered to user boss")
    for days in ("0", "-3"):  # 0 once meant "never expires"
        expiring = devflow("tokens", "create", "--user", "boss", "--expires-days", days, "--data-dir", str(data),
                           check=False)
        assert_one_error_line(expiring, "positive number of days")
