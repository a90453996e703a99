"""The platform's bounds on every unit, through a real daemon: whatever an app prints, forks or allocates in a
process, a release phase or a build, its supervisor stays small, its tasks and memory stay within the flags, and
the daemon and the other apps go on.

The daemon here runs with small bounds (64 tasks, 256 MiB per build and one-off, 512 MiB per process), so that
reaching them costs the shared machine little. Fork bombs need root: RLIMIT_NPROC and cgroups are what hold them.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, commit, start_daemon, stop_daemon
from test_deploy import app_repo, get, push
from test_process_units import gone, parent_of, processes, wait_until

from runtime.local.cgroups import Cgroups

MiB = 1024**2
TASKS = 64
BUILD_MEMORY = 256 * MiB
PROCESS_MEMORY = 512 * MiB
ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="a fork bomb is held by cgroups and RLIMIT_NPROC (root)")
LIMITS = pytest.mark.skipif(not Cgroups().enforces_limits, reason="needs writable cgroup controllers (root)")

BOMB = textwrap.dedent("""
    # Every process forks until it is refused; the first then says how many tasks its user has.
    import os, sys, time

    def tasks_of(uid):
        count = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as status:
                    fields = dict(line.split(":", 1) for line in status if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    count += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                pass
        return count

    first = os.getpid()
    while True:
        try:
            os.fork()
        except OSError as exc:
            why = exc.strerror
            break
    if os.getpid() != first:
        time.sleep(3600)
    print(f"forks refused ({why}) with {tasks_of(os.getuid())} tasks of uid {os.getuid()}", flush=True)
    if sys.argv[1:] == ["serve"]:
        import http.server
        http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), http.server.SimpleHTTPRequestHandler
                               ).serve_forever()
    sys.exit(3)
