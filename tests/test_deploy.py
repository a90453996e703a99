"""Push to a live URL on the embedded default: the real daemon, git, ssh and HTTP through the router."""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    DEVFLOW,
    ROOT,
    Daemon,
    commit,
    launch,
    make_repo,
    start_daemon,
    stop_app_processes,
    stop_daemon,
)

from runtime.local.release_mount import mount_point

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp("deploy"))
    yield d
    stop_daemon(d)


def app_repo(daemon: Daemon, fixture: str, name: str) -> Path:
    """A git repo holding a copy of tests/apps/<fixture>."""
    path = daemon.work / name
    shutil.copytree(APPS / fixture, path)
    daemon.git("init", "-q", "-b", "main", str(path))
    commit(path, "init")
    return path


def get(daemon: Daemon, app: str, path: str = "/", **kwargs) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{daemon.router_port}{path}", headers={"Host": f"{app}.localhost"},
                     timeout=10, **kwargs)


def push(daemon: Daemon, repo: Path, app: str, *args: str, check: bool = True):
    result = daemon.git("push", *args, f"{daemon.ssh_url}/{app}.git", "main", cwd=repo, check=False)
    assert result.returncode == 0 or not check, f"git push failed:\n{result.stderr}"
    return result


def remote_head(daemon: Daemon, app: str) -> str:
    return daemon.git("ls-remote", f"{daemon.ssh_url}/{app}.git", "refs/heads/main").stdout.split("\t")[0]


def test_push_deploys_to_a_live_url(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "web1")
    result = push(live, repo, "web1")
    out = result.stderr
    for stage in ("Deployment #", "Released v1", f"web1 is live at http://web1.localhost:{live.router_port}"):
        assert stage in out
    assert get(live, "web1").text == "stdlib v1"
    assert get(live, "web1", "/env/DEVFLOW_APP").text == "web1"
    assert get(live, "web1", "/env/DEVFLOW_RELEASE").text == "v1"
    assert get(live, "web1", "/env/PORT").text.isdigit()
    assert "web1" in live.ssh("logs", "web1").stdout


def test_config_changes_release_without_rebuild(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "cfg")
    push(live, repo, "cfg")
    tricky = "line one\nline 'two' \"three\" ünïcödé $HOME `x`"
    encoded = base64.b64encode(tricky.encode()).decode()
    result = live.ssh("config:set", "--encoded", "cfg", f"TRICKY={encoded}")
    assert result.returncode == 0, result.stderr
    assert "Deployment #" not in result.stdout and "release: v2" in result.stdout
    assert get(live, "cfg", "/env/TRICKY").text == tricky
    assert live.ssh("config:get", "cfg", "TRICKY").stdout == tricky + "\n"
    result = live.ssh("config:set cfg 'GREETING=hello there'")
    assert result.returncode == 0, result.stderr
    assert get(live, "cfg", "/env/GREETING").text == "hello there"
    assert live.ssh("config:unset", "cfg", "GREETING").returncode == 0
    assert get(live, "cfg", "/env/GREETING").text == ""
    releases = live.ssh("releases", "cfg").stdout
    assert [line.split()[0] for line in releases.splitlines()[1:]] == ["v4", "v3", "v2", "v1"]
    assert "ünïcödé" not in releases and "ünïcödé" not in live.log.read_text()


def test_bad_config_refused(live: Daemon) -> None:
    app_repo(live, "stdlib", "cfgbad")
    push(live, live.work / "cfgbad", "cfgbad")
    for bad in ("1X=y", "PORT=1", "NOEQUALS"):
        result = live.ssh("config:set", "cfgbad", bad)
        assert result.returncode != 0 and "error:" in result.stderr
    assert live.ssh("releases", "cfgbad").stdout.count("\nv") == 1


