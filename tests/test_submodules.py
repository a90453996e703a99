"""Submodules through real pushes to a real daemon: nothing a push names is fetched with the daemon's privileges.

A URL that reaches this DevFlow's own repositories, however it is spelt, is one of its apps, and only one the
pusher can read; a network URL is fetched as the app's own uid (seen from the server's side: a `git daemon`
on loopback whose access hook looks up who owns the client's socket); anything else is refused with a message
that says nothing of what exists on the host.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, commit, free_port, launch, make_repo, start_daemon, stop_daemon
from test_deploy import add_submodule, app_repo, get, push
from test_local_runtime import holding
from test_process_units import wait_until

from pipeline.remote_fetch import RemoteFetch

TIMEOUT = 15  # --submodule-timeout of this module's daemon
NOT_AN_APP = "is not an app you can read on this DevFlow, nor a network URL (https, http, ssh or git)"
# /proc/net/tcp names each socket's owner: the client's socket is the one whose local port the server saw.
ACCESS_HOOK = """\
import os, sys
port = int(os.environ["REMOTE_PORT"])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            with open(sys.argv[1], "a") as log:
                log.write(f"{fields[7]} {sys.argv[3]}\\n")
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp("submodules"), extra_args=("--submodule-timeout", str(TIMEOUT)))
    yield d
    stop_daemon(d)


@pytest.fixture(scope="module")
def lib(served: Daemon) -> str:
    """The app `sublib`, the admin's, with one commit on a branch that does not deploy."""
    repo = make_repo(served.work / "sublib-src", {"greeting.txt": "hello from the submodule\n"}, branch="trunk")
    served.git("push", "-q", f"{served.ssh_url}/sublib.git", "trunk", cwd=repo)
    return served.git("rev-parse", "HEAD", cwd=repo).stdout.strip()


@pytest.fixture(scope="module")
def outsider(served: Daemon) -> Path:
    return served.add_user("outsider")


@pytest.fixture(scope="module")
def reader(served: Daemon, lib: str) -> Path:
    return served.add_user("reader", {"sublib": "read"})


def latest_build(daemon: Daemon, app: str) -> Path:
    return max((daemon.apps_dir / app / "builds").iterdir(), key=lambda p: int(p.name))


def push_as(daemon: Daemon, repo: Path, app: str, key: Path | None = None):
    return daemon.git("push", f"{daemon.ssh_url}/{app}.git", "main", cwd=repo, key=key, check=False)


def refusal(result: subprocess.CompletedProcess) -> str:
    """The daemon's reason, as the pusher reads it."""
    assert result.returncode != 0, result.stderr
    reasons = [line for line in result.stderr.splitlines() if "push refused:" in line]
    assert reasons, result.stderr
    return reasons[0].split("push refused:", 1)[1].strip()


def app_uid(daemon: Daemon, app: str) -> int:
    pid = daemon.api().get(f"apps/{app}/processes").json()[0]["pid"]
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("Uid:")))


def test_a_relative_url_names_an_app_the_pusher_can_read(served: Daemon, lib: str, outsider: Path) -> None:
    repo = app_repo(served, "stdlib", "subapp")
    add_submodule(served, repo, "vendor/lib", "../sublib.git", lib)
    result = push(served, repo, "subapp")
    assert f"submodule vendor/lib at {lib[:12]} from ../sublib.git" in result.stderr
    assert (latest_build(served, "subapp") / "vendor/lib/greeting.txt").read_text() == "hello from the submodule\n"
    assert get(served, "subapp").text == "stdlib v1"

    other = app_repo(served, "stdlib", "nosy")
    add_submodule(served, other, "vendor/lib", "../sublib.git", lib)
    assert refusal(push_as(served, other, "nosy", outsider)) == \
        f"deploy failed at export: submodule vendor/lib: ../sublib.git {NOT_AN_APP}"


def spellings(daemon: Daemon) -> list[str]:
    """Every way a submodule URL can name the app sublib on this daemon."""
    repos = daemon.data / "repos"
    return [
        f"{repos}/sublib.git", f"{repos}/sublib", f"{repos}/sublib.git/", f"{repos}/../repos/./sublib.git",
        f"file://{repos}/sublib.git", f"file://localhost{repos}/sublib",
        f"ssh://git@127.0.0.1:{daemon.ssh_port}/sublib.git", f"ssh://localhost:{daemon.ssh_port}/sublib",
        f"ssh://git@[::1]:{daemon.ssh_port}/sublib.git/", f"http://127.0.0.1:{daemon.http_port}/sublib.git",
        f"http://bob:not-a-token@LOCALHOST:{daemon.http_port}/sublib.git", "./../sublib",
    ]