""")


@pytest.fixture(scope="module")
def bounded(tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp("bounded"), extra_args=(
        "--max-pids-per-app", str(TASKS), "--max-build-memory", str(BUILD_MEMORY),
        "--max-process-memory", str(PROCESS_MEMORY)))
    push(d, app_repo(d, "stdlib", "neighbour"), "neighbour")  # the other tenant, which must not notice
    yield d
    stop_daemon(d)


def unaffected(daemon: Daemon) -> None:
    assert get(daemon, "neighbour").text == "stdlib v1"
    assert daemon.api().get("whoami").status_code == 200


def status_field(pid: int, name: str) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith(f"{name}:"))


def processes_of(app: str) -> list[int]:
    """Live processes started for `app` (their environment says so; uids may be another test daemon's too)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"\0DEVFLOW_APP={app}\0".encode() in b"\0" + Path(f"/proc/{entry}/environ").read_bytes() \
                    and not gone(int(entry)):
                found.append(int(entry))
        except OSError:
            continue
    return found


def refused_tasks(output: str) -> int:
    """From the bomb's line: how many tasks its user had when the fork was refused."""
    line = next(line for line in output.splitlines() if "forks refused" in line)
    words = line.split()
    return int(words[words.index("tasks") - 1])


def test_a_process_printing_one_endless_line_leaves_its_supervisor_small(bounded: Daemon) -> None:
    repo = app_repo(bounded, "stdlib", "zeros")
    (repo / "Procfile").write_text("web: python3 app.py\nworker: tr -d '\\n' </dev/zero\n")
    commit(repo, "a worker that never ends its line")
    push(bounded, repo, "zeros")
    assert bounded.ssh("ps:scale", "zeros", "worker=1").returncode == 0
    worker = wait_until(lambda: (p := processes(bounded, "zeros").get("worker.1")) and p["pid"], "worker.1")
    supervisor = parent_of(worker)

    def relayed() -> int:
        return int(next(line.split()[1] for line in Path(f"/proc/{supervisor}/io").read_text().splitlines()
                        if line.startswith("rchar:")))

    wait_until(lambda: relayed() > 256 * MiB, "the supervisor to read 256 MiB of a line without end")
    peak = int(status_field(supervisor, "VmHWM").split()[0]) * 1024
    assert peak < 64 * MiB, f"the supervisor grew to {peak // MiB} MiB"
    log = bounded.ssh("logs", "zeros", "--process", "worker", "--tail", "3").stdout
    assert "worker.1 | " in log  # heard, in pieces
    assert bounded.ssh("ps:scale", "zeros", "worker=0").returncode == 0
    unaffected(bounded)


def test_a_release_phase_line_longer_than_a_read_is_relayed_in_pieces(bounded: Daemon) -> None:
    repo = app_repo(bounded, "stdlib", "longline")
    (repo / "Procfile").write_text("web: python3 app.py\n"
                                   "release: python3 -c \"print('x' * 300000); print('after it')\"\n")
    commit(repo, "a release phase that prints a 300 kB line")
    result = push(bounded, repo, "longline")
    assert "after it" in result.stderr and "Released v1" in result.stderr
    pieces = [line.split(" | ", 1)[1] for line in bounded.ssh("logs", "longline", "--process", "release").stdout
              .splitlines() if " | x" in line]
    assert "".join(pieces) == "x" * 300000 and max(map(len, pieces)) <= 64 * 1024


@ROOT_ONLY
def test_a_fork_bomb_in_the_release_phase_is_contained(bounded: Daemon) -> None:
    repo = app_repo(bounded, "stdlib", "releasebomb")
    (repo / "bomb.py").write_text(BOMB)
    (repo / "Procfile").write_text("web: python3 app.py\nrelease: python3 bomb.py\n")
    commit(repo, "a release phase that forks without end")
    result = push(bounded, repo, "releasebomb", check=False)
    assert result.returncode != 0
    assert "release command exited with status 3" in result.stderr
    assert refused_tasks(result.stderr) <= TASKS
    wait_until(lambda: not processes_of("releasebomb"), "the release phase's unit to be killed whole")
    unaffected(bounded)


@ROOT_ONLY
def test_a_fork_bomb_in_a_web_process_is_contained(bounded: Daemon) -> None:
    repo = app_repo(bounded, "stdlib", "webbomb")
    (repo / "bomb.py").write_text(BOMB)
    (repo / "Procfile").write_text("web: python3 bomb.py serve\n")
    commit(repo, "a web process that forks until refused, then serves")
    push(bounded, repo, "webbomb")
    assert get(bounded, "webbomb").status_code == 200
    assert refused_tasks(bounded.ssh("logs", "webbomb", "--process", "web").stdout) <= TASKS
    assert 0 < len(processes_of("webbomb")) <= TASKS
    unaffected(bounded)
    assert bounded.ssh("ps:stop", "webbomb").returncode == 0
    wait_until(lambda: not processes_of("webbomb"), "the web process's unit to be killed whole")
    unaffected(bounded)


@LIMITS
def test_a_release_phase_past_its_memory_fails_saying_so(bounded: Daemon) -> None:
    repo = app_repo(bounded, "stdlib", "hungryrelease")
    (repo / "Procfile").write_text("web: python3 app.py\nrelease: python3 -c \"b'x' * (1 << 30)\"\n")
    commit(repo, "a release phase that takes 1 GiB")
    result = push(bounded, repo, "hungryrelease", check=False)
    assert result.returncode != 0
    assert ("release went over its memory limit of 256M and was killed (an admin can raise it with devflow up "
            "--max-build-memory)") in result.stderr
    unaffected(bounded)


@LIMITS
def test_a_build_past_its_memory_fails_the_deploy_saying_so(bounded: Daemon) -> None:
    if shutil.which("npm") is None:
        pytest.skip(reason="needs npm")
    repo = bounded.work / "hungrybuild"
    repo.mkdir()
    (repo / "package.json").write_text('{"name": "hungrybuild", "version": "1.0.0", "scripts": {'
                                       '"build": "node -e \\"const a = []; for (;;) a.push(Buffer.alloc(1 << 26, 1))'
                                       '\\"", "start": "node -e 0"}}')
    bounded.git("init", "-q", "-b", "main", str(repo))
    commit(repo, "a build step that takes all the memory it can")
    result = push(bounded, repo, "hungrybuild", check=False)
    assert result.returncode != 0
    assert ("`npm run build` was killed: it went over the memory a build may use: the limit is 256 MiB (an admin "
            "can raise it with devflow up --max-build-memory)") in result.stderr
    unaffected(bounded)


@LIMITS
def test_processes_get_the_memory_ceiling_and_resources_set_stays_under_it(bounded: Daemon) -> None:
    push(bounded, app_repo(bounded, "stdlib", "ceiling"), "ceiling")
    [web] = processes(bounded, "ceiling").values()
    assert web["memory"] == "512M"
    refused = bounded.ssh("resources:set", "ceiling", "memory=1G")
    assert refused.returncode != 0
    assert ("memory=1G for each process of ceiling: the limit is 512 MiB (an admin can raise it with devflow up "
            "--max-process-memory)") in refused.stderr
    assert json.loads(bounded.ssh("resources", "ceiling", "--json").stdout)["memory"] is None  # nothing stored
    assert bounded.ssh("resources:set", "ceiling", "memory=128M").returncode == 0
    web = wait_until(lambda: (p := processes(bounded, "ceiling").get("web.1")) and p["memory"] == "128M" and p,
                     "web.1 with 128M")
    assert get(bounded, "ceiling").text == "stdlib v1"
