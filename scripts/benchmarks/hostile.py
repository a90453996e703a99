"""`scripts/bench hostile`: what hostile input costs the daemon and the other users it serves.

One daemon. Another user's calls (`ssh whoami`, the status page, `GET /api/whoami`) are timed with nothing
else going on, then during each attack, in the same run, and the daemon's peak memory (VmHWM, reset before
each attack through /proc/PID/clear_refs) is read around each:

  heads  4 clients each stream a 200 MiB request head at the HTTP port
  gzip   6 clients of a read-only user each post 4 MiB of gzip holding 4 GiB of zeros to git-upload-pack
  blob   a push of a commit holding a 500 MB file of zeros (about 1 MB on the wire)
  fifo   a tenant's running process plants a FIFO at package.json in its next build (root and npm only)

Each row: the other user's median and 95th percentile per call beside the quiet ones, the daemon's memory
growth, and what the attack got. Nothing here is a pass or fail: the tests hold the bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks._support import HOST, ROOT, BenchError, DevflowServer, devflow_daemon, find_program, keygen, run_quiet

APPS = ROOT / "tests" / "apps"
HEAD_BYTES = 200 * 1024**2
GZIP_ZEROS = 4 * 1024**3
BLOB_BYTES = 500 * 1000**2
CALL_TIMEOUT = 60.0


@dataclass
class Calls:
    """The other user's calls, timed: seconds per kind."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {"ssh whoami": [], "status page": [],
                                                                     "api whoami": []})

    def summary(self, kind: str) -> tuple[float, float]:
        values = sorted(self.seconds[kind])
        return statistics.median(values), values[min(len(values) - 1, int(0.95 * len(values)))]


