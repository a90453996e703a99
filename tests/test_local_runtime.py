"""The local scheduler and its supervisor: real processes, restarts, graceful stops, logs, health checks."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from runtime.health import Check, HealthCheckFailed, wait_healthy
from runtime.local.app_user import AppUser
from runtime.local.scheduler import Instance, LocalScheduler, free_port
from runtime.process_logs import ProcessLogs

APP = textwrap.dedent("""
    import http.server, os, signal, sys, time
    print("booting", flush=True)
    if os.environ.get("CRASH"):
        sys.exit(3)
    def bye(*_):
        print("got SIGTERM, finishing", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = os.environ.get("BODY", "ok").encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            print("request", self.path, flush=True)
    http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
""")


@pytest.fixture
def scheduler(tmp_path: Path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "app.py").write_text(APP)
    sched = LocalScheduler(tmp_path / "run", ProcessLogs(tmp_path / "logs"), stop_timeout=3)
    yield sched
    for instance in sched.instances():
        asyncio.run(sched.stop(instance))


def start(sched: LocalScheduler, tmp_path: Path, command: str = f"{sys.executable} app.py", **env: str) -> Instance:
    port = free_port()
    full_env = {"PATH": os.environ["PATH"], "PORT": str(port), **env}
    return asyncio.run(sched.start("demo", 1, "web", 1, command, tmp_path / "app", full_env, port))


def wait_for(predicate, attempts: int = 200, delay: float = 0.05) -> bool:
    return bool(wait_for_value(predicate, attempts, delay))


def wait_for_value(predicate, attempts: int = 200, delay: float = 0.05):
    for _ in range(attempts):
        if value := predicate():
            return value
        time.sleep(delay)
    return None


def holding(token: str) -> list[int]:
    """Live processes whose command line names `token`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rpartition(")")[2].split()[0] != "Z" and \
                    token.encode() in stat.with_name("cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except OSError:
            continue
    return found


def test_process_serves_and_logs_with_names(scheduler: LocalScheduler, tmp_path: Path) -> None:
    instance = start(scheduler, tmp_path, BODY="hello")
    asyncio.run(wait_healthy(instance, [Check(name="body", content="hello", attempts=3, wait=0.1)], lambda line: None))
    assert httpx.get(f"http://127.0.0.1:{instance.port}/x").text == "hello"
    assert wait_for(lambda: any("web.1 | request /x" in line for line in scheduler.logs.tail("demo")))
    assert instance.record()["state"] == "running"
    assert scheduler.instances("demo") == [instance]


def test_crashed_child_is_restarted(scheduler: LocalScheduler, tmp_path: Path) -> None:
    instance = start(scheduler, tmp_path, f"{sys.executable} app.py; exit 1")  # a compound: the shell stays
    asyncio.run(wait_healthy(instance, [], lambda line: None))
    shell = instance.status()["child_pid"]
    [app] = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
    os.kill(shell, signal.SIGKILL)
    assert wait_for(lambda: instance.status().get("restarts") == 1 and instance.status()["state"] == "running")
    asyncio.run(wait_healthy(instance, [], lambda line: None))
    stat = Path(f"/proc/{app}/stat")
    assert not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z"  # the orphan went too


def test_a_restart_asked_for_is_not_a_crash(scheduler: LocalScheduler, tmp_path: Path) -> None:
    instance = start(scheduler, tmp_path)
    for restarts in range(1, 7):  # more than the 5 quick crashes after which the supervisor gives up
        asyncio.run(wait_healthy(instance, [], lambda line: None))
        instance.request_restart("asked by the test")
        os.killpg(instance.status()["child_pid"], signal.SIGTERM)
        assert wait_for(lambda n=restarts: instance.status().get("restarts") == n
                        and instance.status()["state"] == "running")
    assert any("restarting it as asked: asked by the test" in line for line in scheduler.logs.tail("demo", 50))


def test_crash_loop_gives_up_and_health_check_says_so(scheduler: LocalScheduler, tmp_path: Path) -> None:
    instance = start(scheduler, tmp_path, CRASH="1")
    with pytest.raises(HealthCheckFailed, match="exited"):
        asyncio.run(wait_healthy(instance, [], lambda line: None))
    assert wait_for(lambda: instance.status()["state"] == "crashed", attempts=400)
    assert any("giving up" in line for line in scheduler.logs.tail("demo"))


def test_stop_is_graceful(scheduler: LocalScheduler, tmp_path: Path) -> None:
    instance = start(scheduler, tmp_path)
    asyncio.run(wait_healthy(instance, [], lambda line: None))
    asyncio.run(scheduler.stop(instance))
    assert not instance.directory.exists()
    assert any("got SIGTERM, finishing" in line for line in scheduler.logs.tail("demo"))
    assert scheduler.instances("demo") == []


def test_wrong_content_fails_the_check(scheduler: LocalScheduler, tmp_path: Path) -> None:
    instance = start(scheduler, tmp_path, BODY="sick")
    lines: list[str] = []
    with pytest.raises(HealthCheckFailed, match="does not contain 'well'"):
        asyncio.run(wait_healthy(instance, [Check(name="body", content="well", attempts=2, wait=0.05)], lines.append))
    assert len([line for line in lines if "attempt" in line]) == 2


def test_run_once_streams_output(scheduler: LocalScheduler, tmp_path: Path) -> None:
    lines: list[str] = []
    code = asyncio.run(scheduler.run_once("demo", "release", "echo one; echo two; exit 4", tmp_path / "app",
                                          {"PATH": os.environ["PATH"]}, lines.append))
    assert code == 4
    assert lines == ["one", "two"]
    assert any(line.endswith("release | two") for line in scheduler.logs.tail("demo", process="release"))


def test_run_once_times_out_and_kills_the_group(scheduler: LocalScheduler, tmp_path: Path) -> None:
    lines: list[str] = []
    code = asyncio.run(scheduler.run_once("demo", "release", "sleep 30 & sleep 30; echo never", tmp_path / "app",
                                          {"PATH": os.environ["PATH"]}, lines.append, timeout=0.5))
    assert code != 0
    assert lines == ["release did not finish within 0.5s; stopped"]


def test_a_chatty_process_keeps_its_log_bounded(tmp_path: Path) -> None:
    (tmp_path / "chatty").mkdir()
    (tmp_path / "chatty" / "chatty.py").write_text(
        "import time\nfor n in range(3000):\n    print('chatter', n, flush=True)\nprint('done', flush=True)\n"
        "time.sleep(600)\n")
    limit = 16 * 1024
    sched = LocalScheduler(tmp_path / "run", ProcessLogs(tmp_path / "logs", max_bytes=limit), stop_timeout=3)
    instance = asyncio.run(sched.start("chatty", 1, "worker", 1, f"{sys.executable} chatty.py", tmp_path / "chatty",
                                       {"PATH": os.environ["PATH"]}, free_port()))
    try:
        assert wait_for(lambda: any(line.endswith("| done") for line in sched.logs.tail("chatty", 5)))
        current = sched.logs.path("chatty")
        previous = current.with_name("app.log.1")
        assert previous.exists()
        assert current.stat().st_size <= limit + 200 and previous.stat().st_size <= limit + 200
        kept = [line for line in sched.logs.tail("chatty", 0) if "| chatter" in line]
        numbers = [int(line.rsplit(" ", 1)[1]) for line in kept]
        assert numbers == list(range(3000 - len(numbers), 3000))  # the newest lines, none lost between files
    finally:
        asyncio.run(sched.stop(instance))


def test_run_once_ends_what_it_left_when_it_exits(scheduler: LocalScheduler, tmp_path: Path) -> None:
    sleep = f"3600.{os.getpid()}"
    lines: list[str] = []
    code = asyncio.run(scheduler.run_once("demo", "release", f"sleep {sleep} & echo started", tmp_path / "app",
                                          {"PATH": os.environ["PATH"]}, lines.append, timeout=120))
    assert code == 0 and lines == ["started"]  # not a timeout: the sleep held the output open until killed
    assert not holding(sleep)


def test_what_left_the_process_group_goes_when_the_process_exits(scheduler: LocalScheduler, tmp_path: Path) -> None:
    """Without cgroups (this scheduler has none) a unit is process groups: the supervisor, a child subreaper,
    kills what escaped into a session of its own."""
    assert scheduler.cgroups is None
    sleep = f"3600.{os.getpid()}"
    instance = start(scheduler, tmp_path, f"(setsid sleep {sleep} &); {sys.executable} app.py")
    asyncio.run(wait_healthy(instance, [], lambda line: None))
    [helper] = wait_for_value(lambda: holding(sleep))
    os.kill(instance.status()["child_pid"], signal.SIGKILL)
    assert wait_for(lambda: instance.status().get("restarts") == 1 and instance.status()["state"] == "running")
    assert wait_for(lambda: helper not in holding(sleep))
    assert len(wait_for_value(lambda: holding(sleep))) == 1  # the new process's own


@pytest.mark.skipif(os.getuid() != 0, reason="handing a directory to another uid needs root")
def test_hand_over_replaces_a_planted_link_instead_of_following_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "pip").symlink_to(elsewhere)  # what the app's user could leave in its own cache
    user = AppUser.numbered(700_000_999)
    user.hand_over(cache / "pip")
    assert not (cache / "pip").is_symlink()
    assert (cache / "pip").stat().st_uid == 700_000_999 and (cache / "pip").stat().st_mode & 0o777 == 0o700
    assert elsewhere.stat().st_uid == 0 and elsewhere.stat().st_mode & 0o777 == 0o755