def test_rollback(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "rb")
    push(live, repo, "rb")
    (repo / "app.py").write_text((repo / "app.py").read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
    commit(repo, "v2")
    push(live, repo, "rb")
    assert get(live, "rb").text == "stdlib v2"
    result = live.ssh("rollback", "rb", "v1")
    assert result.returncode == 0, result.stderr
    assert get(live, "rb").text == "stdlib v1"
    assert "rollback to v1" in live.ssh("releases", "rb").stdout
    assert live.ssh("rollback", "rb", "v9").returncode != 0


def test_failing_release_phase_keeps_the_old_release(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "relfail")
    push(live, repo, "relfail")
    good = remote_head(live, "relfail")
    shutil.copy(APPS / "release-fails" / "Procfile", repo / "Procfile")
    commit(repo, "release fails")
    result = push(live, repo, "relfail", check=False)
    assert result.returncode != 0
    assert "[remote rejected] main -> main" in result.stderr
    assert "release phase" in result.stderr
    assert remote_head(live, "relfail") == good
    assert get(live, "relfail").text == "stdlib v1"


@pytest.mark.parametrize("fixture, why", [("unhealthy", "health check"), ("crashes", "exited"),
                                          ("build-fails", "build")])
def test_bad_deploys_are_rejected(live: Daemon, fixture: str, why: str) -> None:
    name = f"bad-{fixture}"
    repo = app_repo(live, "stdlib", name)
    push(live, repo, name)
    good = remote_head(live, name)
    for path in repo.iterdir():
        if path.name != ".git":
            (shutil.rmtree if path.is_dir() else Path.unlink)(path)
    shutil.copytree(APPS / fixture, repo, dirs_exist_ok=True)
    commit(repo, fixture)
    result = push(live, repo, name, check=False)
    assert result.returncode != 0
    assert why in result.stderr
    assert remote_head(live, name) == good
    assert get(live, name).text == "stdlib v1"
    assert [p["release"] for p in live.api().get(f"apps/{name}/processes").json()] == ["v1"]


def test_workers_release_phase_and_scale(live: Daemon) -> None:
    repo = app_repo(live, "workers", "wk")
    push(live, repo, "wk")
    assert get(live, "wk", "/release").text == "release ran for v1"
    assert live.ssh("ps:scale", "wk", "web=2", "worker=1").returncode == 0
    processes = {p["process"]: p for p in live.api().get("apps/wk/processes").json()}
    assert set(processes) == {"web.1", "web.2", "worker.1"}
    ports = set()
    for _ in range(20):
        ports.add(get(live, "wk", "/env/PORT").text)
    assert len(ports) == 2
    for _ in range(100):
        if "worker tick" in live.ssh("logs", "wk", "--process", "worker").stdout:
            break
        time.sleep(0.1)
    assert "worker.1 | worker tick" in live.ssh("logs", "wk", "--process", "worker").stdout


def _ticks_from(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Run a following `logs` client until it has shown two new worker ticks; then stop it."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the worker ticks every second: bounded by the fixture, not by a clock
            if "| worker tick" in line:
                seen.append(line.rstrip("\n"))
            if len(seen) >= 12:
                break
    finally:
        proc.kill()
        _, errors = proc.communicate(timeout=30)
    assert seen, errors
    return seen


def test_logs_follow_over_ssh_cli_and_api(live: Daemon) -> None:
    repo = app_repo(live, "workers", "follow")
    push(live, repo, "follow")
    assert live.ssh("ps:scale", "follow", "web=1", "worker=1").returncode == 0
    cli_env = {**os.environ, "DEVFLOW_URL": live.http, "DEVFLOW_TOKEN": live.token,
               "XDG_CONFIG_HOME": str(live.work / "no-config")}
    for argv, env in (([*live.ssh_command().split(), "git@127.0.0.1", "logs", "follow", "-f", "-n", "1",
                        "--process", "worker"], None),
                      ([*DEVFLOW, "logs", "follow", "--follow", "--tail", "1", "-p", "worker"], cli_env)):
        ticks = _ticks_from(argv, env)
        numbers = [int(line.rsplit(" ", 1)[1]) for line in ticks]
        # One line of tail, then the ticks as the worker prints them: in order, none missing.
        assert len(numbers) >= 12 and numbers == list(range(numbers[0], numbers[0] + len(numbers))), ticks
        assert all("worker.1 | worker tick" in line for line in ticks)

    with live.api() as api:
        missing = api.get("apps/no-such-app/logs", params={"follow": "1"})
        assert missing.status_code == 404 and "error" in missing.json()
    refused = subprocess.run([*DEVFLOW, "logs", "follow", "-f"], capture_output=True, text=True, cwd=ROOT,
                             env={**cli_env, "DEVFLOW_TOKEN": "not-a-token"}, timeout=60)
    assert refused.returncode == 1 and refused.stderr.startswith("devflow: "), refused.stderr


def test_healthchecks_and_deploy_hooks(live: Daemon) -> None:
    repo = app_repo(live, "healthchecks", "hc")
    result = push(live, repo, "hc")
    assert "predeploy" in result.stderr and "passed" in result.stderr
    assert get(live, "hc", "/hooks").text == "predeploy,postdeploy"


def test_detach_returns_before_the_deploy(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "det")
    result = push(live, repo, "det", "-o", "detach")
    assert "Queued" in result.stderr and "is live" not in result.stderr
    for _ in range(200):
        try:
            if get(live, "det").text == "stdlib v1":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert get(live, "det").text == "stdlib v1"


def test_unknown_host_and_custom_domain(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "dom")
    push(live, repo, "dom")
    response = httpx.get(f"http://127.0.0.1:{live.router_port}/", headers={"Host": "nope.localhost"})
    assert response.status_code == 404
    assert live.ssh("domains:add", "dom", "www.example.test").returncode == 0
    response = httpx.get(f"http://127.0.0.1:{live.router_port}/", headers={"Host": "www.example.test"})
    assert response.text == "stdlib v1"
    assert live.ssh("domains:add", "dom", "not a domain").returncode != 0


def test_domain_added_during_a_deploy_is_routed_to_the_new_release(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "middom")
    push(live, repo, "middom")
    # v2 takes a few seconds to start listening: the domain arrives while its health check waits.
    (repo / "Procfile").write_text("web: sleep 4 && python3 app.py\n")
    (repo / "app.py").write_text((repo / "app.py").read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
    commit(repo, "slow v2")
    push(live, repo, "middom", "-o", "detach")
    for _ in range(300):
        [newest, *_] = live.api().get("apps/middom/deploys").json()
        if newest["stage"] == "health checks":
            break
        time.sleep(0.1)
    assert newest["stage"] == "health checks", newest
    assert live.ssh("domains:add", "middom", "mid.example.test").returncode == 0
    for _ in range(600):
        if live.api().get("apps/middom/deploys").json()[0]["state"] in ("live", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert live.api().get("apps/middom/deploys").json()[0]["state"] == "live"
    response = httpx.get(f"http://127.0.0.1:{live.router_port}/", headers={"Host": "mid.example.test"})
    assert response.text == "stdlib v2"


class Hammer:
    """Threads sending requests to an app through the router until stopped, counting every failure."""

    def __init__(self, daemon: Daemon, app: str, threads: int = 4) -> None:
        self.url = f"http://127.0.0.1:{daemon.router_port}/"
        self.host = f"{app}.localhost"
        self.failures: list[str] = []
        self.ok = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._hammer) for _ in range(threads)]

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _hammer(self) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(20000):
                if self._stop.is_set():
                    return
                try:
                    response = client.get(self.url, headers={"Host": self.host})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"HTTP {response.status_code}")


def test_no_request_fails_through_redeploys(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "load")
    push(live, repo, "load")
    with Hammer(live, "load") as load:
        for version in ("v2", "v3"):
            text = (repo / "app.py").read_text()
            (repo / "app.py").write_text(text.replace(text.split('VERSION = "')[1][:2], version, 1))
            commit(repo, version)
            push(live, repo, "load")
            assert live.ssh("config:set", "load", f"ROUND={version}").returncode == 0
        assert live.ssh("ps:restart", "load").returncode == 0
    assert get(live, "load").text == "stdlib v3"
    assert load.failures == [], load.failures[:5]
    assert load.ok > 100


def test_daemon_restart_keeps_apps_serving(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    try:
        repo = app_repo(daemon, "stdlib", "keep")
        push(daemon, repo, "keep")
        port = daemon.api().get("apps/keep/processes").json()[0]["port"]
        with Hammer(daemon, "keep") as load:  # the router process outlives the daemon, as the apps do
            stop_daemon(daemon, stop_apps=False)
            assert get(daemon, "keep").text == "stdlib v1"
            launch(daemon)
        assert load.failures == [], load.failures[:5]
        assert load.ok > 0
        assert get(daemon, "keep").text == "stdlib v1"
        assert daemon.api().get("apps/keep/processes").json()[0]["port"] == port
        stop_daemon(daemon, stop_apps=False)
        stop_app_processes(daemon.data)
        launch(daemon)  # as after a reboot: nothing runs, the last live release comes back
        assert get(daemon, "keep").text == "stdlib v1"
        assert daemon.ssh("ps:stop", "keep").returncode == 0
        assert get(daemon, "keep").status_code == 503
        stop_daemon(daemon, stop_apps=False)
        launch(daemon)  # a stopped app stays stopped
        assert get(daemon, "keep").status_code == 503
        assert daemon.ssh("ps:start", "keep").returncode == 0
        assert get(daemon, "keep").text == "stdlib v1"
    finally:
        stop_daemon(daemon)


def built_with(tool: str, *values: object) -> object:
    """A fixture app whose build needs `tool` on the build host (CI installs them all)."""
    return pytest.param(*values, marks=pytest.mark.skipif(shutil.which(tool) is None,
                                                          reason=f"needs {tool} on the build host"))


@pytest.mark.parametrize("fixture, expected, reused", [
    ("flask", "flask", "Reusing the Python environment"),
    built_with("npm", "node", "node", "Reusing node_modules"),
    ("static", "static", None),
    built_with("uv", "uv", "uv v1 with six 1.", "Reusing the Python environment"),
    built_with("poetry", "poetry", "poetry v1 with six 1.", "Reusing the Python environment"),
    built_with("pipenv", "pipenv", "pipenv v1 with six 1.", "Reusing the Python environment"),
    built_with("yarn", "yarn", "yarn v1 with ms 1m", "Reusing node_modules"),
    built_with("pnpm", "pnpm", "pnpm v1 with ms 1m", "Reusing node_modules"),
    built_with("go", "go", "go v1", None),
])
def test_language_fixtures_deploy_and_reuse_dependencies(live: Daemon, fixture: str, expected: str,
                                                         reused: str | None) -> None:
    name = f"lang-{fixture}"
    repo = app_repo(live, fixture, name)
    first = push(live, repo, name)
    assert "is live at" in first.stderr
    assert expected in get(live, name).text.lower()
    commit(repo, "redeploy", allow_empty=True)
    second = push(live, repo, name)
    if reused:
        assert reused in second.stderr
    assert expected in get(live, name).text.lower()


def test_resource_limits_apply_to_the_processes(live: Daemon) -> None:
    repo = app_repo(live, "stdlib", "limited")
    push(live, repo, "limited")
    result = live.ssh("resources:set", "limited", "memory=96M", "cpu=0.5")
    assert result.returncode == 0, result.stderr
    shown = live.ssh("resources", "limited", "--json").stdout
    assert '"memory": 100663296' in shown and '"cpu": 0.5' in shown
    process = live.api().get("apps/limited/processes").json()[0]
    assert process["memory"] == "96M" and process["cpu"] == 0.5
    pid = process["pid"]
    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    if "devflow" in cgroups:
        memory = next(line.split(":", 2)[2] for line in cgroups.splitlines()
                      if ":memory:" in line or line.startswith("0::"))
        base = Path("/sys/fs/cgroup") / ("memory" if ":memory:" in cgroups else "") / memory.lstrip("/")
        limit = base / ("memory.limit_in_bytes" if ":memory:" in cgroups else "memory.max")
        assert limit.read_text().strip() == str(96 * 1024**2)
    else:  # cgroups not writable on this machine: the rlimit fallback
        assert str(96 * 1024**2) in Path(f"/proc/{pid}/limits").read_text()
    assert get(live, "limited").text == "stdlib v1"
    for bad in ("memory=lots", "cpu=-1", "disk=1G"):
        assert live.ssh("resources:set", "limited", bad).returncode != 0
    assert live.ssh("resources:clear", "limited").returncode == 0
    live_processes = [p for p in live.api().get("apps/limited/processes").json() if p["state"] != "draining"]
    assert [p["memory"] for p in live_processes] == ["2048M"]  # the platform's default, --max-process-memory


def test_newer_push_supersedes_a_queued_one(live: Daemon) -> None:
    """A slow deploy runs; of two detached pushes queued behind it, only the newest deploys."""
    repo = app_repo(live, "stdlib", "queue")
    (repo / "Procfile").write_text("web: python3 app.py\nrelease: sleep 5\n")
    commit(repo, "slow release phase")
    push(live, repo, "queue", "-o", "detach")
    for _ in range(100):  # until the first deployment holds the app (it is past the export)
        if live.api().get("apps/queue/deploys").json()[0]["state"] in ("building", "releasing"):
            break
        time.sleep(0.05)
    for version in ("v2", "v3"):
        (repo / "app.py").write_text((repo / "app.py").read_text().replace(
            'VERSION = "v1"' if version == "v2" else 'VERSION = "v2"', f'VERSION = "{version}"'))
        commit(repo, version)
        push(live, repo, "queue", "-o", "detach")
    for _ in range(300):
        states = [d["state"] for d in live.api().get("apps/queue/deploys").json()]
        if states[0] in ("live", "failed"):
            break
        time.sleep(0.1)
    assert states == ["live", "cancelled", "inactive"], states  # one deployment is live: the one serving
    assert get(live, "queue").text == "stdlib v3"
    listing = live.ssh("deploys", "queue").stdout
    assert "cancelled" in listing and listing.count("live") == 1 and "inactive" in listing


def test_symlink_chain_out_of_the_app_is_refused(live: Daemon) -> None:
    """Each link alone looks harmless (its text stays inside); followed in turn they reach /etc/passwd."""
    repo = app_repo(live, "stdlib", "links")
    deep = repo.joinpath(*(f"d{i}" for i in range(1, 12)))
    deep.mkdir(parents=True)
    (deep / "up").symlink_to("/".join([".."] * 11))
    (repo / ".python-version").symlink_to("/".join([*(f"d{i}" for i in range(1, 12)), "up", *[".."] * 12,
                                                    "etc", "passwd"]))
    commit(repo, "escaping chain")
    result = push(live, repo, "links", check=False)
    assert result.returncode != 0
    assert "leads outside the app" in result.stderr
    assert "root:" not in result.stderr


def test_hostnames_cannot_be_taken_over(live: Daemon) -> None:
    for name in ("owner", "thief"):
        push(live, app_repo(live, "stdlib", name), name)
    assert live.ssh("domains:add", "owner", "shop.example.test").returncode == 0
    taken = live.ssh("domains:add", "thief", "shop.example.test")
    assert taken.returncode != 0 and "another app" in taken.stderr
    platform = live.ssh("domains:add", "thief", "owner.localhost")
    assert platform.returncode != 0 and "platform domain" in platform.stderr
    response = httpx.get(f"http://127.0.0.1:{live.router_port}/", headers={"Host": "shop.example.test"})
    assert response.text == "stdlib v1"
    assert get(live, "owner", "/env/DEVFLOW_APP").text == "owner"


def test_rollback_brings_the_old_config_back(live: Daemon) -> None:
    push(live, app_repo(live, "stdlib", "rbcfg"), "rbcfg")
    assert live.ssh("config:set", "rbcfg", "MODE=old").returncode == 0  # v2
    assert live.ssh("config:set", "rbcfg", "MODE=new").returncode == 0  # v3
    assert live.ssh("rollback", "rbcfg", "v2").returncode == 0
    assert get(live, "rbcfg", "/env/MODE").text == "old"
    assert live.ssh("config:get", "rbcfg", "MODE").stdout == "old\n"
    assert live.ssh("ps:scale", "rbcfg", "web=1").returncode == 0  # a later release keeps it
    assert get(live, "rbcfg", "/env/MODE").text == "old"


def add_submodule(daemon: Daemon, repo: Path, path: str, url: str, sha: str) -> None:
    """A gitlink plus its .gitmodules entry, as `git submodule add` would leave them."""
    with (repo / ".gitmodules").open("a") as modules:
        modules.write(f'[submodule "{path}"]\n\tpath = {path}\n\turl = {url}\n')
    daemon.git("add", ".gitmodules", cwd=repo)
    daemon.git("update-index", "--add", "--cacheinfo", f"160000,{sha},{path}", cwd=repo)
    daemon.git("commit", "-qm", f"submodule {path}", cwd=repo)  # not `add -A`: it would drop the gitlink


@pytest.mark.skipif(os.getuid() != 0, reason="apps run as uids of their own only under a root daemon")
def test_each_app_runs_as_its_own_uid_and_cannot_read_another(live: Daemon) -> None:
    push(live, app_repo(live, "stdlib", "victim"), "victim")
    assert live.ssh("config:set", "victim", "SECRET=victim-only").returncode == 0
    assert get(live, "victim", "/env/SECRET").text == "victim-only"
    push(live, app_repo(live, "snoop", "snoop"), "snoop")

    def snoop(path: str, what: str = "read") -> str:
        return get(live, "snoop", f"/{what}", params={"path": path}).text

    identity = get(live, "snoop").text.split()
    uid, home = int(identity[1]), identity[5]
    assert uid >= 700_000_000 and identity[3] == str(uid)
    assert home == "/app" if mount_point() else home.startswith(str(live.apps_dir / "snoop" / "builds"))
    assert "DEVFLOW_APP=snoop" in snoop("/proc/self/environ")  # its own environment, yes

    victim_pid = live.api().get("apps/victim/processes").json()[0]["pid"]
    victim_uid = int(next(line.split()[1] for line in Path(f"/proc/{victim_pid}/status").read_text().splitlines()
                          if line.startswith("Uid:")))
    assert victim_uid >= 700_000_000 and victim_uid != uid
    victim_build = next((live.apps_dir / "victim" / "builds").iterdir())
    assert victim_build.stat().st_uid == victim_uid
    # Another app's secrets, code, dependencies and build logs are out of reach.
    assert snoop(f"/proc/{victim_pid}/environ") == "PermissionError"
    assert snoop(str(victim_build / "app.py")) == "PermissionError"
    assert snoop(str(live.apps_dir / "victim" / "cache"), "list") == "PermissionError"
    victim_log = next((live.data / "logs" / "victim" / "deployments").glob("*.log"))
    assert snoop(str(victim_log)) == "PermissionError"
    assert snoop(str(live.data / "logs" / "victim" / "app.log")) == "PermissionError"
    # The uid stays with the app: a redeploy runs as the same one.
    push(live, app_repo(live, "snoop", "snoop-again"), "snoop", "--force")
    assert int(get(live, "snoop").text.split()[1]) == uid
    # Destroyed and made again, the name gets a fresh uid: nothing the old app left behind is the new one's.
    assert live.ssh("apps:destroy", "snoop", "--force").returncode == 0
    push(live, app_repo(live, "snoop", "snoop-reborn"), "snoop")
    assert int(get(live, "snoop").text.split()[1]) > max(uid, victim_uid)


@pytest.mark.skipif(os.getuid() != 0, reason="--app-user only applies under a root daemon")
def test_app_user_runs_every_app_as_one_named_user(tmp_path_factory) -> None:
    d = start_daemon(tmp_path_factory.mktemp("shared-user"), extra_args=("--app-user", "nobody"))
    try:
        repo = app_repo(d, "snoop", "shared")
        push(d, repo, "shared")
        assert get(d, "shared").text.split()[1] == str(pwd.getpwnam("nobody").pw_uid)
        # Back to a uid per app, as when a DevFlow that ran every app as nobody is upgraded: the app, still
        # running as nobody, is restarted as its own user, and its builds and caches become its own.
        stop_daemon(d, stop_apps=False)
        d.extra_args = ("--apps-dir", str(d.apps_dir))
        launch(d)
        uid = int(get(d, "shared").text.split()[1])
        assert uid >= 700_000_000
        trees = [d.apps_dir / "shared" / tree for tree in ("cache", "builds")]
        owners = {path.lstat().st_uid for tree in trees for path in tree.rglob("*")}
        assert owners == {uid}
        commit(repo, "redeploy", allow_empty=True)
        push(d, repo, "shared")
        assert int(get(d, "shared").text.split()[1]) == uid
    finally:
        stop_daemon(d)


def test_a_wedged_process_failing_its_liveness_check_is_restarted(live: Daemon) -> None:
    push(live, app_repo(live, "liveness", "wedge"), "wedge")
    before = get(live, "wedge", "/alive").text
    assert before.startswith("alive pid")
    assert get(live, "wedge", "/wedge").status_code == 200
    assert get(live, "wedge", "/alive").status_code == 500  # up, but wedged: only a liveness check notices

    after = ""
    for _ in range(300):  # the check runs every second and restarts after 2 failures; 30 s is ample
        response = get(live, "wedge", "/alive")
        if response.status_code == 200:
            after = response.text
            break
        time.sleep(0.1)
    assert after.startswith("alive pid") and after != before  # a fresh process answers
    [web] = live.api().get("apps/wedge/processes").json()
    assert web["restarts"] >= 1 and web["state"] == "running"
    lines = live.ssh("logs", "wedge").stdout.splitlines()
    assert any("liveness check 'web stays alive' failed 2 times" in line for line in lines)
    assert any("restarting it as asked: liveness check" in line for line in lines)  # not counted as a crash


def test_a_declared_check_passes_on_2xx_or_3xx_only(live: Daemon) -> None:
    """Like Dokku's checks-root app: it answers 404 on '/', which only the default listening probe accepts."""
    repo = app_repo(live, "checks-404", "checks404")
    first = push(live, repo, "checks404")
    assert "is live at" in first.stderr  # no app.json checks: answering HTTP at all is enough
    (repo / "app.json").write_text('{"healthchecks": {"web": [{"path": "/", "attempts": 2, "wait": 0}]}}')
    commit(repo, "check the root")
    refused = push(live, repo, "checks404", check=False)
    assert refused.returncode != 0
    assert "GET /: HTTP 404" in refused.stderr
    (repo / "app.json").write_text('{\n  // the path that answers\n  "healthchecks": {"web": [{"path": "/ok",},],},\n}')
    commit(repo, "check /ok, in JSONC")
    assert "is live at" in push(live, repo, "checks404").stderr
    assert get(live, "checks404", "/ok").text == "checks-404 v1"


@pytest.mark.skipif(shutil.which("npm") is None, reason="the app's build script needs npm")
def test_the_build_sees_the_apps_config_vars(live: Daemon) -> None:
    package = {"name": "app", "version": "1.0.0", "scripts": {
        "build": "node -e \"require('fs').writeFileSync('built.txt', process.env.GREETING || 'unset')\""}}
    repo = make_repo(live.work / "buildenv", {"package.json": json.dumps(package),
                                              "Procfile": "web: python3 -m http.server $PORT\n"})
    assert live.ssh("apps:create", "buildenv").returncode == 0
    assert live.ssh("config:set", "buildenv", "GREETING=from-config").returncode == 0
    push(live, repo, "buildenv")
    assert get(live, "buildenv", "/built.txt").text == "from-config"
