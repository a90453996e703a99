"""What the benchmarks share: server processes they must always stop, a DevFlow daemon, error reporting."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"  # every server the benchmarks start listens on loopback only
DEVFLOW = [sys.executable, "-m", "gitd.cli"]
STARTUP_SECONDS = 30
STOP_SECONDS = 10


class BenchError(Exception):
    """A benchmark could not run (missing tool, server that would not start); the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_program(name: str, hint: str, extra_dirs: Sequence[str] = ()) -> str:
    """The program's absolute path, or a BenchError telling the user what to install."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *extra_dirs])
    found = shutil.which(name, path=path)
    if found is None:
        raise BenchError(f"{name} not found: {hint}")
    return found


def redact(text: str) -> str:
    """Hide the token in user:token@ URLs, so error messages can be shown and pasted."""
    return re.sub(r"(://[^/@:\s]+):[^/@\s]+@", r"\1:***@", text)


def run_quiet(argv: Sequence[str], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise BenchError with its output, so errors are readable."""
    command = redact(" ".join(map(str, argv)))
    try:
        result = subprocess.run(argv, capture_output=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout}s: {command}") from None
    if result.returncode != 0:
        output = redact((result.stdout + result.stderr).decode(errors="replace").strip()[-2000:])
        raise BenchError(f"failed ({result.returncode}): {command}\n{output}")
    return result


def keygen(path: Path) -> Path:
    run_quiet(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)])
    return path


class ServerProcess:
    """A server the benchmark started, in its own process group, so that stopping it stops its children too.

    The group also keeps a terminal's Ctrl-C away from it: the benchmark stops it in order, in a finally.
    """

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)

    def wait_for_port(self, port: int) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((HOST, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"{self.name} did not listen on port {port} within {STARTUP_SECONDS}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_SECONDS)


@contextmanager
def server(name: str, argv: Sequence[str], log: Path, port: int, env: dict[str, str] | None = None,
           ) -> Iterator[ServerProcess]:
    """Start a server, wait until it listens on `port`, and stop it however the block ends."""
    process = ServerProcess(name, argv, log, env)
    try:
        process.wait_for_port(port)
        yield process
    finally:
        process.stop()


@dataclass(frozen=True)
class DevflowServer:
    data: Path
    ssh_port: int
    http_port: int
    router_port: int
    token: str
    process: ServerProcess


@contextmanager
def devflow_daemon(data: Path, admin_key: Path) -> Iterator[DevflowServer]:
    """`devflow up` on free loopback ports, with `admin_key` as the admin's key and an HTTP token for it."""
    cwd = {"cwd": ROOT}
    run_quiet([*DEVFLOW, "keys", "add", "--admin", "--user", "admin", f"{admin_key}.pub", "--data-dir", str(data)],
              **cwd)
    created = run_quiet([*DEVFLOW, "tokens", "create", "--user", "admin", "--json", "--data-dir", str(data)], **cwd)
    token = json.loads(created.stdout)["token"]
    ssh_port, http_port, router_port = free_port(), free_port(), free_port()
    # Builds must be reachable by the app users (when root runs this); temp dirs are private.
    apps = Path(tempfile.mkdtemp(prefix="devflow-bench-apps-"))
    apps.chmod(0o711)
    argv = [*DEVFLOW, "up", "--data-dir", str(data), "--host", HOST, "--ssh-port", str(ssh_port),
            "--http-port", str(http_port), "--router-port", str(router_port), "--apps-dir", str(apps)]
    try:
        with server("devflow up", argv, data.parent / "devflow.log", ssh_port) as process:
            _wait_for_health(f"http://{HOST}:{http_port}/healthz", process)
            yield DevflowServer(data, ssh_port, http_port, router_port, token, process)
    finally:
        # App processes outlive the daemon by design; the benchmark's must not outlive the benchmark.
        subprocess.run([*DEVFLOW, "stop-apps", "--data-dir", str(data)], capture_output=True, cwd=ROOT)
        shutil.rmtree(apps, ignore_errors=True)


def _wait_for_health(url: str, process: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise BenchError(f"DevFlow's HTTP server did not become healthy:\n{process.log_tail()}")
