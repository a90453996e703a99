"""What a release is and what each command makes of it: config changes that go live or change nothing,
scaling without new releases, postdeploy that can take a release back, exactly one live deployment, the
limits on what users set, and what a `read` collaborator may see. Real daemon, ssh, git and HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Daemon, commit, start_daemon, stop_daemon

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp("releases"), extra_args=(
        "--max-config-vars", "20", "--max-config-bytes", "4096", "--max-domains-per-app", "2",
        "--max-replicas-per-type", "3", "--max-replicas-per-app", "4", "--max-history", "10"))
    yield d
    stop_daemon(d)


def app_repo(daemon: Daemon, name: str, fixture: str = "stdlib", files: dict[str, str] | None = None) -> Path:
    path = daemon.work / name
    shutil.copytree(APPS / fixture, path)
    for relative, text in (files or {}).items():
        (path / relative).write_text(text)
    daemon.git("init", "-q", "-b", "main", str(path))
    commit(path, "init")
    return path


def push(daemon: Daemon, repo: Path, app: str, check: bool = True):
    result = daemon.git("push", f"{daemon.ssh_url}/{app}.git", "main", cwd=repo, check=False)
    assert result.returncode == 0 or not check, f"git push failed:\n{result.stderr}"
    return result


def get(daemon: Daemon, app: str, path: str = "/") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{daemon.router_port}{path}", headers={"Host": f"{app}.localhost"},
                     timeout=10)


def versions(daemon: Daemon, app: str) -> list[str]:
    return [r["version"] for r in json.loads(daemon.ssh("releases", app, "--json").stdout)]


def remote_head(daemon: Daemon, app: str) -> str:
    return daemon.git("ls-remote", f"{daemon.ssh_url}/{app}.git", "refs/heads/main").stdout.split("\t")[0]


def test_a_config_change_whose_release_fails_changes_nothing(live: Daemon) -> None:
    push(live, app_repo(live, "cfgtx"), "cfgtx")
    assert live.ssh("config:set", "cfgtx", "MODE=one").returncode == 0
    # The processes cannot start without a PATH to find python3: the release fails its health check.
    failed = live.ssh("config:set", "cfgtx", "PATH=/nonexistent", "MODE=two")
    assert failed.returncode == 1
    assert "the config is unchanged" in failed.stderr and "keeps serving" in failed.stderr
    assert json.loads(live.ssh("config", "cfgtx", "--json").stdout) == {"MODE": "one"}
    assert get(live, "cfgtx", "/env/MODE").text == "one"
    assert versions(live, "cfgtx") == ["v2", "v1"]


def test_a_config_change_that_changes_nothing_makes_no_release(live: Daemon) -> None:
    push(live, app_repo(live, "cfgnoop"), "cfgnoop")
    assert live.ssh("config:set", "cfgnoop", "A=1", "B=2").returncode == 0
    same = live.ssh("config:set", "cfgnoop", "A=1", "--json")
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["release"] is None and "no change" in json.loads(same.stdout)["note"]
    assert versions(live, "cfgnoop") == ["v2", "v1"]
    stored = json.loads(live.ssh("config:set", "--no-restart", "cfgnoop", "A=3", "--json").stdout)
    assert stored["release"] is None and stored["changed"] == ["A"]
    assert get(live, "cfgnoop", "/env/A").text == "1"
    # A restart takes what was stored: a release of its own, so `releases` says what runs.
    assert live.ssh("ps:restart", "cfgnoop").returncode == 0
    assert get(live, "cfgnoop", "/env/A").text == "3" and versions(live, "cfgnoop") == ["v3", "v2", "v1"]


def test_config_is_bounded_in_count_and_size(live: Daemon) -> None:
    push(live, app_repo(live, "cfgbig"), "cfgbig")
    big = live.ssh("config:set", "cfgbig", "BIG=" + "x" * 5000)
    assert big.returncode == 1 and "--max-config-bytes" in big.stderr and "4 KiB" in big.stderr
    many = live.ssh("config:set", "cfgbig", *(f"K{n}=v" for n in range(21)))
    assert many.returncode == 1 and "21 config vars" in many.stderr and "--max-config-vars" in many.stderr
    huge = httpx.patch(f"{live.http}/api/apps/cfgbig/config", headers={"Authorization": f"Bearer {live.token}"},
                       json={"set": ["HUGE=" + "y" * 200_000]}, timeout=30)
    assert huge.status_code == 400 and "HUGE" in huge.json()["error"]
    assert json.loads(live.ssh("config", "cfgbig", "--json").stdout) == {}
    assert versions(live, "cfgbig") == ["v1"]


def test_scaling_checks_the_process_types_and_makes_no_release(live: Daemon) -> None:
    push(live, app_repo(live, "scaler", "workers"), "scaler")
    unknown = live.ssh("ps:scale", "scaler", "wrker=1")
    assert unknown.returncode == 1 and "no wrker process type" in unknown.stderr and "web, worker" in unknown.stderr
    too_many = live.ssh("ps:scale", "scaler", "web=4")
    assert too_many.returncode == 1 and "--max-replicas-per-type" in too_many.stderr
    in_all = live.ssh("ps:scale", "scaler", "web=3", "worker=2")
    assert in_all.returncode == 1 and "5 processes in all" in in_all.stderr
    scaled = live.ssh("ps:scale", "scaler", "web=2", "worker=1")
    assert scaled.returncode == 0, scaled.stderr
    assert "formation: web=2 worker=1" in scaled.stdout and "{" not in scaled.stdout
    processes = {p["process"] for p in live.api().get("apps/scaler/processes").json() if p["state"] != "draining"}
    assert processes == {"web.1", "web.2", "worker.1"}
    again = json.loads(live.ssh("ps:scale", "scaler", "web=2", "--json").stdout)
    assert again["changed"] is False and again["output"] == []
    assert versions(live, "scaler") == ["v1"]  # scaling is not a release, as on Heroku


def test_one_deployment_is_live_and_failures_say_what_still_serves(live: Daemon) -> None:
    first = app_repo(live, "onelive", files={"Procfile": "web: python3 -c 'import sys; sys.exit(3)'\n"})
    failed = push(live, first, "onelive", check=False)
    assert failed.returncode != 0
    assert "nothing was running before" in failed.stderr and "keeps serving" not in failed.stderr
    (first / "Procfile").write_text("web: python3 app.py\n")
    commit(first, "fixed")
    push(live, first, "onelive")
    (first / "app.py").write_text((first / "app.py").read_text().replace('"v1"', '"v2"'))
    commit(first, "v2")
    push(live, first, "onelive")
    states = [d["state"] for d in json.loads(live.ssh("deploys", "onelive", "--json").stdout)]
    assert states == ["live", "inactive", "failed"]
    # A rollback runs the first good build again: its deployment is the live one.
    assert live.ssh("rollback", "onelive", "v1").returncode == 0
    states = [d["state"] for d in json.loads(live.ssh("deploys", "onelive", "--json").stdout)]
    assert states == ["inactive", "live", "failed"]
    (first / "Procfile").write_text("web: python3 -c 'print(\"boom from v3\"); import sys; sys.exit(4)'\n")
    commit(first, "v3 crashes")
    broken = push(live, first, "onelive", check=False)
    assert "the live release v3 keeps serving" in broken.stderr
    # The excerpt is what the new process said, not what earlier releases logged.
    assert "boom from v3" in broken.stderr and "stdlib" not in broken.stderr.split("boom from v3")[0][-2000:]


def test_a_failing_postdeploy_takes_the_release_back(live: Daemon) -> None:
    repo = app_repo(live, "postfail", "healthchecks")
    push(live, repo, "postfail")
    good = remote_head(live, "postfail")
    app_json = json.loads((repo / "app.json").read_text())
    app_json["scripts"]["dokku"]["postdeploy"] = "echo postdeploy fails here; exit 7"
    (repo / "app.json").write_text(json.dumps(app_json))
    (repo / "app.py").write_text((repo / "app.py").read_text().replace("healthchecks v1", "healthchecks v2"))
    commit(repo, "postdeploy fails")
    result = push(live, repo, "postfail", check=False)
    assert result.returncode != 0 and "[remote rejected] main -> main" in result.stderr
    assert "postdeploy fails here" in result.stderr and "routed back to v1" in result.stderr
    assert remote_head(live, "postfail") == good  # the branch still names what runs
    assert get(live, "postfail").text == "healthchecks v1"
    assert versions(live, "postfail") == ["v1"]
    assert [p["release"] for p in live.api().get("apps/postfail/processes").json()] == ["v1"]


def test_an_app_without_web_says_nothing_is_routed(live: Daemon) -> None:
    repo = app_repo(live, "noweb", "workers", files={"Procfile": "worker: python3 worker.py\n"})
    result = push(live, repo, "noweb")
    assert "is live at" not in result.stderr
    assert "has no web process, so nothing is routed to it" in result.stderr


def test_domains_per_app_are_bounded(live: Daemon) -> None:
    push(live, app_repo(live, "doms"), "doms")
    for name in ("a.example.test", "b.example.test"):
        assert live.ssh("domains:add", "doms", name).returncode == 0
    third = live.ssh("domains:add", "doms", "c.example.test")
    assert third.returncode == 1 and "--max-domains-per-app" in third.stderr
    assert live.ssh("domains:add", "doms", "a.example.test").returncode == 0  # already there: no new domain


def test_read_collaborators_see_only_public_facts(live: Daemon) -> None:
    push(live, app_repo(live, "private"), "private")
    reader = live.add_user("reader", {"private": "read"})
    info = json.loads(live.ssh("apps:info", "private", "--json", key=reader).stdout)
    assert info["name"] == "private" and info["release"] == "v1" and info["role"] == "read"
    assert info["url"].startswith("http://private.localhost")
    assert not {"repository", "collaborators", "deploy_branch"} & set(info)
    assert str(live.data) not in json.dumps(info)
    for command in (("logs", "private"), ("ps", "private"), ("config", "private"), ("deploys", "private"),
                    ("releases", "private"), ("resources", "private"), ("collaborators:list", "private"),
                    ("logs", "private", "-f")):
        refused = live.ssh(*command, key=reader)
        assert refused.returncode != 0 and "this needs write" in refused.stderr, command
    assert live.ssh("domains", "private", key=reader).returncode == 0
    clone = live.git("clone", "-q", f"{live.ssh_url}/private.git", str(live.work / "private-clone"), key=reader,
                     check=False)
    assert clone.returncode == 0, clone.stderr
    owner = json.loads(live.ssh("apps:info", "private", "--json").stdout)
    assert owner["role"] == "owner" and owner["repository"].endswith("private.git")  # a platform admin
    listed = {a["name"]: a["role"] for a in json.loads(live.ssh("apps:list", "--json").stdout)}
    assert listed["private"] == "owner"


def test_apps_per_user_and_collaborators_per_app_are_bounded(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, extra_args=("--max-apps-per-user", "2", "--max-collaborators-per-app", "1"))
    try:
        maker = d.add_user("maker")
        for name in ("m1", "m2"):
            assert d.ssh("apps:create", name, key=maker).returncode == 0
        third = d.ssh("apps:create", "m3", key=maker)
        assert third.returncode == 1 and "owns 2 apps already" in third.stderr and "--max-apps-per-user" in third.stderr
        repo = app_repo(d, "m4")
        pushed = d.git("push", f"{d.ssh_url}/m4.git", "main", cwd=repo, key=maker, check=False)
        assert pushed.returncode != 0 and "--max-apps-per-user" in pushed.stderr  # push-to-create counts too
        d.add_user("helper")
        d.add_user("second")
        assert d.ssh("collaborators:add", "m1", "helper", "read", key=maker).returncode == 0
        full = d.ssh("collaborators:add", "m1", "second", "read", key=maker)
        assert full.returncode == 1 and "--max-collaborators-per-app" in full.stderr
        assert d.ssh("collaborators:add", "m1", "helper", "write", key=maker).returncode == 0  # a change, not one more
    finally:
        stop_daemon(d)


def test_a_pushed_formation_past_the_limits_is_refused(live: Daemon) -> None:
    formation = {"formation": {"web": {"quantity": 2}, "worker": {"quantity": 3}}}
    repo = app_repo(live, "bigform", "workers", files={"app.json": json.dumps(formation)})
    result = push(live, repo, "bigform", check=False)
    assert result.returncode != 0 and "5 processes in all" in result.stderr
    assert "--max-replicas-per-app" in result.stderr
    assert live.api().get("apps/bigform/processes").json() == []


def test_commands_do_not_wait_behind_a_deployment_under_way(live: Daemon) -> None:
    repo = app_repo(live, "busy", files={"Procfile": "web: python3 app.py\nrelease: sleep 4\n"})
    push(live, repo, "busy")
    (repo / "app.py").write_text((repo / "app.py").read_text().replace('"v1"', '"v2"'))
    commit(repo, "v2")
    queued = live.git("push", "-o", "detach", f"{live.ssh_url}/busy.git", "main", cwd=repo, check=False)
    assert queued.returncode == 0, queued.stderr
    refused = live.ssh("config:set", "busy", "A=1")
    assert refused.returncode == 1 and "a deployment of busy is under way" in refused.stderr
    for _ in range(300):
        if get(live, "busy").text == "stdlib v2":
            break
        time.sleep(0.1)
    assert live.ssh("config:set", "busy", "A=1").returncode == 0  # once it is done


def test_one_user_may_run_only_a_few_commands_at_once(live: Daemon) -> None:
    slow = {"Procfile": "web: sleep 3 && python3 app.py\n"}  # every restart waits for it to answer
    for n in range(5):
        push(live, app_repo(live, f"slow{n}", files=slow), f"slow{n}")
    bystander = live.add_user("bystander")
    results: list[subprocess.CompletedProcess] = []

    def restart(n: int) -> None:
        results.append(live.ssh("ps:restart", f"slow{n}"))

    threads = [threading.Thread(target=restart, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # in order: the first four are running when the fifth comes
    assert live.ssh("whoami", key=bystander).returncode == 0  # others are served meanwhile
    for thread in threads:
        thread.join()
    refused = [r for r in results if r.returncode != 0]
    assert len(refused) == 1 and "--max-commands-per-user" in refused[0].stderr, [r.stderr for r in results]
    api = httpx.post(f"{live.http}/api/apps/slow0/processes/restart", headers={"Authorization": f"Bearer {live.token}"},
                     timeout=60)
    assert api.status_code == 200  # the limit counts commands running, not commands ever run


def test_health_checks_read_a_bounded_part_of_an_endless_answer(live: Daemon) -> None:
    endless = '''import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"%x\\r\\n%s\\r\\n" % (65536, b"z" * 65536)
        try:
            while True:
                self.wfile.write(chunk)
        except OSError:
            pass
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
'''
    checks = {"healthchecks": {"web": [{"path": "/", "content": "never in it", "attempts": 2, "wait": 1,
                                        "timeout": 3}]}}
    repo = app_repo(live, "endless", files={"app.py": endless, "app.json": json.dumps(checks)})
    status = Path(f"/proc/{live.proc.pid}/status")
    Path(f"/proc/{live.proc.pid}/clear_refs").write_text("5")
    before = int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")))
    result = push(live, repo, "endless", check=False)
    after = int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")))
    assert result.returncode != 0 and "does not contain 'never in it'" in result.stderr, result.stderr
    assert after - before < 100 * 1024, f"the daemon grew by {(after - before) // 1024} MiB"


def test_history_is_bounded(live: Daemon) -> None:
    push(live, app_repo(live, "history"), "history")
    for n in range(11):
        assert live.ssh("config:set", "history", f"N={n}").returncode == 0
    assert versions(live, "history") == [f"v{n}" for n in range(12, 2, -1)]  # the newest ten
    assert live.ssh("rollback", "history", "v2").returncode != 0
