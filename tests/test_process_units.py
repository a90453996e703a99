"""Process units through a real daemon: nothing of an app or a build outlives its supervisor or its deployment,
a dyno is its command's own process, and under root every process sees its release at /app.

Processes are found the way an operator would: by pid from `ps`, by their parent in /proc, and by a token only
the test's command line holds.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, commit, launch, start_daemon, stop_daemon
from test_deploy import app_repo, get, push
from test_local_runtime import holding

from runtime.local.cgroups import Cgroups

POLLS = 300  # x 0.1 s: a hang guard, not a timing assertion
ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="apps get a mount namespace with /app only under root")
CGROUPS = pytest.mark.skipif(Cgroups().unified is None, reason="needs a writable cgroup2 hierarchy (root)")


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp("units"))
    yield d
    stop_daemon(d)


def wait_until(predicate, what: str):
    for _ in range(POLLS):
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (init reaps it when it pleases)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def token() -> str:
    """A sleep of an hour whose argument no other process on this host has."""
    return f"3600.{secrets.randbelow(10**6):06d}"


def processes(daemon: Daemon, app: str) -> dict[str, dict]:
    return {p["process"]: p for p in daemon.api().get(f"apps/{app}/processes").json() if p["state"] != "draining"}


def answers(daemon: Daemon, app: str, text: str) -> bool:
    """Through the router; a process just started again may not listen yet."""
    return get(daemon, app).text == text


def running(daemon: Daemon, app: str, process: str, not_pid: int | None = None) -> dict | None:
    record = processes(daemon, app).get(process)
    if record and record["state"] == "running" and record["pid"] and record["pid"] != not_pid:
        return record
    return None


def test_a_dyno_is_its_command_and_compounds_keep_shell_semantics(units: Daemon) -> None:
    repo = app_repo(units, "workers", "dyno")
    (repo / "Procfile").write_text("web: python3 app.py\n"
                                   "worker: echo started as $DYNO && while true; do echo beat; sleep 1; done\n")
    commit(repo, "a compound worker")
    push(units, repo, "dyno")
    assert units.ssh("ps:scale", "dyno", "web=1", "worker=1").returncode == 0
    web = wait_until(lambda: running(units, "dyno", "web.1"), "web.1")
    pid = web["pid"]
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "python3"  # no shell in between
    assert "runtime.local.supervisor" in cmdline(parent_of(pid))
    assert Path(f"/proc/{pid}/task/{pid}/children").read_text() == ""
    membership = Path(f"/proc/{pid}/cgroup").read_text()
    if "/devflow/" in membership:  # its unit holds just it
        unit = next(line.split(":", 2)[2] for line in membership.splitlines() if line.startswith("0::"))
        procs = Cgroups().unified.parent / unit.lstrip("/") / "cgroup.procs"
        assert procs.read_text().split() == [str(pid)]
    wait_until(lambda: "worker.1 | beat" in units.ssh("logs", "dyno", "--process", "worker").stdout, "beats")
    assert "worker.1 | started as worker.1" in units.ssh("logs", "dyno", "--process", "worker").stdout


def test_a_killed_supervisor_is_replaced_and_its_process_with_it(units: Daemon) -> None:
    push(units, app_repo(units, "stdlib", "orphan"), "orphan")
    before = wait_until(lambda: running(units, "orphan", "web.1"), "web.1")
    app_pid, supervisor = before["pid"], parent_of(before["pid"])
    assert "runtime.local.supervisor" in cmdline(supervisor)

    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: gone(app_pid), "the app process to die with its supervisor")
    after = wait_until(lambda: running(units, "orphan", "web.1", not_pid=app_pid), "a new supervisor")
    assert after["port"] == before["port"] and after["restarts"] == before["restarts"] + 1
    assert parent_of(after["pid"]) != supervisor and "runtime.local.supervisor" in cmdline(parent_of(after["pid"]))
    wait_until(lambda: answers(units, "orphan", "stdlib v1"), "the app to answer again")
    log = units.ssh("logs", "orphan").stdout
    assert f"web.1 | its supervisor (pid {supervisor}) died; what it left was killed, and it starts again" in log

    assert units.ssh("ps:restart", "orphan").returncode == 0
    restarted = wait_until(lambda: running(units, "orphan", "web.1", not_pid=after["pid"]), "ps:restart")
    wait_until(lambda: gone(after["pid"]), "the previous process to stop")
    assert restarted["port"] != after["port"]
    assert get(units, "orphan").text == "stdlib v1"


@CGROUPS
def test_what_a_process_daemonized_goes_with_its_dead_supervisor(units: Daemon) -> None:
    repo = app_repo(units, "stdlib", "escapee")
    sleep = token()
    (repo / "Procfile").write_text(f"web: (setsid sleep {sleep} &); python3 app.py\n")
    commit(repo, "a web process that daemonizes a helper")
    push(units, repo, "escapee")
    web = wait_until(lambda: running(units, "escapee", "web.1"), "web.1")
    [helper] = wait_until(lambda: holding(sleep), "the helper")
    assert Path(f"/proc/{helper}/stat").read_text().rpartition(")")[2].split()[3] != str(web["pid"])  # own session

    os.kill(parent_of(web["pid"]), signal.SIGKILL)
    wait_until(lambda: gone(helper), "the helper to be killed with the rest of the unit")
    wait_until(lambda: running(units, "escapee", "web.1", not_pid=web["pid"]), "a new supervisor")
    assert len(wait_until(lambda: holding(sleep), "the new helper")) == 1  # the new process's, only
    wait_until(lambda: answers(units, "escapee", "stdlib v1"), "the app to answer again")


@ROOT_ONLY
def test_processes_and_the_release_phase_see_their_release_at_app(units: Daemon) -> None:
    host_app = sorted(os.listdir("/app")) if os.path.isdir("/app") else None
    repo = app_repo(units, "snoop", "appdir")
    (repo / "Procfile").write_text('web: python app.py\n'
                                   'release: touch /app/release.test && echo "release sees HOME=$HOME PWD=$PWD" '
                                   '&& pip --version\n')
    commit(repo, "writes under /app")
    result = push(units, repo, "appdir")
    assert "release sees HOME=/app PWD=/app" in result.stderr
    assert " pip " in result.stderr  # `pip` is there, as `python` is for the web process
    assert get(units, "appdir").text.endswith("home /app")
    assert get(units, "appdir", "/read", params={"path": "/app/release.test"}).content == b""
    assert "app.py" in get(units, "appdir", "/list", params={"path": "/app"}).text.split()
    build = next((units.apps_dir / "appdir" / "builds").iterdir())
    assert (build / "release.test").is_file()  # /app is the release itself
    assert (sorted(os.listdir("/app")) if os.path.isdir("/app") else None) in (host_app, [])  # the host's: untouched


@pytest.fixture(scope="module")
def restartable(tmp_path_factory) -> Iterator[Daemon]:
    """A daemon the tests kill and start again; each leaves it running."""
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp("restartable"))
    yield d
    stop_daemon(d)


def deployments(daemon: Daemon, app: str) -> list[dict]:
    return daemon.api().get(f"apps/{app}/deploys").json()


def test_a_daemon_killed_mid_deploy_leaves_nothing_running_at_its_next_start(restartable: Daemon) -> None:
    d = restartable
    release_sleep = token()
    repo = app_repo(d, "stdlib", "slowrelease")
    push(d, repo, "slowrelease")
    (repo / "Procfile").write_text(f"web: python3 app.py\nrelease: sleep {release_sleep} & sleep {release_sleep}\n")
    commit(repo, "a release phase that never ends")
    push(d, repo, "slowrelease", "-o", "detach")
    waiting = {release_sleep: "slowrelease"}
    if shutil.which("npm"):
        build_sleep = token()
        npm = d.work / "slowbuild"
        npm.mkdir()
        (npm / "package.json").write_text(json.dumps({"name": "slowbuild", "version": "1.0.0", "scripts": {
            "preinstall": f"sleep {build_sleep} & sleep {build_sleep}"}}))
        (npm / "Procfile").write_text("web: python3 -m http.server $PORT\n")
        d.git("init", "-q", "-b", "main", str(npm))
        commit(npm, "a build step that never ends")
        push(d, npm, "slowbuild", "-o", "detach")
        waiting[build_sleep] = "slowbuild"
    for sleep in waiting:
        wait_until(lambda s=sleep: len(holding(s)) >= 2, f"the sleeps of {waiting[sleep]} to start")
    interrupted = {app: deployments(d, app)[0] for app in waiting.values()}
    assert all(deploy["state"] in ("building", "releasing") for deploy in interrupted.values()), interrupted

    d.proc.kill()  # kill -9: no cleanup of its own
    d.proc.wait()
    for sleep in waiting:  # the daemon's own children went with it, not what they started
        assert holding(sleep)
    launch(d)
    for sleep in waiting:
        wait_until(lambda s=sleep: not holding(s), f"the processes of {waiting[sleep]}'s deployment to be killed")
    for app, deploy in interrupted.items():
        assert not (d.apps_dir / app / "builds" / str(deploy["id"])).exists()
        [after] = [x for x in deployments(d, app) if x["id"] == deploy["id"]]
        assert after["state"] == "failed" and "the daemon stopped" in after["error"]
    assert not any((d.data / "run" / "tasks").iterdir())
    assert get(d, "slowrelease").text == "stdlib v1"  # the previous release kept serving


def test_a_supervisor_that_died_while_the_daemon_was_down_is_replaced(restartable: Daemon) -> None:
    d = restartable
    push(d, app_repo(d, "stdlib", "downtime"), "downtime")
    assert d.ssh("ps:scale", "downtime", "web=2").returncode == 0
    before = wait_until(lambda: all(running(d, "downtime", f"web.{n}") for n in (1, 2))
                        and processes(d, "downtime"), "two web processes")
    stop_daemon(d, stop_apps=False)
    os.kill(parent_of(before["web.1"]["pid"]), signal.SIGKILL)
    wait_until(lambda: gone(before["web.1"]["pid"]), "web.1 to die with its supervisor")
    launch(d)
    after = wait_until(lambda: running(d, "downtime", "web.1", not_pid=before["web.1"]["pid"])
                       and processes(d, "downtime"), "web.1 to be started again")
    assert after["web.1"]["port"] == before["web.1"]["port"]
    assert after["web.2"]["pid"] == before["web.2"]["pid"]  # adopted, untouched
    wait_until(lambda: answers(d, "downtime", "stdlib v1"), "the app to answer")
    for _ in range(10):  # both answer, through the router
        assert get(d, "downtime").text == "stdlib v1"