def test_every_spelling_of_an_app_here_is_checked_against_the_pusher(served: Daemon, lib: str, outsider: Path,
                                                                     reader: Path) -> None:
    urls = spellings(served)
    for index, url in enumerate(urls):
        repo = make_repo(served.work / f"peek-{index}", {"Procfile": "web: python3 -m http.server $PORT\n"})
        add_submodule(served, repo, "vendor/lib", url, lib)
        assert refusal(push_as(served, repo, f"peek-{index}", outsider)) == \
            f"deploy failed at export: submodule vendor/lib: {url} {NOT_AN_APP}"

    # One the pusher can read is exported, whichever way it is named (no more than --max-submodules at once).
    repo = app_repo(served, "stdlib", "allowed")
    for index, url in enumerate(urls):
        add_submodule(served, repo, f"vendor/lib{index}", url, lib)
    result = push_as(served, repo, "allowed", reader)
    assert result.returncode == 0, result.stderr
    build = latest_build(served, "allowed")
    for index, url in enumerate(urls):
        assert f"submodule vendor/lib{index} at {lib[:12]} from {url}" in result.stderr
        assert (build / f"vendor/lib{index}/greeting.txt").read_text() == "hello from the submodule\n"


@pytest.fixture(scope="module")
def dulwich_served(tmp_path_factory) -> Iterator[Daemon]:
    """A daemon without C git's fsck in front (which refuses a few of the URLs below itself)."""
    d = start_daemon(tmp_path_factory.mktemp("submodules-dulwich"), backend="dulwich")
    yield d
    stop_daemon(d)


@pytest.mark.parametrize("backend", ["cgit", "dulwich"])
@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "/etc/passwd", "/etc", "file:///no/such/path.git", "/root/.ssh", "file://otherhost/etc",
    "../../etc/passwd", "./x.git", "lib.git", "~/sublib.git", "-uhello", "--upload-pack=touch /tmp/x",
    "ext::sh -c touch% {marker}", "fd::3", "ftp://127.0.0.1/x.git", "ssh://-oProxyCommand=id/x.git",
    "{data}/state.db", "{data}/repos/sublib.git/objects",
])
def test_anything_else_local_is_refused_without_a_word_about_the_host(request, backend: str, url: str) -> None:
    daemon: Daemon = request.getfixturevalue("served" if backend == "cgit" else "dulwich_served")
    marker = daemon.work / "ext-ran"
    url = url.format(marker=marker, data=daemon.data)
    name = f"host-{len(list(daemon.work.glob('host-*')))}"
    repo = make_repo(daemon.work / name, {"Procfile": "web: python3 -m http.server $PORT\n"})
    add_submodule(daemon, repo, "vendor/x", url, "1" * 40)
    result = push_as(daemon, repo, name)
    if backend == "cgit" and "disallowed submodule url" in result.stderr:
        return  # C git's fsck (receive.fsckObjects) refused it before the daemon saw the push
    reason = refusal(result)
    assert reason.startswith(f"deploy failed at export: submodule vendor/x: {url}"), reason
    # The same words whether the path exists or not, whoever may read it: nothing of git's or the system's.
    for leak in ("No such file", "does not exist", "Permission denied", "root:", "fatal:", "not a git repository"):
        assert leak not in reason
    assert not marker.exists()


