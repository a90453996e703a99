"""Push-to-live: from the start of `git push` to the first 200 with the new content through the router.

Measures the stdlib fixture app (tests/apps/stdlib), first deploy (a new app each run) and redeploy,
median of several runs, and watches a request loop through each redeploy for failures and stalls.
Targets: first deploy <= 2.0 s, redeploy <= 1.0 s, no failed request, none waiting over 100 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks._support import HOST, ROOT, BenchError, DevflowServer, devflow_daemon, keygen

FIXTURE = ROOT / "tests" / "apps" / "stdlib"
POLL = 0.005
DEADLINE = 120.0


class Watcher:
    """A request loop on one host through the router: counts failures and the slowest answer."""

    def __init__(self, router_port: int, host: str) -> None:
        self.url = f"http://{HOST}:{router_port}/"
        self.host = host
        self.failed = 0
        self.requests = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(timeout=10, trust_env=False) as client:
            for _ in range(200_000):
                if self._stop.is_set():
                    return
                started = time.perf_counter()
                try:
                    ok = client.get(self.url, headers={"Host": self.host}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.requests += 1
                self.failed += not ok
                time.sleep(0.002)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def git(*args: str, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def time_to_live(push: list[str], repo: Path, env: dict[str, str], router_port: int, host: str, want: str) -> float:
    """Seconds from the start of the push to the first answer `want` through the router."""
    started = time.perf_counter()
    pushing = subprocess.Popen(push, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with httpx.Client(timeout=5, trust_env=False) as client:
        while time.perf_counter() - started < DEADLINE:
            try:
                if client.get(f"http://{HOST}:{router_port}/", headers={"Host": host}).text == want:
                    elapsed = time.perf_counter() - started
                    break
            except httpx.HTTPError:
                pass
            if pushing.poll() not in (None, 0):
                raise BenchError(f"the push failed:\n{pushing.stderr.read()[-2000:]}")
            time.sleep(POLL)
        else:
            raise BenchError(f"{host} did not answer {want!r} within {DEADLINE:.0f}s")
    pushing.communicate(timeout=DEADLINE)
    return elapsed


def set_version(repo: Path, version: str, env: dict[str, str]) -> None:
    app = repo / "app.py"
    lines = [f'VERSION = "{version}"' if line.startswith("VERSION = ") else line
             for line in app.read_text().splitlines()]
    app.write_text("\n".join(lines) + "\n")
    git("commit", "-qam", version, cwd=repo, env=env)


def measure(devflow: DevflowServer, work: Path, key: Path, runs: int) -> dict[str, list[float]]:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.test",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.test",
           "GIT_SSH_COMMAND": f"ssh -i {key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                              f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -p {devflow.ssh_port}"}
    results: dict[str, list[float]] = {"first deploy": [], "redeploy": [], "slowest request": [], "failed": []}
    for run in range(1, runs + 1):
        app = f"bench{run}"
        repo = work / app
        shutil.copytree(FIXTURE, repo)
        git("init", "-q", "-b", "main", cwd=repo, env=env)
        git("add", "-A", cwd=repo, env=env)
        git("commit", "-qm", "v1", cwd=repo, env=env)
        push = ["git", "push", "-q", f"ssh://git@{HOST}:{devflow.ssh_port}/{app}.git", "main"]
        host = f"{app}.localhost"
        results["first deploy"].append(time_to_live(push, repo, env, devflow.router_port, host, "stdlib v1"))
        set_version(repo, "v2", env)
        with Watcher(devflow.router_port, host) as watcher:
            time.sleep(0.2)
            results["redeploy"].append(time_to_live(push, repo, env, devflow.router_port, host, "stdlib v2"))
            time.sleep(2.5)  # through the drain of the old release, too
        results["slowest request"].append(watcher.slowest)
        results["failed"].append(watcher.failed)
        print(f"  run {run}: first {results['first deploy'][-1]:.2f}s, redeploy {results['redeploy'][-1]:.2f}s, "
              f"{watcher.requests} requests during the redeploy, {watcher.failed} failed, "
              f"slowest {watcher.slowest * 1000:.0f} ms", flush=True)
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench push_to_live", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="devflow-bench-") as tmp:
            work = Path(tmp)
            key = keygen(work / "admin_key")
            with devflow_daemon(work / "data", key) as devflow:
                results = measure(devflow, work, key, args.runs)
    except BenchError as exc:
        print(f"bench push_to_live: {exc}")
        return 1
    first, redeploy = statistics.median(results["first deploy"]), statistics.median(results["redeploy"])
    print(f"push-to-live (stdlib app, median of {args.runs}): first deploy {first:.2f}s (target 2.0s), "
          f"redeploy {redeploy:.2f}s (target 1.0s); during redeploys {sum(results['failed'])} failed requests, "
          f"slowest {max(results['slowest request']) * 1000:.0f} ms (target 100 ms)")
    return 0
