"""Shared fixtures: a real `devflow up` on free loopback ports, keys, tokens, git helpers.

Under CI=true a skipped test fails the run: CI installs every service the tests use.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVFLOW = [sys.executable, "-m", "gitd.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def devflow(*args: str, input: str | None = None, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*DEVFLOW, *args], input=input, capture_output=True, text=True, check=check,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def keygen(path: Path, kind: str = "ed25519", bits: int | None = None) -> Path:
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path), "-C", path.name]
    if bits:
        args += ["-b", str(bits)]
    subprocess.run(args, check=True)
    return path


@dataclass
class Daemon:
    """A running daemon and what a test needs to talk to it."""

    data: Path
    work: Path
    ssh_port: int
    http_port: int
    router_port: int
    admin_key: Path
    token: str
    proc: subprocess.Popen | None
    log: Path
    backend: str
    extra_args: tuple[str, ...] = ()
    apps_dir: Path | None = None
    extra_keys: dict[str, Path] = field(default_factory=dict)

    @property
    def ssh_url(self) -> str:
        return f"ssh://git@127.0.0.1:{self.ssh_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def http_url(self, token: str | None = None, user: str = "admin") -> str:
        return f"http://{user}:{token or self.token}@127.0.0.1:{self.http_port}"

    def ssh_command(self, key: Path | None = None) -> str:
        return (f"ssh -i {key or self.admin_key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -p {self.ssh_port}")

    def git_env(self, key: Path | None = None) -> dict:
        return {**os.environ, "GIT_SSH_COMMAND": self.ssh_command(key), "GIT_TERMINAL_PROMPT": "0",
                "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}

    def git(self, *args: str, cwd: Path | None = None, key: Path | None = None, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd or self.work, capture_output=True, text=True, check=check,
                              env={**self.git_env(key), **(env or {})})

    def ssh(self, *command: str, key: Path | None = None, input: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([*self.ssh_command(key).split(), "git@127.0.0.1", *command], input=input,
                              capture_output=True, text=True, check=check, stdin=None if input else subprocess.DEVNULL)

    def add_user(self, name: str, role_on: dict[str, str] | None = None) -> Path:
        key = keygen(self.work / f"{name}_key")
        result = self.ssh("keys:add", "--user", name, input=key.with_suffix(".pub").read_text())
        assert result.returncode == 0, result.stderr
        for app, role in (role_on or {}).items():
            result = self.ssh("collaborators:add", app, name, role)
            assert result.returncode == 0, result.stderr
        self.extra_keys[name] = key
        return key

    def fsck(self, app: str) -> None:
        repo = self.data / "repos" / f"{app}.git"
        result = subprocess.run(["git", "--git-dir", str(repo), "fsck", "--no-progress", "--strict"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.http + "/api/", headers={"Authorization": f"Bearer {token or self.token}"})


def make_repo(path: Path, files: dict[str, str | bytes] | None = None, branch: str = "main") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull}
    subprocess.run(["git", "init", "-q", "-b", branch, str(path)], check=True, env=env)
    for name, content in (files or {"README": "hello\n"}).items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    commit(path, "init")
    return path


def commit(path: Path, message: str, allow_empty: bool = False) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
    subprocess.run(["git", "-C", str(path), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", message, *(["--allow-empty"] if allow_empty else [])],
                   check=True, env=env)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True, env=env).stdout.strip()


def start_daemon(tmp: Path, backend: str = "auto", extra_args: tuple[str, ...] = ()) -> Daemon:
    data, work = tmp / "data", tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    admin_key = keygen(work / "admin_key")
    devflow("keys", "add", "--admin", "--user", "admin", str(admin_key) + ".pub", "--data-dir", str(data))
    created = devflow("tokens", "create", "--user", "admin", "--json", "--data-dir", str(data))
    token = json.loads(created.stdout)["token"]
    # Builds must be reachable by the app users (under root), which pytest's 0700 tmp dirs are not.
    apps = Path(tempfile.mkdtemp(prefix="devflow-test-apps-"))
    apps.chmod(0o711)
    daemon = Daemon(data, work, free_port(), free_port(), free_port(), admin_key, token, None, tmp / "daemon.log",
                    backend, extra_args=("--apps-dir", str(apps), *extra_args), apps_dir=apps)
    return launch(daemon)


def launch(daemon: Daemon) -> Daemon:
    """Run `devflow up` for this daemon's data dir and ports; return once SSH and HTTP answer."""
    proc = subprocess.Popen(
        [*DEVFLOW, "up", "--data-dir", str(daemon.data), "--host", "127.0.0.1", "--ssh-port", str(daemon.ssh_port),
         "--http-port", str(daemon.http_port), "--router-port", str(daemon.router_port),
         "--git-backend", daemon.backend, *daemon.extra_args],
        stdout=daemon.log.open("a"), stderr=subprocess.STDOUT, cwd=ROOT,
    )
    daemon.proc = proc
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"devflow up exited: {daemon.log.read_text()}")
        try:
            httpx.get(daemon.http + "/healthz", timeout=1)
            with socket.create_connection(("127.0.0.1", daemon.ssh_port), timeout=1):
                return daemon
        except (httpx.HTTPError, OSError):
            time.sleep(0.1)
    stop_daemon(daemon)
    raise RuntimeError(f"devflow up did not start: {daemon.log.read_text()}")


def stop_app_processes(data: Path) -> None:
    """App processes outlive the daemon by design; a test stops the ones its daemon started."""
    devflow("stop-apps", "--data-dir", str(data))


def stop_daemon(daemon: Daemon, stop_apps: bool = True) -> int:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    if stop_apps:
        stop_app_processes(daemon.data)
        if daemon.apps_dir is not None:
            shutil.rmtree(daemon.apps_dir, ignore_errors=True)
    return daemon.proc.returncode


BACKENDS = ["cgit", "dulwich"]


@pytest.fixture(scope="module", params=BACKENDS)
def daemon(request, tmp_path_factory) -> Iterator[Daemon]:
    """One daemon per module and git backend: every transport test runs on both."""
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp(f"devflow-{request.param}"), backend=request.param)
    yield d
    stop_daemon(d)


@pytest.fixture(scope="module")
def cgit_daemon(tmp_path_factory) -> Iterator[Daemon]:
    """A daemon on the default backend, for tests about gitd rather than the pack exchange."""
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp("devflow"), backend="cgit")
    yield d
    stop_daemon(d)


@pytest.fixture(scope="session", autouse=True)
def host_uids_record(tmp_path_factory) -> Iterator[Path]:
    """Root daemons claim their apps' uids in a host-wide record: the tests' daemons share one of this run's own
    rather than the host's /var/lib/devflow/uids, which would keep every test app's uid forever."""
    record = tmp_path_factory.mktemp("host-uids") / "uids"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEVFLOW_UIDS_DIR", str(record))
        yield record


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") == "true" and skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; under CI nothing may skip", red=True)
        session.exitstatus = 1