class Bench:
    def __init__(self, daemon: DevflowServer, work: Path, admin_key: Path) -> None:
        self.daemon = daemon
        self.work = work
        self.admin_key = admin_key
        self.bob_key = keygen(work / "bob_key")
        self._ssh("keys:add", "--user", "bob", input=self.bob_key.with_suffix(".pub").read_bytes())
        self.http = f"http://{HOST}:{daemon.http_port}"
        self.bob_token = self._token("bob")

    def _ssh_argv(self, key: Path) -> list[str]:
        return ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-p",
                str(self.daemon.ssh_port)]

    def _ssh(self, *command: str, key: Path | None = None, input: bytes | None = None) -> str:
        result = run_quiet([*self._ssh_argv(key or self.admin_key), f"git@{HOST}", *command], input=input)
        return result.stdout.decode()

    def _token(self, user: str) -> str:
        return json.loads(self._ssh("tokens:create", "--user", user, "--json"))["token"]

    def git_env(self) -> dict[str, str]:
        return {**os.environ, "GIT_SSH_COMMAND": " ".join(self._ssh_argv(self.admin_key)), "GIT_TERMINAL_PROMPT": "0",
                "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x",
                "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"}

    # the other user

    def one_round(self, calls: Calls) -> None:
        started = time.monotonic()
        subprocess.run([*self._ssh_argv(self.bob_key), f"git@{HOST}", "whoami"], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=CALL_TIMEOUT)
        calls.seconds["ssh whoami"].append(time.monotonic() - started)
        for kind, url, headers in (("status page", "/", {}),
                                   ("api whoami", "/api/whoami", {"Authorization": f"Bearer {self.bob_token}"})):
            started = time.monotonic()
            try:
                httpx.get(self.http + url, headers=headers, timeout=CALL_TIMEOUT)
            except httpx.HTTPError:
                pass
            calls.seconds[kind].append(time.monotonic() - started)

    def while_running(self, attack: Callable[[], str], rounds: int) -> tuple[Calls, int, str]:
        """The other user's calls while `attack` runs (at least `rounds` of them), the daemon's memory growth
        in bytes, and what the attack says it got."""
        pid = self.daemon.process.proc.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := the resident size now
        before = _vm_hwm(pid)
        outcome: list[str] = []
        runner = threading.Thread(target=lambda: outcome.append(attack()))
        runner.start()
        calls = Calls()
        while runner.is_alive() or len(calls.seconds["ssh whoami"]) < rounds:
            self.one_round(calls)
        runner.join()
        return calls, _vm_hwm(pid) - before, outcome[0] if outcome else "the attack raised"

    # the attacks: each is made ready first (its repositories, keys, bombs), outside the timed phase

    def heads(self) -> Callable[[], str]:
        answers: list[str] = []

        def one() -> None:
            with socket.create_connection((HOST, self.daemon.http_port), timeout=30) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Filler: ")
                chunk, sent = b"a" * 65536, 0
                try:
                    while sent < HEAD_BYTES:
                        conn.sendall(chunk)
                        sent += len(chunk)
                except OSError:
                    pass
                try:
                    answers.append(conn.recv(64).split(b"\r\n")[0].decode(errors="replace") or "closed")
                except OSError:
                    answers.append("closed")

        def attack() -> str:
            _in_parallel(one, 4)
            return ", ".join(sorted(set(answers)))

        return attack

    def gzip_bombs(self) -> Callable[[], str]:
        reader = keygen(self.work / "reader_key")
        self._ssh("keys:add", "--user", "reader", input=reader.with_suffix(".pub").read_bytes())
        self._ssh("apps:create", "bombed")
        self._ssh("collaborators:add", "bombed", "reader", "read")
        token = self._token("reader")
        bomb = _gzip_of_zeros(GZIP_ZEROS)
        statuses: list[int] = []

        def one() -> None:
            response = httpx.post(f"{self.http}/bombed.git/git-upload-pack", content=bomb, auth=("reader", token),
                                  headers={"Content-Type": "application/x-git-upload-pack-request",
                                           "Content-Encoding": "gzip"}, timeout=300)
            statuses.append(response.status_code)

        def attack() -> str:
            _in_parallel(one, 6)
            return f"HTTP {', '.join(map(str, sorted(set(statuses))))} ({len(bomb) // 1024} KiB each)"

        return attack

    def blob(self) -> Callable[[], str]:
        repo = self.work / "blob"
        shutil.copytree(APPS / "stdlib", repo)
        with open(repo / "zeros.bin", "wb") as zeros:
            zeros.truncate(BLOB_BYTES)
        env = self.git_env()
        for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "zeros"]):
            run_quiet(argv, cwd=repo, env=env)
        return lambda: self._push(repo, "blob", env)

    def fifo(self) -> Callable[[], str]:
        repo = self.work / "planter"
        shutil.copytree(APPS / "planter", repo)
        env = self.git_env()
        for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "planter"]):
            run_quiet(argv, cwd=repo, env=env)
        first = self._push(repo, "planter", env)
        if first != "deployed":
            raise BenchError(f"the planter app did not deploy: {first}")
        armed = httpx.get(f"http://{HOST}:{self.daemon.router_port}/arm", params={"plan": "package.json:fifo"},
                          headers={"Host": "planter.localhost"}, timeout=30).text
        if armed != "armed":
            raise BenchError(f"the planter app did not arm: {armed!r}")
        run_quiet(["git", "commit", "-q", "--allow-empty", "-m", "again"], cwd=repo, env=env)
        return lambda: self._push(repo, "planter", env)

    def _push(self, repo: Path, app: str, env: dict[str, str]) -> str:
        result = subprocess.run(["git", "push", f"ssh://git@{HOST}:{self.daemon.ssh_port}/{app}.git", "main"],
                                cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode == 0:
            return "deployed"
        refused = [line.removeprefix("remote:").strip(" !") for line in result.stderr.splitlines() if " !  " in line]
        return "refused: " + (refused[0] if refused else result.stderr.strip().splitlines()[-1])


def _in_parallel(work: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024**2)
    return b"".join(packer.compress(block) for _ in range(size // len(block))) + packer.flush()


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError("the kernel does not report VmHWM")


def _row(name: str, calls: Calls, quiet: Calls, growth: int | None, outcome: str) -> str:
    cells = []
    for kind in calls.seconds:
        p50, p95 = calls.summary(kind)
        quiet50, _ = quiet.summary(kind)
        cells.append(f"{p50 * 1000:6.0f} {p95 * 1000:6.0f} ({p50 / quiet50:4.1f}x)")
    memory = "" if growth is None else f"{growth / 1024**2:+7.1f} MiB"
    return f"{name:<6} " + "  ".join(cells) + f"  {memory:>12}  {outcome}"


ATTACKS = ("heads", "gzip", "blob", "fifo")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="rounds of the other user's calls per phase (20)")
    parser.add_argument("--only", nargs="+", choices=ATTACKS, default=list(ATTACKS), help="the attacks to run")
    args = parser.parse_args(argv)
    try:
        for program, hint in (("git", "install git"), ("ssh", "install openssh-client")):
            find_program(program, hint)
        attacks = list(args.only)
        if "fifo" in attacks and (os.getuid() != 0 or shutil.which("npm") is None):
            print("fifo: skipped (a build is handed to the app's own uid only under root, and the planter app "
                  "needs npm)")
            attacks.remove("fifo")
        with tempfile.TemporaryDirectory(prefix="devflow-bench-hostile-") as tmp:
            work = Path(tmp)
            admin_key = keygen(work / "admin_key")
            with devflow_daemon(work / "data", admin_key) as daemon:
                bench = Bench(daemon, work, admin_key)
                quiet = Calls()
                for _ in range(args.runs):
                    bench.one_round(quiet)
                print("another user's calls, ms: median, 95th percentile (median against quiet); the daemon's "
                      "peak memory growth; what the attack got")
                print(f"{'':<6} " + "  ".join(f"{kind:^24}" for kind in quiet.seconds))
                print(_row("quiet", quiet, quiet, None, ""))
                runs = {"heads": bench.heads, "gzip": bench.gzip_bombs, "blob": bench.blob, "fifo": bench.fifo}
                for name in attacks:
                    calls, growth, outcome = bench.while_running(runs[name](), args.runs)
                    print(_row(name, calls, quiet, growth, outcome), flush=True)
    except BenchError as exc:
        print(f"hostile: {exc}")
        return 1
    return 0
