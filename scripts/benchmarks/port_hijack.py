"""`scripts/bench port_hijack`: how long a web process that died stays routed, and what another tenant racing
for its port gets meanwhile (root only: apps have uids of their own).

One daemon, two apps: `victim` (a stdlib web app) and `attacker`, whose process binds the victim's port the
moment it is free (a bind every 0.5 ms). A client sends the victim's requests through the router one after the
other, without pause. Each round kills the victim's process (SIGKILL), with the attacker racing or not, and
reads off the client's answers:

  dropped   ms from the kill to the first 503 (the router no longer has the instance), to within a request
  502       requests in between that the router could not place (the port refused, or was another uid's)
  taken     requests the attacker answered: the router sent it the victim's traffic, cookies and all
  back      without the attacker: ms from the kill to the victim's first answer again (its supervisor waits
            0.5 s before the first restart)

Nothing here is a pass or fail: tests/test_shared_ports.py holds the guarantee.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks._support import HOST, ROOT, BenchError, DevflowServer, devflow_daemon, find_program, keygen, run_quiet

APPS = ROOT / "tests" / "apps"
HIJACK = APPS / "porthijack" / "hijack.py"
SETTLE = 1.0  # seconds the attacker may hold the port after the kill
QUIET = 10.5  # seconds the victim runs before each kill: its supervisor gives up on 5 exits within 10 s of a start


class Client:
    """The victim's requests through the router, back to back, each answer with when it came."""

    def __init__(self, router_port: int) -> None:
        self.answers: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(router_port,), daemon=True)
        self._thread.start()

    def _run(self, port: int) -> None:
        with httpx.Client(base_url=f"http://{HOST}:{port}", headers={"Host": "victim.localhost"}, timeout=10) as c:
            while not self._stop.is_set():
                try:
                    response = c.get("/")
                    self.answers.append((time.monotonic(), response.status_code, response.text[:16]))
                except httpx.HTTPError:
                    self.answers.append((time.monotonic(), 0, ""))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class Bench:
    def __init__(self, daemon: DevflowServer, work: Path, admin_key: Path) -> None:
        self.daemon = daemon
        self.work = work
        self.ssh_argv = ["ssh", "-i", str(admin_key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-p",
                         str(daemon.ssh_port), f"git@{HOST}"]
        self.git_env = {**os.environ, "GIT_SSH_COMMAND": " ".join(self.ssh_argv[:-1]), "GIT_CONFIG_GLOBAL": os.devnull,
                        "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
                        "GIT_COMMITTER_EMAIL": "b@x"}

    def ssh(self, *command: str) -> str:
        return run_quiet([*self.ssh_argv, *command]).stdout.decode()

    def deploy(self, app: str, extra: dict[str, str]) -> None:
        repo = self.work / app
        shutil.copytree(APPS / "stdlib", repo)
        for name, text in extra.items():
            (repo / name).write_text(text)
        for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", app]):
            run_quiet(argv, cwd=repo, env=self.git_env)
        run_quiet(["git", "push", f"ssh://git@{HOST}:{self.daemon.ssh_port}/{app}.git", "main"], cwd=repo,
                  env=self.git_env, timeout=900)

    def web(self) -> dict:
        """The victim's web process, once it runs."""
        for _ in range(600):
            records = httpx.get(f"http://{HOST}:{self.daemon.http_port}/api/apps/victim/processes", timeout=10,
                                headers={"Authorization": f"Bearer {self.daemon.token}"}).json()
            web = next((r for r in records if r["process"] == "web.1" and r["state"] == "running" and r["pid"]), None)
            if web is not None:
                return web
            time.sleep(0.05)
        raise BenchError(f"the victim's web process does not run: {records}")

    def round(self, attacker: bool) -> tuple[float | None, int, int, float | None]:
        """(ms to the first 503, 502s before it, answers from the attacker, ms to the victim's answer again)."""
        time.sleep(QUIET)
        web = self.web()
        if attacker:
            self.ssh("ps:start", "attacker")
            time.sleep(1.0)  # its process spins on the port
        client = Client(self.daemon.router_port)
        try:
            while not any(status == 200 for _, status, _ in client.answers):
                time.sleep(0.01)
            killed = time.monotonic()
            os.kill(web["pid"], signal.SIGKILL)
            time.sleep(SETTLE)
            if attacker:
                self.ssh("ps:stop", "attacker")  # the victim can have its port back
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(t > killed and s == 200 and b == "stdlib v1"
                                                          for t, s, b in client.answers):
                time.sleep(0.01)
        finally:
            client.stop()
        after = [(t, s, b) for t, s, b in client.answers if t > killed]
        dropped = next((t for t, s, _ in after if s == 503), None)
        until = dropped if dropped is not None else float("inf")
        failed = sum(1 for t, s, _ in after if s == 502 and t < until)
        taken = sum(1 for _, _, b in after if b == "hijacked")
        back = next((t for t, s, b in after if s == 200 and b == "stdlib v1"), None)
        return (None if dropped is None else (dropped - killed) * 1000, failed, taken,
                None if back is None else (back - killed) * 1000)


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"median {statistics.median(values):7.1f}  max {values[-1]:7.1f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench port_hijack", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="kills of the victim's process per variant (10)")
    args = parser.parse_args(argv)
    try:
        if os.getuid() != 0:
            raise BenchError("needs root: apps have uids of their own only under a root daemon")
        for program, hint in (("git", "install git"), ("ssh", "install openssh-client")):
            find_program(program, hint)
        with tempfile.TemporaryDirectory(prefix="devflow-bench-ports-") as tmp:
            work = Path(tmp)
            admin_key = keygen(work / "admin_key")
            with devflow_daemon(work / "data", admin_key) as daemon:
                bench = Bench(daemon, work, admin_key)
                bench.deploy("victim", {})
                port = bench.web()["port"]
                bench.deploy("attacker", {"hijack.py": HIJACK.read_text(),
                                          "Procfile": "web: python3 app.py\nhijack: python3 hijack.py\n"})
                bench.ssh("config:set", "attacker", f"TARGET={port}")
                bench.ssh("ps:scale", "attacker", "hijack=1")
                bench.ssh("ps:stop", "attacker")
                print("ms from the kill of the victim's process; requests the router could not place, and "
                      "requests the attacker answered, over all rounds")
                for attacker in (True, False):
                    rounds = [bench.round(attacker) for _ in range(args.runs)]
                    dropped = [r[0] for r in rounds if r[0] is not None]
                    back = [r[3] for r in rounds if r[3] is not None]
                    print(f"{'attacker racing' if attacker else 'no attacker':<16} dropped {_summary(dropped)}  "
                          f"502 {sum(r[1] for r in rounds):4d}  taken {sum(r[2] for r in rounds):4d}  "
                          f"back {_summary(back)}", flush=True)
    except BenchError as exc:
        print(f"port_hijack: {exc}")
        return 1
    except subprocess.SubprocessError as exc:
        print(f"port_hijack: {exc}")
        return 1
    return 0