@pytest.fixture(scope="module")
def git_daemon(served: Daemon, lib: str, tmp_path_factory) -> Iterator[tuple[int, Path, Path]]:
    """`git daemon` on loopback serving netlib.git (which holds a network submodule and one naming sublib on
    this DevFlow), netdeep.git and netbig.git (a 100 MiB file); its access hook logs the uid of each client's
    socket."""
    base = tmp_path_factory.mktemp("git-daemon")
    deep = make_repo(base / "netdeep-src", {"deep.txt": "from deep down\n"})
    deep_sha = commit(deep, "deep", allow_empty=True)
    net = make_repo(base / "netlib-src", {"greeting.txt": "hello over the network\n"})
    add_submodule(served, net, "deep", "../netdeep.git", deep_sha)
    add_submodule(served, net, "mine", f"ssh://git@127.0.0.1:{served.ssh_port}/sublib.git", lib)
    big = make_repo(base / "netbig-src", {"README": "a large file\n"})
    with (big / "zeros.bin").open("wb") as out:
        out.truncate(100 * 1024 * 1024)
    commit(big, "zeros")
    for name, src in (("netdeep", deep), ("netlib", net), ("netbig", big)):
        subprocess.run(["git", "clone", "-q", "--bare", str(src), str(base / f"{name}.git")], check=True,
                       env={**os.environ, "GIT_CONFIG_GLOBAL": os.devnull})
    hook_log = base / "clients.log"
    hook = base / "access-hook"
    hook.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{ACCESS_HOOK}' {hook_log} \"$@\"\n")
    hook.chmod(0o755)
    port = free_port()
    proc = subprocess.Popen(["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={port}",
                             f"--base-path={base}", "--export-all", "--informative-errors",
                             f"--access-hook={hook}", str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield port, hook_log, base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(os.getuid() != 0, reason="apps have uids of their own only under a root daemon")
def test_a_network_url_is_fetched_as_the_apps_uid(served: Daemon, git_daemon: tuple[int, Path, Path]) -> None:
    port, clients, _ = git_daemon
    repo = app_repo(served, "stdlib", "netapp")
    add_submodule(served, repo, "vendor/net", f"git://127.0.0.1:{port}/netlib.git",
                  served.git("ls-remote", f"git://127.0.0.1:{port}/netlib.git", "HEAD").stdout.split()[0])
    clients.write_text("")  # the ls-remote above was the test's own
    result = push(served, repo, "netapp")
    assert f"from git://127.0.0.1:{port}/netlib.git" in result.stderr
    assert "submodule vendor/net/deep at" in result.stderr and "submodule vendor/net/mine at" in result.stderr

    uid = app_uid(served, "netapp")
    assert uid >= 700_000_000
    # Every connection git daemon took (netlib, then netdeep, relative to netlib's URL) came from the app's uid.
    seen = [line.split() for line in clients.read_text().splitlines()]
    assert {Path(path).name for _, path in seen} == {"netlib.git", "netdeep.git"}, seen
    assert {int(owner) for owner, _ in seen} == {uid}, seen
    build = latest_build(served, "netapp")
    assert (build / "vendor/net/greeting.txt").read_text() == "hello over the network\n"
    assert (build / "vendor/net/greeting.txt").stat().st_uid == uid
    assert (build / "vendor/net/deep/deep.txt").read_text() == "from deep down\n"
    # The app on this DevFlow that the network repository names is read by the daemon: the pusher may read it.
    assert (build / "vendor/net/mine/greeting.txt").read_text() == "hello from the submodule\n"
    assert not any((served.apps_dir / "netapp" / "submodules").iterdir())  # the fetched repositories are gone
    assert get(served, "netapp").text == "stdlib v1"


def test_network_errors_are_git_s_own_and_name_no_local_path(served: Daemon, lib: str,
                                                             git_daemon: tuple[int, Path, Path]) -> None:
    port, _, _ = git_daemon
    repo = make_repo(served.work / "netmissing", {"Procfile": "web: python3 -m http.server $PORT\n"})
    add_submodule(served, repo, "vendor/gone", f"git://127.0.0.1:{port}/missing.git", lib)
    reason = refusal(push_as(served, repo, "netmissing"))
    assert reason.startswith(f"deploy failed at export: submodule vendor/gone: cannot fetch "
                             f"git://127.0.0.1:{port}/missing.git: "), reason
    assert "fatal:" in reason  # git's words, for the pusher's own network URL
    assert str(served.apps_dir) not in reason and str(served.data) not in reason


@pytest.mark.skipif(os.getuid() != 0, reason="apps have uids of their own (with no passwd entry) under root only")
@pytest.mark.parametrize("url", ["ssh://git@127.0.0.9/elsewhere.git", "git@127.0.0.9:elsewhere.git"])
def test_ssh_submodules_say_what_they_need(served: Daemon, lib: str, url: str) -> None:
    repo = make_repo(served.work / f"overssh{len(url)}", {"Procfile": "web: python3 -m http.server $PORT\n"})
    add_submodule(served, repo, "vendor/ssh", url, lib)
    reason = refusal(push_as(served, repo, f"overssh{len(url)}"))
    assert f"submodule vendor/ssh: cannot fetch {url}: ssh needs a build user with a passwd entry" in reason, reason
    assert "--app-user" in reason and "https URL" in reason and "No user exists" not in reason


def test_a_fetch_that_hangs_is_cut_at_the_submodule_timeout(served: Daemon, lib: str) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"git://127.0.0.1:{silent.getsockname()[1]}/stuck.git"
        repo = make_repo(served.work / "hangs", {"Procfile": "web: python3 -m http.server $PORT\n"})
        add_submodule(served, repo, "vendor/stuck", url, lib)
        reason = refusal(push_as(served, repo, "hangs"))
    assert f"submodule vendor/stuck: fetching {url} took longer" in reason
    assert "--submodule-timeout" in reason
    assert get(served, "subapp").text == "stdlib v1"  # the daemon served on meanwhile


def test_the_number_of_submodules_is_bounded(served: Daemon, lib: str) -> None:
    repo = make_repo(served.work / "many", {"Procfile": "web: python3 -m http.server $PORT\n"})
    for index in range(65):  # one more than --max-submodules allows
        add_submodule(served, repo, f"lib{index}", "../sublib.git", lib)
    reason = refusal(push_as(served, repo, "many"))
    assert re.search(r"the push brings too many submodules \(past the limit at lib\d+\)", reason), reason
    assert "--max-submodules" in reason


def test_a_network_submodule_counts_toward_max_app_bytes(tmp_path_factory, lib: str,
                                                         git_daemon: tuple[int, Path, Path]) -> None:
    port, _, base = git_daemon
    daemon = start_daemon(tmp_path_factory.mktemp("tight-submodules"), extra_args=("--max-app-bytes", str(64 << 20)))
    try:
        repo = make_repo(daemon.work / "netbig", {"Procfile": "web: python3 -m http.server $PORT\n"})
        sha = subprocess.run(["git", "-C", str(base / "netbig.git"), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        add_submodule(daemon, repo, "vendor/big", f"git://127.0.0.1:{port}/netbig.git", sha)
        assert refusal(push_as(daemon, repo, "netbig")) == (
            "deploy failed at export: the pushed tree is too large uncompressed (past the limit at "
            "vendor/big/zeros.bin, a 100.0 MiB file): the limit is 64 MiB (an admin can raise it with devflow up "
            "--max-app-bytes)")
        assert not any((daemon.apps_dir / "netbig" / "builds").iterdir())
        assert not any((daemon.apps_dir / "netbig" / "submodules").iterdir())  # nor what the app's user fetched
    finally:
        stop_daemon(daemon)


def in_build_unit(daemon: Daemon, pid: int) -> bool:
    """The process belongs to a deployment's build unit: its cgroup, else a process group its record names."""
    if "/tasks/build-" in Path(f"/proc/{pid}/cgroup").read_text():
        return True
    pgid = os.getpgid(pid)
    return any(line.split()[:1] == [str(pgid)] for record in (daemon.data / "run" / "tasks").glob("build-*/groups")
               for line in record.read_text().splitlines())


def test_a_daemon_killed_mid_fetch_leaves_no_git_behind(tmp_path_factory) -> None:
    """The fetch runs in the deployment's build unit: git dies with the daemon, and what it started (git's
    http helper, waiting on a server that never answers) goes when the next daemon starts."""
    daemon = start_daemon(tmp_path_factory.mktemp("killed-mid-fetch"))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/stuck.git"
        repo = make_repo(daemon.work / "midfetch", {"Procfile": "web: python3 -m http.server $PORT\n"})
        add_submodule(daemon, repo, "vendor/stuck", url, daemon.git("rev-parse", "HEAD", cwd=repo).stdout.strip())
        pusher = subprocess.Popen(["git", "push", f"{daemon.ssh_url}/midfetch.git", "main"], cwd=repo,
                                  env=daemon.git_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            fetching = wait_until(lambda: len(holding(url)) >= 2 and holding(url), "git and its http helper")
            assert all(in_build_unit(daemon, pid) for pid in fetching), fetching
            daemon.proc.kill()  # kill -9: no cleanup of its own
            daemon.proc.wait()
            pusher.wait(timeout=60)
            launch(daemon)
            wait_until(lambda: not holding(url), "what the fetch started to be killed")
            [deploy] = daemon.api().get("apps/midfetch/deploys").json()
            assert deploy["state"] == "failed" and "the daemon stopped" in deploy["error"]
        finally:
            pusher.kill()
            pusher.wait()
            for pid in holding(url):  # what a daemon without units would leave
                os.kill(pid, signal.SIGKILL)
            stop_daemon(daemon)


def test_what_an_app_writes_in_its_scratch_repository_starts_no_command(tmp_path: Path,
                                                                       git_daemon: tuple[int, Path, Path]) -> None:
    """A live process of the app may edit the repository its deployment fetches into, between two git commands:
    none of the keys that make git start a command of their choosing (a proxy for git://, the command that lists
    an alternate's refs) is taken from it."""
    port, _, base = git_daemon
    ran = tmp_path / "ran"
    command = tmp_path / "command"
    command.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {ran}\n")
    command.chmod(0o755)
    fetch = RemoteFetch(tmp_path / "scratch", None, {"PATH": os.environ["PATH"]})
    fetch.prepare()
    git_dir = fetch.scratch / "0.git"
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull}
    subprocess.run(["git", "init", "-q", "--bare", str(git_dir)], check=True, env=env)
    for key in ("core.gitProxy", "core.alternateRefsCommand"):
        subprocess.run(["git", "-C", str(git_dir), "config", key, str(command)], check=True, env=env)
    (git_dir / "objects" / "info" / "alternates").write_text(f"{base / 'netdeep.git' / 'objects'}\n")
    sha = subprocess.run(["git", "-C", str(base / "netlib.git"), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    asyncio.run(fetch.fetch(f"git://127.0.0.1:{port}/netlib.git", sha, git_dir))
    assert not ran.exists(), ran.read_text()
